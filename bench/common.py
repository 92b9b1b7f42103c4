"""Shared helpers for the benchmarks: command-line options, random models, synthetic images, the
bare "floor" step (the work TI cannot avoid) and exact memory accounting.

Run the benchmarks from the repository root, e.g. `python bench/step_overhead.py --quick`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/, not the root, on the path
    sys.path.insert(0, str(ROOT))

from lib_ti.config import TrainConfig  # noqa: E402
from lib_ti.diffusers_backend import inject  # noqa: E402
from lib_ti.model import SDXL_SLOTS, SINGLE_SLOT  # noqa: E402
from lib_ti.train import autocast_for  # noqa: E402

TOKEN = "benchtok123"
PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------ options
def model_args(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--family", choices=("sd1", "sd2", "sdxl"), default="sd1")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny",
                   help="tiny: CPU test model; full: the real SD1.5 / SDXL architecture (random weights)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default 128 tiny, 512 sd1, 1024 sdxl)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vectors", type=int, default=2, help="vectors per token")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="no")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=steps, help="measured steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="few steps: a smoke run")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --quick on the CPU, else torch's default)")
    p.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                   help="cpu: the main thread's CPU time, which other jobs on shared cores do not inflate "
                        "(auto: cpu on the CPU with 1 thread, else wall time with device syncs)")


def resolution(args: argparse.Namespace) -> int:
    if args.resolution:
        return args.resolution
    if args.size == "tiny":
        return 128
    return 1024 if args.family == "sdxl" else 512


def preset(args: argparse.Namespace) -> str:
    if args.size == "tiny":
        return "tiny"
    if args.family == "sd2":
        raise SystemExit("no full-size sd2 preset (random_models has sd15 and sdxl); use --family sd1 or sdxl")
    return "sdxl" if args.family == "sdxl" else "sd15"


def weight_dtype(args: argparse.Namespace) -> torch.dtype:
    """Half weights on a GPU, as hosts load them; fp32 on the CPU, where autocast does the rest."""
    return PRECISIONS[args.precision] if torch.device(args.device).type == "cuda" else torch.float32


def build_model(args: argparse.Namespace, seed: int = 0):
    from tests.support.random_models import build_random_model

    if args.threads is None and args.quick and torch.device(args.device).type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    return build_random_model(preset(args), args.family, seed=seed, device=args.device, dtype=weight_dtype(args))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


# ------------------------------------------------------------------------------------------- data
def write_images(folder: Path, n: int, size: int, caption: str | None = None,
                 draw: Callable | None = None, seed: int = 0) -> Path:
    """`n` PNGs of `size` px (a jittered red disc on blue unless `draw(img, rng)` says otherwise),
    each with `caption` in a .txt beside it."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = Image.new("RGB", (size, size), (20, 40, 200))
        if draw is not None:
            draw(img, rng)
        else:
            x, y = rng.integers(0, size // 2, 2)
            ImageDraw.Draw(img).ellipse([x, y, x + size // 3, y + size // 3], fill=(220, 30, 30))
        img.save(folder / f"img{i}.png")
        if caption is not None:
            (folder / f"img{i}.txt").write_text(caption)
    return folder


def train_config(data_dir: Path, out_dir: Path, **kw: object) -> TrainConfig:
    base = dict(token_string=TOKEN, init_word="ball", train_data_dir=str(data_dir), output_dir=str(out_dir),
                learning_rate="5e-3", validation_every_n_steps=0, seed=1, overwrite=True)
    base.update(kw)
    return TrainConfig.from_dict(base)


# ------------------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(args: argparse.Namespace) -> Callable[[], float]:
    """The timer for step times. All CPU work of a step runs on the calling thread when torch uses
    one thread, so its CPU time is the step's cost even when other processes share the cores."""
    cpu_ok = torch.device(args.device).type == "cpu" and torch.get_num_threads() == 1
    if args.clock == "cpu" and not cpu_ok:
        raise SystemExit("--clock cpu needs --device cpu and --threads 1")
    return time.thread_time if args.clock == "cpu" or (args.clock == "auto" and cpu_ok) else time.perf_counter


def median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000 if xs else float("nan")


def quantile_ms(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000 if s else float("nan")


# ------------------------------------------------------------------------------------------- floor
class Floor:
    """The least work a TI step must do: the text encoder(s) on pre-tokenized ids with the vectors
    spliced in, the UNet on pre-noised latents, an MSE and the backward pass to the vectors. No
    tokenizing, no data, no optimizer. Built once; `step()` runs one forward + backward."""

    def __init__(self, model, cfg: TrainConfig, latents: torch.Tensor, texts: list[str], n_vectors: int,
                 seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        dev = model.device
        self.model, self.cfg = model, cfg
        # read once: diffusers' ModelMixin.dtype walks every parameter of the UNet on each call
        self.dtype = next(model.unet.parameters()).dtype
        self.slots = list(model.slots())
        init = {k: torch.randn(n_vectors, w, generator=gen) * 0.02 for k, w in model.slots().items()}
        self.vectors = {k: v.to(dev).requires_grad_(True) for k, v in init.items()}
        b = latents.shape[0]
        self.t = torch.randint(0, 1000, (b,), generator=gen).to(dev)
        self.noisy = latents.to(dev, self.dtype)
        self.target = torch.randn(latents.shape, generator=gen).to(dev)
        self.sdxl = model.family == "sdxl"
        encoders = ([(SDXL_SLOTS[0], model.text_encoder, model.tokenizer),
                     (SDXL_SLOTS[1], model.text_encoder_2, model.tokenizer_2)] if self.sdxl
                    else [(SINGLE_SLOT, model.text_encoder, model.tokenizer)])
        self.encoders = [(slot, te, model.prompts.batch(texts, TOKEN, n_vectors, int(tok.pad_token_id), dev))
                         for slot, te, tok in encoders]
        if self.sdxl:
            hw = tuple(latents.shape[-2:])
            self.time_ids = model.time_ids(None, b, hw)

    def cond(self):
        if not self.sdxl:
            slot, te, batch = self.encoders[0]
            return inject.encode(te, batch, self.vectors[slot])[0], None
        outs = {slot: inject.encode(te, batch, self.vectors[slot], output_hidden_states=True)
                for slot, te, batch in self.encoders}
        hidden = torch.cat([outs[s].hidden_states[-2].to(self.dtype) for s in SDXL_SLOTS], dim=-1)
        return hidden, {"text_embeds": outs[SDXL_SLOTS[1]].text_embeds.to(self.dtype),
                        "time_ids": self.time_ids}

    def forward_backward(self) -> None:
        with autocast_for(self.cfg, self.model.device):
            hidden, added = self.cond()
            kw = {"added_cond_kwargs": added} if added is not None else {}
            pred = self.model.unet(self.noisy, self.t, encoder_hidden_states=hidden.to(self.dtype), **kw).sample
            loss = torch.nn.functional.mse_loss(pred.float(), self.target)
        loss.backward()

    def step(self) -> None:
        self.forward_backward()
        for v in self.vectors.values():
            v.grad = None


# ------------------------------------------------------------------------------------------ memory
def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor an optimizer keeps (moments, step counters)."""
    return sum(tensor_bytes(s.values()) for s in opt.state.values())


class PeakMeter:
    """Peak bytes allocated above the level at `start()`: exact on CUDA (allocator statistics) and,
    on the CPU, from the profiler's record of every tensor allocation and free in time order."""

    def __init__(self, device: torch.device):
        self.device = device
        self.prof = None
        self.base = 0
        self.peak = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()

    def stop(self) -> int:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            return self.peak
        self.prof.__exit__(None, None, None)
        events = [e for e in self.prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
        events.sort(key=lambda e: e.start_ns())
        cur = peak = 0
        for e in events:
            cur += e.nbytes()
            peak = max(peak, cur)
        self.prof, self.peak = None, peak
        return peak


def human(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def step_setup(args: argparse.Namespace, model, work: Path) -> tuple[TrainConfig, torch.Tensor, list[str], int]:
    """What both step benches share: a small image folder, the config, and one fixed batch of
    latents and prompts. Returns (cfg, latents, texts, resolution)."""
    res = resolution(args)
    caption = f"a photo of {TOKEN}"
    data = write_images(work / "data", max(4, 2 * args.batch), res, caption)
    cfg = train_config(
        data, work / "out", resolution=str(res), train_batch_size=args.batch,
        num_vectors_per_token=args.vectors, mixed_precision=args.precision,
        gradient_checkpointing=args.checkpointing, max_train_steps=args.warmup + args.steps + 1)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(args.batch, 3, res, res, generator=gen) * 2 - 1
    latents = model.encode_images(pixels.to(model.device))
    return cfg, latents, [caption] * args.batch, res


# ------------------------------------------------------------------------------------ resume state
FULL_WIDTHS = {"SD1": {SINGLE_SLOT: 768}, "SD2": {SINGLE_SLOT: 1024}, "SDXL": {SDXL_SLOTS[0]: 768, SDXL_SLOTS[1]: 1280}}


def resume_state_sizes(state_file: Path, cfg: TrainConfig, work: Path,
                       vector_counts: tuple[int, ...] = (1, 8)) -> list[tuple[str, int, int, int]]:
    """(family, vectors, embedding bytes, `.ti-state` bytes) at the real widths, without a full
    model: the resume state a run wrote (`state_file`: its RNG, sampler and fingerprint) with the
    moments of the loop's own optimizer after one step on vectors of that shape, written by
    `resume.save` beside an embedding written by `formats.save_embedding`, as the run layer does."""
    from lib_ti import formats, resume
    from lib_ti.embedding import Embedding
    from lib_ti.optim import make_optimizer

    state, why = resume.load(str(state_file))
    if state is None:
        raise SystemExit(f"the run wrote no readable resume state: {why}")
    rows = []
    for family, widths in FULL_WIDTHS.items():
        for n in vector_counts:
            gen = torch.Generator().manual_seed(n)
            vectors = {k: (torch.randn(n, w, generator=gen) * 0.02).requires_grad_(True) for k, w in widths.items()}
            opt = make_optimizer(cfg, list(vectors.values()), 5e-3)
            for v in vectors.values():
                v.grad = torch.randn(v.shape, generator=gen)
            opt.step()
            emb_path = work / f"{family}-{n}.safetensors"
            emb = Embedding({k: v.detach() for k, v in vectors.items()}, step=int(state["step"]), name=TOKEN)
            formats.save_embedding(emb, emb_path, "safetensors", overwrite=True)
            resume.save(resume.state_path(str(emb_path)), {**state, "optimizer": opt.state_dict()}, emb.vectors)
            rows.append((family, n, emb_path.stat().st_size, Path(resume.state_path(str(emb_path))).stat().st_size))
    return rows

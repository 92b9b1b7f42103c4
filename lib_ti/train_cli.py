"""`python -m lib_ti train`: the same core as the WebUI tab, on a local checkpoint file or diffusers folder.

Several GPUs: `accelerate launch -m lib_ti train --config_file args.toml` runs one process per
GPU; each draws its own batches and the vectors' gradients are averaged across processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lib_ti import formats, run, sample_prompts
from lib_ti.config import ConfigError, TrainConfig, _literal
from lib_ti.embedding import Embedding
from lib_ti.prepare import PrepareError, check_data
from lib_ti.train import Callbacks, Progress

log = logging.getLogger("lib_ti")

def parse_sets(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq:
            raise ConfigError({key: "--set takes KEY=VALUE"})
        out[key.strip()] = _literal(value.strip())
    return out


def build_config(config_file: str | None, dataset_config: str | None, sets: list[str] | None) -> TrainConfig:
    overrides = parse_sets(sets)
    if dataset_config:
        overrides["dataset_config"] = dataset_config
    if config_file:
        return TrainConfig.from_toml(config_file, overrides)
    return TrainConfig.from_dict(overrides)


def pick_device(name: str) -> torch.device:
    """auto, cpu, cuda, cuda:N or mps; ConfigError (exit 2) for anything this machine cannot run."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError({"device": f"'{name}' is not a device; use auto, cpu, cuda, cuda:N or mps"}) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError({"device": f"'{name}': this torch has no CUDA device; use cpu or auto"})
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError({"device": f"'{name}': only {torch.cuda.device_count()} CUDA device(s) here"})
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError({"device": f"'{name}': MPS is not available here"})
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError({"device": f"'{name}' is not supported; use auto, cpu, cuda, cuda:N or mps"})
    return dev


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    # weights in half precision only on a GPU; on CPU fp32 is both faster and exact
    if device.type == "cpu" or cfg.mixed_precision == "no":
        return torch.float32
    return torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16


def render_samples(cfg: TrainConfig, model: Any, emb: Embedding, step: int) -> list[str]:
    """Previews into <output_dir>/sample/, as kohya does; the training size unless a line says."""
    from lib_ti.diffusers_backend.preview import render

    w, h = cfg.resolution_wh()
    out = Path(cfg.output_dir or ".") / "sample"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, prompt in enumerate(sample_prompts.parse(cfg)):
        opts = {"width": w, "height": h, "seed": max(cfg.seed, 0) + i, **prompt}
        path = out / f"{cfg.name}-{step:06d}-{i}.png"
        render(model, cfg.token_string, emb.vectors, **opts).save(path)
        paths.append(str(path))
    return paths


def distributed() -> tuple[int, int, Any]:
    """(rank, world_size, all_reduce) from accelerate/torch.distributed when launched that way."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, lambda t: None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    def all_reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t)
        t /= world

    return dist.get_rank(), world, all_reduce


def check_before_loading(cfg: TrainConfig) -> tuple[torch.device, run.FolderOutputs]:
    """Everything cheap, before the model loads: the name, the output folder, the device, the model
    path and the data. Raises ConfigError/PrepareError (exit 2); creates nothing."""
    if not cfg.pretrained_model_name_or_path:
        raise ConfigError({"pretrained_model_name_or_path": "is required for the CLI: a local checkpoint file (.safetensors/.ckpt) or diffusers folder"})
    out = run.FolderOutputs(cfg.output_dir)
    if os.path.exists(out.final_dir) and not os.path.isdir(out.final_dir):
        raise ConfigError({"output_dir": f"'{cfg.output_dir}' is a file, not a folder"})
    run.check_names(out, cfg)
    from lib_ti.diffusers_backend.load import check_model_path

    try:  # its json files or header only: the weights load later
        check_model_path(cfg.pretrained_model_name_or_path)
    except ValueError as e:
        raise ConfigError({"pretrained_model_name_or_path": (str(e).strip().splitlines() or [""])[0]}) from None
    device = pick_device(cfg.device)
    check_data(cfg)
    return device, out


def train(cfg: TrainConfig, stop: Any = None) -> run.RunResult:
    from lib_ti.diffusers_backend.load import load_diffusers_model

    device, out = check_before_loading(cfg)
    try:
        model = load_diffusers_model(cfg.pretrained_model_name_or_path, device=device,
                                     dtype=compute_dtype(cfg, device), clip_skip=cfg.clip_skip,
                                     v_parameterization=cfg.v_parameterization or None)
    except (ValueError, OSError) as e:  # not a model folder, a damaged file: the user's input
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError({"pretrained_model_name_or_path": f"cannot load a model from it: {first}"}) from None
    model.prompts.weighted = cfg.weighted_captions  # A1111's emphasis syntax in captions and previews
    rank, world, reduce = distributed()
    out.write_files = rank == 0
    if world > 1 and cfg.seed < 0:
        # every process must start from the same seed: same latents, same validation batch
        import random

        import torch.distributed as dist

        seed = torch.tensor([random.randrange(2**31)], device=device if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(seed, 0)
        cfg = cfg.replace(seed=int(seed))
    last = {"pct": -1}

    def progress(p: Progress) -> None:
        if rank != 0:
            return
        if p.phase == "training" and p.max_steps:
            pct = p.step * 20 // p.max_steps
            if pct != last["pct"] or p.validated:
                last["pct"] = pct
                val = f" val {p.val_loss:.4f}" if p.val_loss is not None else ""
                print(f"step {p.step}/{p.max_steps} loss {p.loss:.4f}{val} lr {p.lr:.2e} eta {p.eta_s or 0:.0f}s",
                      flush=True)
        elif p.message:
            print(p.message, flush=True)

    def sample(step: int, emb: Embedding) -> None:
        if rank == 0:
            for path in render_samples(cfg, model, emb, step):
                print(f"preview: {path}", flush=True)

    cb = Callbacks(
        progress=progress, on_sample=sample, should_stop=lambda: bool(stop and stop.get("signal")),
        log=lambda msg: print(f"note: {msg}", flush=True) if rank == 0 else None,
        all_reduce=reduce, rank=rank, world_size=world,
    )
    return run.run(cfg, model, out, cb)


@contextlib.contextmanager
def graceful_signals(stop: dict[str, Any]) -> Iterator[None]:
    """Ctrl-C or SIGTERM: finish the step, save what was learned, and exit non-zero. A second
    Ctrl-C aborts at once (the run layer still keeps the vectors in a recovery file)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        stop["signal"] = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving what was learned "
              "(Ctrl-C again aborts)", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(args: Any) -> int:
    stop: dict[str, Any] = {}
    try:
        cfg = build_config(args.config_file, args.dataset_config, getattr(args, "set", None))
        if cfg.debug_dataset:  # kohya: show the dataset and exit, without loading the model
            from lib_ti.dry_run import debug_dataset

            print(debug_dataset(cfg))
            return 0
        with graceful_signals(stop):
            result = train(cfg, stop)
    except ConfigError as e:  # one line, naming every field
        print("error: " + "; ".join(f"{k}: {v}" for k, v in e.errors.items()), file=sys.stderr)
        return 2
    except PrepareError as e:
        print(f"error: {e.field}: {e}", file=sys.stderr)
        return 2
    except formats.FormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for_user = result.error or result.message
    if result.status == "failed":
        print(f"error: {for_user}", file=sys.stderr)
        return 2 if result.error_field else 1
    print(f"{result.status}: {result.message}; saved {result.output}")
    if stop.get("signal"):
        return 128 + int(stop["signal"])  # as a shell reports the signal, with the file written
    return 0

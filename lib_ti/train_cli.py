"""`python -m lib_ti train`: the same core as the WebUI tab, on a local diffusers model folder.

Several GPUs: `accelerate launch -m lib_ti train --config_file args.toml` runs one process per
GPU; each draws its own batches and the vectors' gradients are averaged across processes.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from lib_ti import formats, outputs
from lib_ti.config import ConfigError, TrainConfig, _literal
from lib_ti.embedding import Embedding
from lib_ti.prepare import PrepareError
from lib_ti.train import Callbacks, Progress, TrainResult, run_training

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
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    # weights in half precision only on a GPU; on CPU fp32 is both faster and exact
    if device.type == "cpu" or cfg.mixed_precision == "no":
        return torch.float32
    return torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16


class FolderSaver:
    """Checkpoints as <output_dir>/<name>-<step>.<ext>, the final file as <name>.<ext>, and loss.csv."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.dir = Path(cfg.output_dir or ".")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[tuple[int, float, float | str]] = []

    def progress(self, p: Progress) -> None:
        if p.phase == "training" and p.loss is not None:
            self.rows.append((p.step, p.loss, p.val_loss if p.val_loss is not None else ""))

    def checkpoint(self, emb: Embedding, final: bool) -> str:
        path, fmt, token = outputs.output_file(self.cfg, None if final else emb.step, sdxl="clip_g" in emb.vectors)
        path.parent.mkdir(exist_ok=True)  # the invokeai layout's <name>/ folder
        emb.name = self.cfg.name
        formats.save_embedding(emb, str(path), fmt, overwrite=True, token=token)
        if final:
            self.write_csv()
        return str(path)

    def final_path(self) -> Path:
        return outputs.output_file(self.cfg)[0]

    def write_csv(self) -> None:
        with open(self.dir / "loss.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "loss", "val_loss"])
            w.writerows(self.rows)


def _resuming(cfg: TrainConfig, path: Path) -> bool:
    """Continuing from the final file itself may replace it; anything else must not overwrite."""
    return bool(cfg.weights) and Path(cfg.weights).resolve() == path.resolve()


def sample_prompts(cfg: TrainConfig) -> list[str]:
    """sample_prompts: a file (one prompt a line, # comments) or the prompts themselves."""
    text = cfg.sample_prompts.strip()
    if text and "\n" not in text and Path(text).is_file():
        text = Path(text).read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return lines or [f"a photo of {cfg.token_string}"]


def render_samples(cfg: TrainConfig, model: Any, emb: Embedding, step: int) -> list[str]:
    """Previews into <output_dir>/sample/, as kohya does; the training size unless a line says."""
    from lib_ti.family.preview import parse_prompt_line, render

    w, h = cfg.resolution_wh()
    out = Path(cfg.output_dir or ".") / "sample"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, line in enumerate(sample_prompts(cfg)):
        opts = {"width": w, "height": h, "seed": max(cfg.seed, 0) + i, **parse_prompt_line(line)}
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


def train(cfg: TrainConfig) -> TrainResult:
    from lib_ti.family.load import load_diffusers_model

    if not cfg.pretrained_model_name_or_path:
        raise ConfigError({"pretrained_model_name_or_path": "is required for the CLI: a local diffusers folder"})
    device = pick_device(cfg.device)
    model = load_diffusers_model(cfg.pretrained_model_name_or_path, device=device,
                                 dtype=compute_dtype(cfg, device), clip_skip=cfg.clip_skip,
                                 v_parameterization=cfg.v_parameterization or None)
    saver = FolderSaver(cfg)
    final = saver.final_path()
    # checked before training, not after: a finished run must never fail on its last write
    if final.exists() and not cfg.overwrite and not _resuming(cfg, final):
        raise PrepareError("output_name", f"{final} already exists; choose another output_name or set overwrite")
    rank, world, reduce = distributed()
    if world > 1 and cfg.seed < 0:
        # every process must start from the same seed: same latents, same validation batch
        import random

        import torch.distributed as dist

        seed = torch.tensor([random.randrange(2**31)], device=device if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(seed, 0)
        cfg = cfg.replace(seed=int(seed))
    last = {"pct": -1}

    def progress(p: Progress) -> None:
        saver.progress(p)
        if rank != 0:
            return
        if p.phase == "training" and p.max_steps:
            pct = p.step * 20 // p.max_steps
            if pct != last["pct"] or p.val_loss is not None and p.step % max(1, cfg.validation_every_n_steps) == 0:
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
        progress=progress,
        on_sample=sample,
        on_checkpoint=lambda emb, final: saver.checkpoint(emb, final) if rank == 0 else None,
        log=lambda msg: print(f"note: {msg}", flush=True) if rank == 0 else None,
        all_reduce=reduce, rank=rank, world_size=world,
    )
    return run_training(cfg, model, cb)


def main(args: Any) -> int:
    try:
        cfg = build_config(args.config_file, args.dataset_config, getattr(args, "set", None))
        if cfg.debug_dataset:  # kohya: show the dataset and exit, without loading the model
            from lib_ti.dry_run import debug_dataset

            print(debug_dataset(cfg))
            return 0
        result = train(cfg)
    except (ConfigError, PrepareError, formats.FormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{result.status}: {result.message}; saved {result.output}")
    return 0 if result.status in ("done", "auto_stopped", "interrupted") else 1

"""Where the CLI writes an embedding, per `save_model_as` (formats.py decides what goes in the file).

* safetensors / pt: `<output_dir>/<name>.<ext>`, checkpoints `<output_dir>/<name>-<step>.<ext>`.
* invokeai: `<output_dir>/<name>/learned_embeds.bin`, the folder layout InvokeAI's embeddings
  folder uses (its trigger is `<name>`): a torch pickle `{"<name>": tensor}`. That format holds no
  step, so checkpoints are `<output_dir>/<name>-<step>.safetensors` (which do), outside that
  folder: resume_from_checkpoint = "latest" continues from them at their step. SDXL, which
  InvokeAI's trainer never had, goes to `learned_embeds.safetensors` with `clip_l`/`clip_g`, the
  SDXL layout InvokeAI reads.
"""

from __future__ import annotations

from pathlib import Path

from lib_ti.config_compat import latest_checkpoint

__all__ = ["EXT", "FMT", "output_file", "latest_checkpoint", "invokeai_token"]

EXT = {"safetensors": ".safetensors", "pt": ".pt", "invokeai": ".bin"}
FMT = {"safetensors": "safetensors", "pt": "a1111-pt", "invokeai": "diffusers"}


def invokeai_token(name: str) -> str:
    return f"<{name}>"


def output_file(cfg, step: int | None = None, sdxl: bool = False) -> tuple[Path, str, str | None]:
    """(path, formats.save_embedding fmt, token for that fmt or None) of the final file (`step`
    None) or of the checkpoint at `step`."""
    out, name, layout = Path(cfg.output_dir or "."), cfg.name, cfg.save_model_as
    if layout == "invokeai":
        if step is not None:
            return out / f"{name}-{step}.safetensors", "safetensors", None
        if sdxl:
            return out / name / "learned_embeds.safetensors", "safetensors", None
        return out / name / "learned_embeds.bin", "diffusers", invokeai_token(name)
    stem = name if step is None else f"{name}-{step}"
    return out / f"{stem}{EXT[layout]}", FMT[layout], None

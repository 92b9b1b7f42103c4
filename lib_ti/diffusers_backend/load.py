"""Open a local model as a TrainableModel: a diffusers-format folder (model_index.json) or an
A1111-style single-file checkpoint (single_file.py). Never downloads: a model id is refused.

Family rule for folders, from the folder's own files, in this order:
  1. `text_encoder_2` in model_index.json -> sdxl (the base model; a refiner, which has only
     text_encoder_2, is refused: A1111 cannot use embeddings on it either);
  2. text_encoder/config.json with `hidden_act == "gelu"` or `hidden_size == 1024` -> sd2
     (OpenCLIP-H uses exact gelu, OpenAI's CLIP-L quick_gelu: true at every size, tiny test
     models included; the width is a second sign for odd exports);
  3. otherwise sd1.
Prediction type: `v_parameterization` if given, else the scheduler config's `prediction_type`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lib_ti.diffusers_backend import single_file
from lib_ti.diffusers_backend.diffusers_sd import DiffusersModel, DiffusersSD
from lib_ti.diffusers_backend.diffusers_sdxl import DiffusersSDXL
from lib_ti.diffusers_backend.single_file_configs import CheckpointError

log = logging.getLogger("lib_ti")

# A model path that cannot be used, folder or file: a PrepareError on pretrained_model_name_or_path (CLI exit 2).
ModelFolderError = CheckpointError


WHAT_TO_PASS = "a local diffusers folder (with model_index.json) or a .safetensors/.ckpt checkpoint file"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"cannot read {path}: {e}") from None


def _present(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None


def detect_family(folder: str | os.PathLike) -> str:
    """'sd1' | 'sd2' | 'sdxl' for a diffusers folder, by the rule in the module docstring."""
    folder = Path(folder)
    if folder.is_dir() and folder.suffix.lower() in single_file.CHECKPOINT_SUFFIXES:
        raise ModelFolderError(f"'{folder}' is a folder named like a checkpoint file; pass the file itself "
                               f"(or {WHAT_TO_PASS})")
    if not (folder / "model_index.json").is_file():
        hint = " (a checkpoint file: load it with load_diffusers_model)" if folder.is_file() else ""
        raise ModelFolderError(f"'{folder}' is not a diffusers model folder: no model_index.json{hint}")
    index = _read_json(folder / "model_index.json")
    missing = [n for n in ("unet", "vae", "scheduler") if not _present(index, n)]
    if missing:
        raise ModelFolderError(f"'{folder}' lacks {', '.join(missing)}: not a Stable Diffusion model")
    if _present(index, "text_encoder_2"):
        if not _present(index, "text_encoder"):
            raise ModelFolderError(f"'{folder}' has only text_encoder_2 (an SDXL refiner?): train on the SDXL base")
        return "sdxl"
    if not _present(index, "text_encoder") or not _present(index, "tokenizer"):
        raise ModelFolderError(f"'{folder}' has no text_encoder/tokenizer: not a Stable Diffusion text-to-image model")
    cfg = _read_json(folder / "text_encoder" / "config.json")
    if cfg.get("hidden_act") == "gelu" or cfg.get("hidden_size") == 1024:
        return "sd2"
    return "sd1"


def _not_found(name: str) -> str:
    """Why `name` (as the user wrote it: Path() would turn './x/y' into 'x/y') cannot be opened."""
    if "://" in name:
        return f"'{name}' is a URL; nothing is downloaded here. Download the file yourself and pass {WHAT_TO_PASS}"
    if os.path.islink(name):
        return f"'{name}' is a symbolic link to nothing (or a loop of links); pass {WHAT_TO_PASS}"
    looks_like_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and ":" not in name
    if looks_like_id:
        return (f"'{name}' is not a local path; it looks like a Hugging Face model id, and nothing is downloaded "
                f"here. Pass {WHAT_TO_PASS} (e.g. `huggingface-cli download {name} --local-dir DIR` first, "
                "or the .safetensors your WebUI loads)")
    return f"'{name}' does not exist; pass {WHAT_TO_PASS} (nothing is downloaded)"


def _variant(sub: Path) -> str | None:
    """'fp16' when a component folder only holds fp16-variant weights (diffusers needs telling)."""
    names = [p.name for p in sub.glob("*")] if sub.is_dir() else []
    plain = any(n.endswith((".safetensors", ".bin")) and ".fp16." not in n for n in names)
    return "fp16" if not plain and any(".fp16." in n for n in names) else None


def wrap(family: str, parts: dict, clip_skip: int = 1, prediction_type: str | None = None) -> DiffusersModel:
    """A TrainableModel around pipeline components (as `components` or a loaded folder gives them)."""
    if family == "sdxl":
        if clip_skip > 1:  # said, as for SD2, rather than silently dropped
            log.info("clip skip %d ignored: SDXL's text encoders use their fixed penultimate layers "
                     "(the WebUI's default too)", clip_skip)
        return DiffusersSDXL(parts["unet"], parts["vae"], parts["text_encoder"], parts["text_encoder_2"],
                             parts["tokenizer"], parts["tokenizer_2"], parts["scheduler"], prediction_type)
    return DiffusersSD(family, parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                       parts["scheduler"], prediction_type, clip_skip)


def _os_errors(fn):
    """A path that cannot be read (no permission on the file or a folder above it, an I/O error)
    is said about the option like any other bad model path, not as a Python exception."""

    @functools.wraps(fn)
    def wrapper(path, *args, **kwargs):
        try:
            return fn(path, *args, **kwargs)
        except OSError as e:
            raise ModelFolderError(f"cannot read '{path}': {e.strerror or e}") from None

    return wrapper


@_os_errors
def check_model_path(path: str | os.PathLike) -> str:
    """The family of the model at `path`, found cheaply (folder: its json files; .safetensors: its
    header and .yaml), before anything is loaded; raises ModelFolderError as loading would. A .ckpt
    is only checked for existence here: reading its keys means unpickling all of it."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() not in single_file.CHECKPOINT_SUFFIXES:
            raise ModelFolderError(f"'{p}' is not a model: pass {WHAT_TO_PASS}")
        return single_file.describe_file(p)
    if not p.exists():
        raise ModelFolderError(_not_found(str(path)))
    return detect_family(p)


@_os_errors
def load_diffusers_model(folder: str | os.PathLike, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32, clip_skip: int = 1,
                         v_parameterization: bool | None = None) -> DiffusersModel:
    """UNet and text encoders in `dtype`, VAE always fp32, all on `device`, local files only.
    `folder` may also be a single-file checkpoint (the CLI's pretrained_model_name_or_path)."""
    given, folder = str(folder), Path(folder)
    if folder.is_file():
        if folder.suffix.lower() not in single_file.CHECKPOINT_SUFFIXES:
            raise ModelFolderError(f"'{folder}' is not a model: pass {WHAT_TO_PASS}")
        return single_file.load_single_file(folder, device, dtype, clip_skip, v_parameterization)
    if not folder.exists():
        raise ModelFolderError(_not_found(given))
    family = detect_family(folder)
    root = str(folder)

    def load(cls, sub: str, **kw):
        try:
            return cls.from_pretrained(root, subfolder=sub, local_files_only=True, **kw)
        except (OSError, ValueError) as e:
            raise ModelFolderError(f"cannot load {sub} from '{folder}': {e}") from e

    def weights(cls, sub: str, dt: torch.dtype):
        kw = {}
        if sub in ("unet", "vae") and importlib.util.find_spec("accelerate") is None:
            kw["low_cpu_mem_usage"] = False  # diffusers' default needs accelerate and warns without it
        return load(cls, sub, torch_dtype=dt, variant=_variant(folder / sub), **kw).to(device).eval()

    parts = {
        "unet": weights(UNet2DConditionModel, "unet", dtype),
        "vae": weights(AutoencoderKL, "vae", torch.float32),
        "text_encoder": weights(CLIPTextModel, "text_encoder", dtype),
        "tokenizer": load(CLIPTokenizer, "tokenizer"),
        # DDPM from any scheduler's config: only the training schedule is needed
        "scheduler": DDPMScheduler.from_config(_read_json(folder / "scheduler" / "scheduler_config.json")),
    }
    if family == "sdxl":
        parts["text_encoder_2"] = weights(CLIPTextModelWithProjection, "text_encoder_2", dtype)
        parts["tokenizer_2"] = load(CLIPTokenizer, "tokenizer_2")
    prediction = None if v_parameterization is None else ("v_prediction" if v_parameterization else "epsilon")
    model = wrap(family, parts, clip_skip, prediction)
    model.source = str(folder.resolve())
    return model


load_model = load_diffusers_model  # the same dispatch (folder or checkpoint file), by its plainer name

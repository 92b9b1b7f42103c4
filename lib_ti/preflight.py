"""Checks that can run before a run is queued, so the tab and the HTTP API (422) name the bad field
at submit instead of a run failing after it started: the output name as a file name on every OS,
the size of an embedding file before it is read, kohya's per-line preview options in
`sample_prompts`, and everything `prepare` would find (token, init word, weights, images, template,
captions) plus the optimizer arguments. Host-free."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from typing import Any

import torch

from lib_ti import optim, sample_prompts
from lib_ti.config import ConfigError, TrainConfig
from lib_ti.model import TrainableModel

MAX_NAME_BYTES = 200  # leaves room for '-<step>.safetensors' under the usual 255-byte limit
WINDOWS_FORBIDDEN = '<>:"/\\|?*'
RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
            *(f"COM{i}" for i in "123456789¹²³"), *(f"LPT{i}" for i in "123456789¹²³")}
# An embedding is at most 75 vectors x 2048 wide (SDXL clip_l + clip_g) in fp32: ~600 KB.
MAX_EMBEDDING_BYTES = 16 * 2**20
MAX_HEADER_BYTES = 2**20
# What a preview render accepts (the API's `preview` object, the tab's preview settings, and the
# per-line options of `sample_prompts`): outside these a render fails or runs for hours.
PREVIEW_RANGES = {"steps": (1, 150), "cfg_scale": (0.0, 30.0), "seed": (-1, 2**32 - 1),
                  "width": (64, 2048), "height": (64, 2048)}


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a file name on Linux, macOS and Windows, or None."""
    if not name:
        return "is empty"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode text"
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long; a file name allows at most {MAX_NAME_BYTES}"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "must not contain control characters (newline, tab, ...)"
    bad = sorted({c for c in name if c in WINDOWS_FORBIDDEN})
    if bad:
        return f"must not contain {' '.join(bad)} (path separators and characters Windows forbids)"
    if name.startswith("."):
        return "must not start with '.' (a hidden file, or a path)"
    if name.endswith((".", " ")):
        return "must not end with '.' or a space (Windows drops them)"
    if name.split(".")[0].rstrip(" ").upper() in RESERVED:
        return f"'{name.split('.')[0]}' is a reserved device name on Windows"
    return None


def embedding_file_problem(path: str) -> str | None:
    """Why `path` is too large to be an embedding, judged from the file size, the safetensors
    header or the zip directory of a torch file, before anything is decompressed or loaded."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"cannot read the file ({e.strerror or type(e).__name__})"
    limit = f"an embedding is at most {MAX_EMBEDDING_BYTES // 2**20} MB"
    if zipfile.is_zipfile(path):  # torch's zip format (.pt/.bin); entries may be compressed
        try:
            with zipfile.ZipFile(path) as z:
                total = sum(i.file_size for i in z.infolist())
        except (zipfile.BadZipFile, OSError, ValueError):
            return "is not a readable torch file"
        return f"holds {total} bytes uncompressed; {limit}" if total > MAX_EMBEDDING_BYTES else None
    if size > MAX_EMBEDDING_BYTES:
        return f"is {size} bytes; {limit}"
    if path.lower().endswith(".safetensors") and len(head) == 8:
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            return "is not a valid safetensors file (header size)"
        try:
            with open(path, "rb") as f:
                f.seek(8)
                header = json.loads(f.read(n))
            numel = sum(_numel(v.get("shape", [])) for k, v in header.items() if k != "__metadata__")
        except (ValueError, TypeError, AttributeError, OSError):
            return "is not a valid safetensors file (header)"
        if numel * 4 > MAX_EMBEDDING_BYTES:
            return f"declares {numel} numbers; {limit}"
    return None


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        if not isinstance(d, int) or d < 0:
            raise ValueError("bad shape")
        n *= d
    return n


def optimizer_problem(cfg: TrainConfig) -> dict[str, str]:
    """Build the optimizer on one dummy parameter and take a step: unknown or bad `optimizer_args`
    and a missing optimizer package show here, not after the model was set up."""
    p = torch.zeros(2, requires_grad=True)
    try:
        opt = optim.make_optimizer(cfg, [p], 1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
    except Exception as e:  # any failure here is the user's arguments or a missing package
        field = "optimizer_args" if cfg.optimizer_args else "optimizer_type"
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        return {field: f"the optimizer refuses them: {type(e).__name__}: {text[:200]}"}
    return {}


def preview_value_problem(key: str, value: float) -> str | None:
    low, high = PREVIEW_RANGES[key]
    if not low <= value <= high:
        return f"{value} is out of range {low}..{high}"
    if key in ("width", "height") and int(value) % 8:
        return f"{value} is not a multiple of 8"
    return None


def sample_prompt_problems(cfg: TrainConfig) -> dict[str, str]:
    """kohya's per-line preview options (--w 512 --s 30 ...) within PREVIEW_RANGES, so a preview
    cannot fail or run for hours after the run started. Names the line and the option, never the
    value (the lines may come from a file)."""
    if cfg.sample_every_n_steps <= 0 or not cfg.sample_prompts:
        return {}
    try:
        lines = sample_prompts.lines(cfg.sample_prompts)
    except (OSError, ValueError):  # (where it may be is the front end's path policy)
        return {"sample_prompts": "cannot be read as a prompts file"}
    for n, line in enumerate(lines, 1):
        options = {k: v for k, v in sample_prompts.parse_line(line).items() if k in PREVIEW_RANGES}
        bad = [k for k, v in options.items() if preview_value_problem(k, v)]
        if bad:
            ranges = ", ".join(f"{k} {PREVIEW_RANGES[k][0]}..{PREVIEW_RANGES[k][1]}" for k in bad)
            return {"sample_prompts": f"line {n}: preview options out of range ({ranges}; sizes multiples of 8)"}
    return {}


def run_problems(cfg: TrainConfig, model: TrainableModel | None) -> dict[str, str]:
    """Everything knowable before the run: the name, the optimizer, and (with a model) what
    `prepare` checks, run without the latent cache and the validation batch so it stays cheap."""
    errors: dict[str, str] = {}
    why = name_problem(cfg.name)
    if why:
        errors["output_name" if cfg.output_name else "token_string"] = why
    if cfg.weights and os.path.isfile(cfg.weights):
        why = embedding_file_problem(cfg.weights)
        if why:
            errors["weights"] = why
    errors.update({k: v for k, v in optimizer_problem(cfg).items() if k not in errors})
    if model is None or errors:
        return errors
    from lib_ti.prepare import PrepareError, check_cacheable, prepare

    light = cfg.replace(cache_latents=False, cache_latents_to_disk=False, validation_every_n_steps=0)
    try:
        check_cacheable(cfg, prepare(light, model, lambda *a: None, lambda: False).items)
    except PrepareError as e:
        errors[e.field] = str(e)
    except ConfigError as e:
        errors.update(e.errors)
    return errors

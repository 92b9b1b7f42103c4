"""Option names of the trainers users bring their configs from, translated to `TrainConfig`.

* kohya sd-scripts options that mean nothing for this trainer are accepted and explained
  (`NOTED_KEYS`), or refused with the reason when switched on (`REFUSED_WHEN_ON`).
* InvokeAI's `invokeai-ti` (diffusers' textual_inversion.py with InvokeAI's front end) option names
  are aliases. When a config uses any name only InvokeAI has, it is read in InvokeAI's dialect:
  InvokeAI's argparse defaults apply to every option the config leaves out (`INVOKEAI_DEFAULTS`),
  so the same file trains the same way it did there.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

_ATTN = "attention uses PyTorch SDPA where the model allows it; xformers is not needed"
_WORKERS = "latents are cached up front, so no loader workers are used"
_LOG = "the loss is written to <name>.loss.csv in the output folder"
_EMBEDS_ONLY = "only the embedding is ever saved: TI leaves the model unchanged, so there is no pipeline to save"
_HUB = "nothing is uploaded or downloaded; the model is a local folder"

NOTED_KEYS = {
    "xformers": _ATTN,
    "sdpa": "SDPA attention is always used where the model allows it",
    "mem_eff_attn": "SDPA attention is always used where the model allows it",
    "max_data_loader_n_workers": _WORKERS,
    "persistent_data_loader_workers": _WORKERS,
    "lowram": "only the text encoder, UNet and a few vectors are kept; nothing to save here",
    "full_fp16": "the vectors always stay fp32; mixed_precision sets the compute dtype",
    "full_bf16": "the vectors always stay fp32; mixed_precision sets the compute dtype",
    "no_half_vae": "the VAE always encodes in fp32 (fp16 gives NaN latents on SDXL)",
    "save_precision": "embeddings are always saved in fp32 (a few KB)",
    "cache_text_encoder_outputs": "impossible for TI: the gradient must pass through the text encoder; ignored",
    "save_state": "the resume state is always saved beside each file (<file>.ti-state): resume with `weights`",
    "log_with": _LOG,
    "logging_dir": _LOG,
    "max_token_length": "prompts use 75-token chunks as the WebUI does",
    "sample_sampler": "previews use the model's own scheduler",
    # kohya dataset options
    "cache_info": "image sizes are read while scanning, which is quick",
    "network_multiplier": "TI trains no network",
    # InvokeAI / diffusers textual_inversion.py
    "enable_xformers_memory_efficient_attention": _ATTN,
    "only_save_embeds": _EMBEDS_ONLY,
    "save_as_full_pipeline": _EMBEDS_ONLY,
    "allow_tf32": "TF32 matmuls follow PyTorch's default; the vectors' update is fp32 either way",
    "report_to": _LOG,
    "local_rank": "accelerate and torchrun pass the process rank in the environment",
    "dataloader_num_workers": _WORKERS,
    "revision": _HUB,
    "variant": _HUB,
    "hub_model_id": _HUB,
    "hub_token": _HUB,
    "repeats": "InvokeAI's repeats only lengthen an epoch; max_train_steps sets the length of the run",
    "num_train_epochs": "InvokeAI's max_train_steps (default 5000) always overrides it; use max_train_epochs",
    "checkpoints_total_limit": "every checkpoint is kept (each is a few KB)",
    "no_safe_serialization": "the layout follows save_model_as",
}

# Accepted when off (as a copied config has them); refused with the reason when on.
REFUSED_WHEN_ON = {
    "push_to_hub": _HUB + "; upload the saved file yourself",
    "front_end": "there is no text UI here; the WebUI tab is the interface",
    "gui": "there is no text UI here; the WebUI tab is the interface",
    "tokenizer_name": "the model folder's own tokenizer is used; another one would not match its text encoder",
    "in_json": "kohya fine-tuning metadata is not read; use caption files beside the images",
    "dataset_repeats": "kohya fine-tuning metadata is not read; use <repeats>_<name> folders or the dataset TOML",
}

# name -> our field, for names that mean exactly the same
INVOKEAI_ALIASES = {
    "model": "pretrained_model_name_or_path",
    "placeholder_token": "token_string",
    "trigger_term": "token_string",
    "initializer_token": "init_word",
    "num_vectors": "num_vectors_per_token",
    "lr_num_cycles": "lr_scheduler_num_cycles",
}
# names that need more than a rename (handled in `translate`)
_INVOKEAI_SPECIAL = ("learnable_property", "resume_from_checkpoint", "save_steps", "checkpointing_steps",
                     "adam_beta1", "adam_beta2", "adam_epsilon", "adam_weight_decay", "root_dir", "root")
_INVOKEAI_NOTED = ("enable_xformers_memory_efficient_attention", "only_save_embeds", "save_as_full_pipeline",
                   "allow_tf32", "report_to", "local_rank", "dataloader_num_workers", "revision", "variant",
                   "hub_model_id", "hub_token", "repeats", "num_train_epochs", "checkpoints_total_limit",
                   "no_safe_serialization", "push_to_hub", "front_end", "gui", "tokenizer_name")
INVOKEAI_ONLY = frozenset(INVOKEAI_ALIASES) | frozenset(_INVOKEAI_SPECIAL) | frozenset(_INVOKEAI_NOTED)

# invokeai/backend/training/textual_inversion_training.py argparse defaults, in our names. The
# images are always flipped at random there (flip_p 0.5) and squashed to a square without
# center_crop; the optimizer is AdamW with weight decay 1e-2.
INVOKEAI_DEFAULTS: dict[str, Any] = {
    "learning_rate": "1e-4", "scale_lr": True, "lr_warmup_steps": 500, "train_batch_size": 16,
    "max_train_steps": 5000, "save_every_n_steps": 500, "flip_aug": True, "center_crop": False,
}
INVOKEAI_WEIGHT_DECAY = "weight_decay=0.01"  # adam_weight_decay's default, unless the config sets one
_ADAM = {"adam_beta1": "betas", "adam_beta2": "betas", "adam_epsilon": "eps", "adam_weight_decay": "weight_decay"}
SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_.\-]+$")  # the token is also a file name (tokens.py)
# InvokeAI's name first: `.+-` would also match it, as a run named "learned_embeds-steps"
_CKPT = re.compile(r"^(?:learned_embeds-steps-|(?P<name>.+)-)(?P<step>\d+)\.(?:safetensors|pt|bin)$")


_CAPTION_EXTENSION = re.compile(r"^\.?[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")  # a suffix, never a path


def token_problem(token: str, weighted: bool = False) -> str | None:
    """Why `token` cannot be the trained word (it is also the file name), or None. The safe
    characters hold none of the emphasis syntax ('(', '[', ':', '\\'); with weighted captions a
    'BREAK' in it would end the chunk mid-name, so no caption could name it."""
    if not token.strip():
        return "is required: the word you will type in prompts"
    if SAFE_TOKEN.match(token):
        if weighted and re.search(r"\bBREAK\b", token, re.IGNORECASE):
            return (f"'{token}' holds the word BREAK, which weighted_captions reads as a chunk break in "
                    "captions; choose a name without it")
        return None
    hint = (" (write it without InvokeAI's <brackets>, or give it as placeholder_token)"
            if strip_token(token) != token.strip() else "")
    return f"'{token}' may contain only letters, digits, '_', '-' and '.' (it is also the file name){hint}"


def check_caption_extension(ext: Any) -> str | None:
    """Why `ext` cannot be a caption extension (it is joined to each image's name), or None."""
    if not isinstance(ext, str) or not _CAPTION_EXTENSION.match(ext) or ".." in ext:
        return f"'{ext}' must be a file extension such as .txt or .caption (letters, digits, '_', '-', '.')"
    return None


def face_crop_problem(pair: Any) -> str | None:
    """Why (low, high) cannot be a face_crop_aug_range, or None. The values are how many face sizes
    the crop's short side spans (kohya: '2.0,4.0'), so low > 0 and low <= high."""
    lo, hi = pair
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi <= 100):
        return f"must be low,high with 0 < low <= high <= 100 (face sizes per crop side), got {lo},{hi}"
    return None


def face_crop_range(text: str) -> tuple[float, float] | None:
    """TrainConfig's 'low,high' text as numbers (None when empty); ValueError says what is wrong."""
    if not text.strip():
        return None
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        pair = tuple(float(p) for p in parts)
    except ValueError:
        pair = ()
    if len(pair) != 2:
        raise ValueError(f"'{text}' must be two numbers 'low,high', e.g. '2.0,4.0'")
    if why := face_crop_problem(pair):
        raise ValueError(why)
    return pair[0], pair[1]


def _on(v: Any) -> bool:
    return v not in (None, False, 0, "", [], "false", "False", "0")


def dialect(values: dict[str, Any]) -> str:
    return "invokeai" if INVOKEAI_ONLY & set(values) else "kohya"


def strip_token(raw: Any) -> str:
    """InvokeAI writes the trigger as `<name>` (its front end adds the brackets); the name is the
    word trained here and the file name, `<name>` is what InvokeAI prompts type."""
    s = str(raw).strip()
    m = re.fullmatch(r"<(.*)>", s)
    return m.group(1).strip() if m else s


def translate(values: dict[str, Any], fields: set[str]) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """(values in our names, notes by key, errors by the user's key). Keys this module does not
    know pass through unchanged, so the caller reports them as unknown."""
    out: dict[str, Any] = {}
    notes: dict[str, str] = {}
    errors: dict[str, str] = {}
    given_as: dict[str, str] = {}  # our field -> the name the user gave it under

    def put(field: str, value: Any, key: str) -> None:
        if field in out and out[field] != value:
            errors[key] = f"is the same option as {given_as[field]} with another value; give it once"
            return
        out[field], given_as[field] = value, key

    for key, value in values.items():
        if key in fields:
            put(key, value, key)
    for key, value in values.items():
        if key in fields:
            continue
        if key in REFUSED_WHEN_ON:
            if _on(value):
                errors[key] = REFUSED_WHEN_ON[key]
            else:
                notes[key] = "off; " + REFUSED_WHEN_ON[key]
        elif key in NOTED_KEYS:
            notes[key] = NOTED_KEYS[key]
        elif key in INVOKEAI_ALIASES:
            field = INVOKEAI_ALIASES[key]
            if field == "token_string":
                value = strip_token(value)
                if not SAFE_TOKEN.match(value):
                    errors[key] = (f"'{values[key]}': the trigger may contain only letters, digits, '_', '-' and "
                                   "'.' inside its <brackets> (it is also the file name)")
                else:
                    notes[key] = (f"'{values[key]}' trains the word '{value}' (also the file name); "
                                  f"InvokeAI prompts type it as <{value}>")
            put(field, value, key)
        elif key == "learnable_property":
            if value not in ("object", "style"):
                errors[key] = f"'{value}' is not one of object, style"
            else:
                put(f"use_{value}_template", True, key)
        elif key in ("save_steps", "checkpointing_steps"):
            pass  # below: both mean "save a resumable embedding every N steps" here
        elif key in _ADAM or key in ("resume_from_checkpoint", "root_dir", "root"):
            pass  # below
        else:
            out[key] = value  # unknown: the caller says so, with a suggestion
    _steps(values, out, notes, put, errors)
    _adam(values, out, notes, errors)
    if dialect(values) == "invokeai":
        _invokeai_defaults(values, out, notes)
    _root(values, out, notes)
    if "resume_from_checkpoint" in values:
        _resume(values["resume_from_checkpoint"], out, notes, errors)
    return out, notes, errors


def _steps(values: dict[str, Any], out: dict[str, Any], notes: dict[str, str], put: Any,
           errors: dict[str, str]) -> None:
    given = {k: values[k] for k in ("save_steps", "checkpointing_steps") if k in values}
    if not given:
        return
    steps = {k: _whole(v) for k, v in given.items()}
    bad = [k for k, v in steps.items() if v is None]
    if bad:  # said under the name the user wrote
        errors[bad[0]] = f"expected a whole number of steps (0 or more), got {given[bad[0]]!r}"
        return
    n = min(steps.values())
    put("save_every_n_steps", n, next(iter(given)))
    if len(given) == 2 and len(set(given.values())) == 2:
        notes["checkpointing_steps"] = (f"the embedding file is the resumable state here; it is saved every "
                                        f"{n} steps (the smaller of save_steps and checkpointing_steps)")


def _whole(v: Any) -> int | None:
    """A step count as TOML, --set, JSON or a form gives it (10, "10", 10.0), else None."""
    if isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if f.is_integer() and f >= 0 else None


def _adam(values: dict[str, Any], out: dict[str, Any], notes: dict[str, str], errors: dict[str, str]) -> None:
    given = {k: values[k] for k in _ADAM if k in values}
    if not given:
        return
    args = out.get("optimizer_args", [])
    args = [a for a in (args.split() if isinstance(args, str) else list(args))
            if not str(a).startswith(tuple(set(_ADAM.values())))]
    try:
        nums = {k: float(v) for k, v in given.items()}
    except (TypeError, ValueError):
        errors[next(iter(given))] = "expected a number"
        return
    if "adam_beta1" in nums or "adam_beta2" in nums:
        args.append(f"betas=({nums.get('adam_beta1', 0.9)},{nums.get('adam_beta2', 0.999)})")
    for k in ("adam_epsilon", "adam_weight_decay"):
        if k in nums:
            args.append(f"{_ADAM[k]}={nums[k]}")
    out["optimizer_args"] = args
    notes["adam_*"] = f"passed to the AdamW optimizer as optimizer_args {' '.join(args)}"


def _invokeai_defaults(values: dict[str, Any], out: dict[str, Any], notes: dict[str, str]) -> None:
    applied = []
    for field, default in INVOKEAI_DEFAULTS.items():
        if field == "center_crop" and out.get("random_crop"):
            continue  # kohya's random_crop asked for: crop, do not squash
        if field not in out:
            out[field] = default
            applied.append(f"{field}={default}")
    args = out.get("optimizer_args", [])
    args = args.split() if isinstance(args, str) else list(args)
    if "optimizer_args" not in values and not any(str(a).startswith("weight_decay") for a in args):
        out["optimizer_args"] = args + [INVOKEAI_WEIGHT_DECAY]
        applied.append(f"optimizer_args {INVOKEAI_WEIGHT_DECAY} (adam_weight_decay)")
    prompt_choices = ("use_object_template", "use_style_template", "template_file", "prompt_source")
    if not any(k in out for k in prompt_choices):
        out["use_object_template"] = True  # InvokeAI has no captions: learnable_property defaults to object
        applied.append("use_object_template=True (learnable_property object)")
    if applied:
        notes["InvokeAI defaults"] = ("this config uses InvokeAI's option names, so InvokeAI's defaults apply to "
                                      "the options it leaves out: " + ", ".join(applied))


def _root(values: dict[str, Any], out: dict[str, Any], notes: dict[str, str]) -> None:
    root = values.get("root_dir", values.get("root"))
    if not root:
        return
    out_dir = str(out.get("output_dir", "") or "")
    if out_dir and not Path(out_dir).is_absolute():
        out["output_dir"] = str(Path(str(root)) / out_dir)
        notes["root_dir"] = f"relative output_dir resolved as {out['output_dir']}, as InvokeAI does"
    else:
        notes["root_dir"] = "used only to resolve a relative output_dir, as InvokeAI does"


def checkpoints(output_dir: str | Path, name: str) -> list[tuple[int, Path]]:
    """(step, path) of the resumable embeddings in `output_dir`, oldest first: this trainer's
    `<name>-<step>.<ext>` checkpoints and InvokeAI's `learned_embeds-steps-<step>.bin`."""
    folder = Path(output_dir or ".")
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_file() and m.group("name") in (None, name):
            found.append((int(m.group("step")), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path, name: str) -> Path | None:
    found = checkpoints(output_dir, name)
    return found[-1][1] if found else None


def _resume(raw: Any, out: dict[str, Any], notes: dict[str, str], errors: dict[str, str]) -> None:
    key = "resume_from_checkpoint"
    if raw in (None, "", False):
        return
    if out.get("weights"):
        errors[key] = "give weights or resume_from_checkpoint, not both"
        return
    out_dir = str(out.get("output_dir", "") or "")
    name = str(out.get("output_name") or out.get("token_string") or "")
    if str(raw) == "latest":
        path = latest_checkpoint(out_dir, name)
        if path is None:  # InvokeAI: "Checkpoint 'latest' does not exist. Starting a new training run."
            notes[key] = f"latest: no checkpoint of '{name}' in '{out_dir or '.'}' yet; starting a new run"
            return
        out["weights"] = str(path)
        notes[key] = f"latest: continuing from {path}"
        return
    path = Path(str(raw))
    if not path.is_absolute() and not path.exists() and out_dir:
        path = Path(out_dir) / path.name  # InvokeAI looks the name up in output_dir
    if path.is_dir():
        errors[key] = (f"'{raw}' is a folder (InvokeAI's accelerate state); give an embedding file such as "
                       "learned_embeds-steps-N.bin, or 'latest'")
        return
    out["weights"] = str(path)
    notes[key] = f"continuing from {path} (the same as weights)"

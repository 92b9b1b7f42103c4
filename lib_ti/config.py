"""The one typed training config.

Field names follow kohya sd-scripts' arguments wherever kohya has one, so a kohya TI command
written as TOML runs unchanged. The WebUI tab, the HTTP API and the CLI all build this object
from named values (`TrainConfig.from_dict`); every bad field is reported at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib_ti import config_compat
from lib_ti.config_coerce import coerce as _coerce
from lib_ti.config_compat import NOTED_KEYS
from lib_ti.schedule import SCHEDULERS, parse_piecewise
from lib_ti.toml_compat import MISSING, toml_module

__all__ = ["NOTED_KEYS", "OPTIMIZERS", "ConfigError", "TrainConfig"]


class ConfigError(ValueError):
    """All invalid fields at once: `errors` maps field name -> message."""

    def __init__(self, errors: dict[str, str]):
        self.errors = dict(errors)
        lines = [f"{k}: {v}" for k, v in self.errors.items()]
        super().__init__("invalid training options:\n  " + "\n  ".join(lines))


def _opt(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
         choices: tuple[str, ...] | None = None, host: bool = False) -> Any:
    # host=True: the WebUI decides it (the loaded model, its folders); only the CLI reads it from the user
    meta = {"help": help, "lo": lo, "hi": hi, "choices": choices, "host": host}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


OPTIMIZERS = ("AdamW", "Adam", "SGD", "SGDNesterov", "Lion", "Prodigy", "DAdaptAdam")
# Optimizers kohya offers that buy nothing here: their point is saving optimizer memory on
# millions of weights, and TI trains a few thousand numbers. They run as plain AdamW.
OPTIMIZER_ALIASES = {
    "adamw8bit": "AdamW", "pagedadamw8bit": "AdamW", "pagedadamw": "AdamW", "pagedadamw32bit": "AdamW",
    "adafactor": "AdamW", "lion8bit": "Lion", "pagedlion8bit": "Lion", "sgdnesterov8bit": "SGDNesterov",
}

@dataclass(frozen=True)
class TrainConfig:
    # --- model and output (CLI: model folder; WebUI: the loaded checkpoint) ---
    pretrained_model_name_or_path: str = _opt("", "checkpoint file (.safetensors/.ckpt) or diffusers folder (CLI only)",
                                              host=True)
    v2: bool = _opt(False, "kohya flag; the family is detected from the model", host=True)
    v_parameterization: bool = _opt(False, "force v-prediction targets (SD2-768-v style models)")
    output_dir: str = _opt("", "where the embedding and its checkpoints go", host=True)
    output_name: str = _opt("", "file name of the embedding (default: token_string)")
    save_model_as: str = _opt("safetensors", "file format; pt: SD1/SD2 only; invokeai (CLI only): "
                              "<output_dir>/<name>/learned_embeds.bin",
                              choices=("safetensors", "pt", "invokeai"))
    overwrite: bool = _opt(False, "replace an existing embedding of the same name")
    save_every_n_steps: int = _opt(0, "save a checkpoint every N steps (0: only at the end)", lo=0)
    # --- token ---
    token_string: str = _opt("", "the new word you will type in prompts (also the file name)")
    init_word: str = _opt("*", "one word whose embedding the vectors start from ('' = zeros)")
    init_word_spread: bool = _opt(False, "allow a multi-token init text, spread over the vectors (A1111)")
    num_vectors_per_token: int = _opt(1, "vectors the token stands for", lo=1, hi=75)
    weights: str = _opt("", "resume from this embedding file (continues from its saved step)")
    # --- prompts ---
    prompt_source: str = _opt("auto", "unless a template below is set: auto (each image's caption; the object "
                              "template for an image without one) or captions (kohya)", choices=("auto", "captions"))
    use_object_template: bool = _opt(False, "ignore captions; use 'a photo of a {token}'-style prompts")
    use_style_template: bool = _opt(False, "ignore captions; use 'a painting in the style of {token}' prompts")
    template_file: str = _opt("", "A1111 template: a file, or subject/style/subject_filewords/style_filewords/none")
    weighted_captions: bool = _opt(False, "CLI: read A1111's (word:1.2), [word] and BREAK in captions and preview "
                                   "prompts (the WebUI's own parser always does)", host=True)
    # --- data ---
    train_data_dir: str = _opt("", "folder of images, flat or kohya <repeats>_<name> subfolders")
    dataset_config: str = _opt("", "kohya dataset TOML (replaces train_data_dir/reg_data_dir)")
    reg_data_dir: str = _opt("", "regularization images (captions without the token)")
    prior_loss_weight: float = _opt(1.0, "loss weight of regularization images", lo=0.0)
    caption_extension: str = _opt(".txt", "caption file extension next to each image")
    shuffle_caption: bool = _opt(False, "shuffle comma-separated tags each step")
    keep_tokens: int = _opt(0, "leading tags kept in place when shuffling", lo=0)
    caption_separator: str = _opt(",", "tag separator for shuffling")
    keep_tokens_separator: str = _opt("", "tags before it (and after a second one) stay in place when shuffling")
    secondary_separator: str = _opt("", "joins tags that shuffle and drop together; becomes caption_separator")
    caption_prefix: str = _opt("", "text put before every caption")
    caption_suffix: str = _opt("", "text put after every caption")
    enable_wildcard: bool = _opt(False, "{red|blue} choices and several caption lines, one picked each step")
    caption_dropout_rate: float = _opt(0.0, "share of steps an image is shown with an empty caption", lo=0.0, hi=1.0)
    caption_dropout_every_n_epochs: int = _opt(0, "empty captions for every image in every Nth epoch", lo=0)
    caption_tag_dropout_rate: float = _opt(0.0, "chance of dropping each tag keep_tokens does not keep", lo=0.0, hi=1.0)
    token_warmup_min: int = _opt(1, "tags shown at the start of token warmup", lo=0)
    token_warmup_step: float = _opt(0.0, "steps (or a fraction of the run if < 1) to show all tags (0: off)",
                                    lo=0.0)
    debug_dataset: bool = _opt(False, "CLI only: list every image with its bucket and sample prompts, then exit",
                               host=True)
    resolution: str = _opt("512", "training size 'N' or 'W,H'")
    enable_bucket: bool = _opt(False, "aspect-ratio buckets instead of one square size")
    min_bucket_reso: int = _opt(256, "smallest bucket side", lo=64, hi=4096)
    max_bucket_reso: int = _opt(1024, "largest bucket side", lo=64, hi=8192)
    bucket_reso_steps: int = _opt(64, "bucket side step", lo=8, hi=256)
    bucket_no_upscale: bool = _opt(False, "never upscale small images into a bucket")
    flip_aug: bool = _opt(False, "random horizontal flips")
    random_crop: bool = _opt(False, "random instead of center crop (needs cache_latents off)")
    color_aug: bool = _opt(False, "kohya's weak colour augmentation: small hue or gamma shifts (needs cache_latents off)")
    face_crop_aug_range: str = _opt("", "'low,high' (e.g. 2.0,4.0): crop images named <name>_cx_cy_w_h around the "
                                    "face, low..high face sizes per side (needs cache_latents off)")
    center_crop: bool = _opt(True, "crop the image's center to the training size (false: squash it, as InvokeAI)")
    cache_latents: bool = _opt(True, "encode images once and keep the latents in RAM")
    cache_latents_to_disk: bool = _opt(False, "also keep latents on disk for the next run")
    vae_batch_size: int = _opt(1, "images per VAE batch when caching", lo=1, hi=256)
    # --- optimisation ---
    train_batch_size: int = _opt(1, "images per step", lo=1, hi=256)
    gradient_accumulation_steps: int = _opt(1, "batches summed per optimizer step", lo=1, hi=1024)
    max_train_steps: int = _opt(1000, "total optimizer steps (a resumed run counts its saved steps)", lo=1,
                                hi=10_000_000)
    max_train_epochs: int = _opt(0, "if set, overrides max_train_steps", lo=0)
    learning_rate: Any = _opt("5e-3", "number, or A1111 piecewise '0.005:100, 1e-3:1000, 1e-5'")
    scale_lr: bool = _opt(False, "multiply the rate by batch size x accumulation x GPUs")
    lr_scheduler: str = _opt("constant", "rate schedule", choices=SCHEDULERS)
    lr_warmup_steps: int = _opt(0, "steps of linear warmup", lo=0)
    lr_scheduler_num_cycles: int = _opt(1, "restarts for cosine_with_restarts", lo=1, hi=1000)
    lr_scheduler_power: float = _opt(1.0, "power for polynomial", lo=0.0, hi=100.0)
    max_grad_norm: float = _opt(0.0, "clip the vectors' gradient norm (0: off)", lo=0.0)
    optimizer_type: str = _opt("AdamW", "optimizer (AdamW without weight decay unless optimizer_args sets it; "
                               "8-bit/paged variants run as their full version; Prodigy and DAdaptAdam "
                               "need their package)")
    optimizer_args: list = _opt([], "extra optimizer arguments 'key=value', e.g. weight_decay=0.01")
    mixed_precision: str = _opt("no", "compute precision", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = _opt(False, "less memory, ~30% slower")
    min_snr_gamma: float = _opt(0.0, "min-SNR loss weighting gamma (0: off; 5 is typical)", lo=0.0, hi=100.0)
    noise_offset: float = _opt(0.0, "noise offset (0: off; 0.05 is typical)", lo=0.0, hi=1.0)
    clip_skip: int = _opt(1, "text encoder layers skipped from the end (SD1; SD2 and SDXL use their fixed layer, with a log line)", lo=1, hi=12)
    seed: int = _opt(-1, "random seed (-1: random)", lo=-1, hi=2**32 - 1)
    device: str = _opt("auto", "CLI only: auto, cpu, cuda, cuda:N, mps", host=True)
    # --- previews ---
    sample_every_n_steps: int = _opt(0, "render previews every N steps (0: off)", lo=0)
    sample_prompts: str = _opt("", "preview prompts: a file, or prompts one per line")
    # --- validation (no peer has these) ---
    validation_every_n_steps: int = _opt(50, "validation loss on a fixed batch every N steps (0: off)", lo=0)
    validation_batch_size: int = _opt(4, "fixed samples in the validation batch", lo=1, hi=64)
    validation_seed: int = _opt(1234, "seed of the fixed validation noise and timesteps", lo=0, hi=2**32 - 1)
    auto_stop: bool = _opt(False, "stop when the validation loss has flattened (DVAR)")
    auto_stop_window: int = _opt(10, "validation points the flatness test looks at", lo=3, hi=10_000)
    auto_stop_threshold: float = _opt(0.15, "stop when var(last window) / var(all) is below this",
                                      lo=0.0, hi=1.0)
    # options of other trainers that were accepted without effect or translated, with the reason
    ignored: dict = _opt({}, "options of other trainers accepted without effect or translated, with the reason")

    # ---------------------------------------------------------------- construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "ignored"]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "ignored"}
        # kohya's no-op options and InvokeAI's names (with its defaults) become our fields and notes
        values, ignored, errors = config_compat.translate(values, set(known))
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                near = difflib.get_close_matches(key, list(known), n=1)
                errors[key] = "unknown option" + (f" (did you mean '{near[0]}'?)" if near else "")
                continue
            try:
                kwargs[key] = _coerce(known[key], value)
            except ValueError as e:
                errors[key] = str(e)
        kwargs["ignored"] = ignored
        cfg = cls(**kwargs)
        # report type errors and range/consistency errors together, so a form can mark every field
        said = {config_compat.INVOKEAI_ALIASES.get(k) for k in errors}  # a field already wrong under its alias
        errors.update({k: v for k, v in cfg.problems().items() if k not in said and k not in errors})
        if errors:
            raise ConfigError(errors)
        return cfg

    @classmethod
    def from_toml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        tomllib = toml_module()
        if tomllib is None:
            raise ConfigError({"config_file": MISSING})
        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError({"config_file": f"{path} is not valid TOML: {e}"}) from None
        flat: dict[str, Any] = {}
        for k, v in data.items():  # kohya writes some configs with [sections]; flatten them
            if isinstance(v, dict) and k not in ("ignored",):
                flat.update(v)
            else:
                flat[k] = v
        flat.update(overrides or {})
        return cls.from_dict(flat)

    @classmethod
    def host_decided(cls) -> tuple[str, ...]:
        """Fields the WebUI decides itself (tagged `host` above); the CLI takes them from the user."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("host"))

    def replace(self, **changes: Any) -> TrainConfig:
        merged = {k: getattr(self, k) for k in self.field_names()}
        merged.update(changes)
        new = TrainConfig.from_dict(merged)
        # the notes about accepted-but-ignored options stay with the config (never silently dropped)
        return dataclasses.replace(new, ignored={**self.ignored, **new.ignored})

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.field_names()}

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        errors = self.problems()
        if errors:
            raise ConfigError(errors)

    def problems(self) -> dict[str, str]:
        errors: dict[str, str] = {}
        for f in dataclasses.fields(self):
            lo, hi, choices = f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("choices")
            v = getattr(self, f.name)
            if choices and v not in choices:
                errors[f.name] = f"'{v}' is not one of {', '.join(choices)}"
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            if numeric and (not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi)):
                errors[f.name] = f"{v} is out of range {_range(lo, hi)}"
        if why := config_compat.token_problem(self.token_string, self.weighted_captions):  # at submit
            errors["token_string"] = why
        try:
            parse_piecewise(self.learning_rate)
        except ValueError as e:
            errors["learning_rate"] = f"'{self.learning_rate}': {e}"
        try:
            self.resolution_wh()
        except ValueError as e:
            errors["resolution"] = str(e)
        if self.optimizer_type.lower() not in {o.lower() for o in OPTIMIZERS} | set(OPTIMIZER_ALIASES):
            errors["optimizer_type"] = (f"'{self.optimizer_type}' is not supported; use one of "
                                        f"{', '.join(OPTIMIZERS)}")
        if not self.train_data_dir and not self.dataset_config:
            errors["train_data_dir"] = "is required (or give dataset_config)"
        if self.use_object_template and self.use_style_template:
            errors["use_style_template"] = "choose the object or the style template, not both"
        if self.random_crop and not self.center_crop:
            errors["center_crop"] = "false squashes the whole image to the training size; random_crop has nothing to crop"
        if self.random_crop and self.cache_latents:
            errors["random_crop"] = "needs cache_latents off: a cached latent cannot be re-cropped"
        if self.min_bucket_reso > self.max_bucket_reso:
            errors["min_bucket_reso"] = f"{self.min_bucket_reso} is larger than max_bucket_reso"
        if why := config_compat.check_caption_extension(self.caption_extension):
            errors["caption_extension"] = why
        try:
            config_compat.face_crop_range(self.face_crop_aug_range)
        except ValueError as e:
            errors["face_crop_aug_range"] = str(e)
        for key in ("color_aug", "face_crop_aug_range"):
            if getattr(self, key) and self.cache_latents:
                errors[key] = "needs cache_latents off: a cached latent is one fixed view of each image (kohya rule)"
        if self.cache_latents_to_disk and not self.cache_latents:
            errors["cache_latents_to_disk"] = "needs cache_latents on"
        for arg in self.optimizer_args:
            if "=" not in str(arg):
                errors["optimizer_args"] = f"'{arg}' is not key=value"
        return errors

    # ---------------------------------------------------------------- derived values
    def resolution_wh(self) -> tuple[int, int]:
        """kohya order: 'W,H' (one number means square). Sides must be multiples of 8."""
        parts = [p.strip() for p in str(self.resolution).replace("x", ",").split(",") if p.strip()]
        try:
            nums = [int(float(p)) for p in parts]
        except (ValueError, OverflowError):  # 'abc', 'nan', '1e999'
            raise ValueError(f"'{self.resolution}' is not 'N' or 'W,H'") from None
        if len(nums) == 1:
            nums = nums * 2
        if len(nums) != 2 or any(n < 64 or n > 8192 or n % 8 for n in nums):
            raise ValueError(f"'{self.resolution}' must be one or two sides in 64..8192, multiples of 8")
        return nums[0], nums[1]

    def optimizer_name(self) -> str:
        low = self.optimizer_type.lower()
        if low in OPTIMIZER_ALIASES:
            return OPTIMIZER_ALIASES[low]
        return next(o for o in OPTIMIZERS if o.lower() == low)

    def optimizer_kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for arg in self.optimizer_args:
            k, _, v = str(arg).partition("=")
            out[k.strip()] = _literal(v.strip())
        return out

    def notes(self) -> list[str]:
        """Human explanations of options that were accepted but change nothing or were mapped."""
        notes = [f"{k}: {why}" for k, why in self.ignored.items()]
        if self.optimizer_type.lower() in OPTIMIZER_ALIASES:
            notes.append(f"optimizer_type: {self.optimizer_type} runs as {self.optimizer_name()}: 8-bit and "
                         "paged optimizers save memory on millions of weights; TI trains a few thousand")
        if self.v2:
            notes.append("v2: the model family is detected from the model itself")
        return notes

    def subset_options(self) -> dict[str, Any]:
        """The per-image-folder options (kohya's subset keys) as `data.SubsetSpec` takes them."""
        opts = {k: getattr(self, k) for k in SUBSET_FIELDS}
        opts["face_crop_aug_range"] = config_compat.face_crop_range(self.face_crop_aug_range)
        return opts

    @property
    def name(self) -> str:
        return self.output_name or self.token_string


SUBSET_FIELDS = ("caption_extension", "shuffle_caption", "keep_tokens", "caption_separator", "keep_tokens_separator",
                 "secondary_separator", "caption_prefix", "caption_suffix", "enable_wildcard", "caption_dropout_rate",
                 "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "token_warmup_min", "token_warmup_step",
                 "flip_aug", "random_crop", "color_aug", "face_crop_aug_range")


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"{lo}..{hi}"
    return f">= {lo}" if lo is not None else f"<= {hi}"


def _literal(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    if v.startswith("(") and v.endswith(")"):
        return tuple(_literal(x.strip()) for x in v[1:-1].split(",") if x.strip())
    return v

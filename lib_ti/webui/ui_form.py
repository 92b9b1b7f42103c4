"""Form components built from TrainConfig's field metadata, and the mapping from form values back
to config values. The tab decides the layout; this module decides what each field looks like.

Labels are the keys of the host's ui-config.json (train/TI Trainer/<label>/value): they must stay
stable and unique, so they are spelled out here once and never derived from help text.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import gradio as gr

from lib_ti.config import OPTIMIZERS, TrainConfig
from lib_ti.webui import settings

PREFIX = "ti_trainer_"
# Decided by the WebUI (tagged in TrainConfig): the loaded checkpoint is the model, the host's
# folders are the output.
UI_FIXED = TrainConfig.host_decided()

LABELS = {
    # token
    "token_string": "Token string", "init_word": "Initialization word",
    "num_vectors_per_token": "Vectors per token", "weights": "Resume from embedding",
    "overwrite": "Overwrite an existing embedding", "output_name": "Output file name",
    "init_word_spread": "Spread a multi-token init text", "save_model_as": "File format",
    # data
    "train_data_dir": "Dataset directory", "caption_extension": "Caption extension",
    "template_file": "A1111 template", "shuffle_caption": "Shuffle tags",
    "keep_tokens": "Keep first N tags", "caption_separator": "Tag separator",
    "resolution": "Resolution (N or W,H)", "flip_aug": "Random horizontal flip",
    "enable_bucket": "Aspect-ratio buckets", "min_bucket_reso": "Min bucket side",
    "max_bucket_reso": "Max bucket side", "bucket_reso_steps": "Bucket side step",
    "bucket_no_upscale": "Never upscale into a bucket", "reg_data_dir": "Regularization directory",
    "prior_loss_weight": "Regularization loss weight", "dataset_config": "Dataset TOML",
    "random_crop": "Random crop", "cache_latents": "Cache latents", "center_crop": "Center crop",
    "caption_prefix": "Caption prefix", "caption_suffix": "Caption suffix",
    "keep_tokens_separator": "Keep-tags separator", "secondary_separator": "Secondary separator",
    "caption_dropout_rate": "Caption dropout rate", "caption_dropout_every_n_epochs": "Caption dropout every N epochs",
    "caption_tag_dropout_rate": "Tag dropout rate", "enable_wildcard": "Wildcards in captions",
    "token_warmup_min": "Token warmup: first tags", "token_warmup_step": "Token warmup: steps",
    "cache_latents_to_disk": "Cache latents to disk", "vae_batch_size": "VAE batch size",
    "color_aug": "Colour augmentation", "face_crop_aug_range": "Face crop range (low,high)",
    # training
    "learning_rate": "Learning rate", "max_train_steps": "Max steps", "max_train_epochs": "Max epochs",
    "train_batch_size": "Batch size", "gradient_accumulation_steps": "Gradient accumulation steps",
    "scale_lr": "Scale learning rate by batch", "lr_scheduler": "LR scheduler",
    "lr_warmup_steps": "Warmup steps", "lr_scheduler_num_cycles": "Scheduler restarts",
    "lr_scheduler_power": "Polynomial power", "optimizer_type": "Optimizer",
    "optimizer_args": "Optimizer arguments", "mixed_precision": "Mixed precision",
    "gradient_checkpointing": "Gradient checkpointing", "min_snr_gamma": "Min-SNR gamma",
    "noise_offset": "Noise offset", "max_grad_norm": "Max gradient norm", "clip_skip": "Clip skip",
    "seed": "Seed", "v_parameterization": "Force v-prediction",
    # saving and previews
    "save_every_n_steps": "Save a checkpoint every N steps",
    "sample_every_n_steps": "Render previews every N steps", "sample_prompts": "Preview prompts",
    # validation
    "validation_every_n_steps": "Validate every N steps", "validation_batch_size": "Validation batch size",
    "validation_seed": "Validation seed", "auto_stop": "Stop when validation loss flattens",
    "auto_stop_window": "Auto-stop window", "auto_stop_threshold": "Auto-stop threshold",
}

# The tab's own preview settings (not config fields): error keys preview_<key>, as their elem ids.
PREVIEW_LABELS = {"preview_negative_prompt": "Preview negative prompt", "preview_steps": "Preview sampling steps",
                  "preview_sampler_name": "Preview sampler", "preview_cfg_scale": "Preview CFG scale",
                  "preview_seed": "Preview seed", "preview_width": "Preview width", "preview_height": "Preview height"}

# The prompt source is one choice in the form and four fields in the config.
PROMPT_SOURCES = ("auto", "captions", "object template", "style template", "A1111 template file")
TEMPLATE_FILE_SOURCE = PROMPT_SOURCES[4]
PROMPT_SOURCE_FIELDS = ("prompt_source", "use_object_template", "use_style_template", "template_file")
TEMPLATE_NAMES = ("subject", "style", "subject_filewords", "style_filewords", "none")
NEW_EMBEDDING = "None"  # the resume dropdown's "start fresh" (the host's own dropdowns say None too)
EMBEDDING_EXTS = (".safetensors", ".pt", ".bin")


def fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "ignored"}


def form_fields() -> list[str]:
    """Config fields the tab must offer: all but the ones the WebUI decides itself."""
    return [n for n in TrainConfig.field_names() if n not in UI_FIXED]


def elem_id(name: str) -> str:
    return PREFIX + name


def info_text(name: str) -> str:
    """The config's help, with the option name that the README, the API and TOML files use."""
    return f"{fields()[name].metadata['help']} [{name}]"


def component(name: str, **overrides: Any) -> gr.components.Component:
    """The gradio input of one config field, with its settings default and its help as info."""
    meta = fields()[name].metadata
    value = settings.default(name)
    kw: dict[str, Any] = dict(label=LABELS[name], info=info_text(name), elem_id=elem_id(name))
    if name == "clip_skip":  # job.make_config: 0 follows the WebUI's own Clip skip, as txt2img does
        value = 0
        kw["info"] = f"{meta['help']}; 0: the WebUI's Clip skip setting [{name}]"
    kw.update(overrides)
    if isinstance(value, bool):
        return gr.Checkbox(value=value, **kw)
    if meta.get("choices"):
        return gr.Dropdown(choices=list(meta["choices"]), value=value, **kw)
    if name == "optimizer_type":  # aliases (AdamW8bit, ...) are typed by kohya users: allow them
        return gr.Dropdown(choices=list(OPTIMIZERS), value=value, allow_custom_value=True, **kw)
    if isinstance(value, int):
        # no minimum/maximum: the config checks ranges and reports every bad field at once
        return gr.Number(value=value, precision=0, **kw)
    if isinstance(value, float):
        return gr.Number(value=value, **kw)
    if isinstance(value, list):
        return gr.Textbox(value=" ".join(map(str, value)), placeholder="weight_decay=0.01 betas=(0.9,0.99)", **kw)
    return gr.Textbox(value=str(value), **kw)


def prompt_source_component() -> gr.Radio:
    return gr.Radio(choices=list(PROMPT_SOURCES), value=PROMPT_SOURCES[0], label="Prompts from",
                    info="auto: each image's caption, the object template for an image without one; "
                    "captions only; A1111's built-in templates; or a template file "
                    "[prompt_source] [use_object_template] [use_style_template] [template_file]",
                    elem_id=elem_id("prompt_source"))


def list_embeddings(folder: str | None) -> list[str]:
    """Embedding files under the host's embeddings folder, relative paths, for the resume dropdown."""
    if not folder or not os.path.isdir(folder):
        return []
    found = []
    for root, _dirs, files in os.walk(folder):
        for f in files:
            if f.lower().endswith(EMBEDDING_EXTS):
                found.append(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"))
    return sorted(found, key=str.lower)


def to_config_values(values: dict[str, Any], embeddings_dir: str | None) -> dict[str, Any]:
    """Form values (component name -> value) to config values (field -> value)."""
    out = {k: v for k, v in values.items() if k in fields()}
    source = values.get("prompt_source") or PROMPT_SOURCES[0]
    out["prompt_source"] = "captions" if source == "captions" else "auto"
    out["use_object_template"] = source == "object template"
    out["use_style_template"] = source == "style template"
    out["template_file"] = (values.get("template_file") or "") if source == TEMPLATE_FILE_SOURCE else ""
    weights = (values.get("weights") or "").strip()
    if weights in ("", NEW_EMBEDDING):
        out["weights"] = ""
    elif not os.path.isabs(weights) and embeddings_dir:
        out["weights"] = os.path.join(embeddings_dir, weights)
    for k, v in list(out.items()):
        if isinstance(v, str) and k not in ("caption_separator", "keep_tokens_separator", "secondary_separator",
                                            "sample_prompts"):
            out[k] = v.strip()  # a pasted path or token with a trailing space is not a different value
    return out

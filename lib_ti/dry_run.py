"""kohya's `debug_dataset` for the CLI: what training would see, without loading the model.

kohya shows each image and its token ids and waits for a key; here every image is listed with its
size, bucket, crop, repeats and a few of the prompts it will be trained with (caption processing,
templates and dropout included), and the command exits. The token ids need the model's tokenizer:
the tab's Dataset preview shows them.
"""

from __future__ import annotations

import random

from lib_ti import data, prompt_weights
from lib_ti.config import TrainConfig
from lib_ti.data import augment
from lib_ti.prepare import PrepareError, check_prompts, dataset_spec, prompt_mode

SAMPLES = 3  # prompts shown per image: enough to see shuffling, dropout and templates vary


def debug_dataset(cfg: TrainConfig, samples: int = SAMPLES) -> str:
    field = "template_file"
    try:  # each failure said under the option that caused it
        templates = data.load_template(cfg.template_file) if cfg.template_file else None
        prompts = data.PromptBuilder(cfg.token_string, prompt_mode(cfg), templates)
        field = "dataset_config" if cfg.dataset_config else "train_data_dir"
        spec = dataset_spec(cfg)
        scan = data.scan(spec)
    except (OSError, data.DataError) as e:  # the CLI prints the field before the message
        raise PrepareError(field, str(e)) from None
    rng = random.Random(cfg.seed if cfg.seed >= 0 else 0)
    lines = [f"debug_dataset: {len(scan.items)} images, resolution {spec.resolution[1]}x{spec.resolution[0]}, "
             f"{'buckets' if spec.enable_bucket else 'one size'}, "
             f"{'center crop' if spec.center_crop else 'squashed'}, prompts from {prompts.mode}"]
    for it in scan.items:
        s = it.subset
        kind = "reg" if s.is_reg else "train"
        lines.append(f"{it.path}  {it.size[0]}x{it.size[1]} -> {it.resized[0]}x{it.resized[1]}, bucket "
                     f"{it.bucket[0]}x{it.bucket[1]}, {kind}, repeats {s.num_repeats}"
                     + (", flip" if s.flip_aug or cfg.flip_aug else "")
                     + (", colour changes" if s.color_aug else "")
                     + (", face crop" if s.face_crop_aug_range and augment.face_info(it.path) else ""))
        lines.append(f"  caption: {it.caption!r}")
        for n in range(samples):
            text = prompts.build(it, rng, epoch=1, step=0, max_steps=cfg.max_train_steps)
            lines.append(f"  prompt {n + 1}: {text!r}")
            if cfg.weighted_captions and not prompt_weights.is_plain(pieces := prompt_weights.parse(text)):
                lines.append("    weighted: " + " | ".join("BREAK" if p is None else f"{p[0]!r} x{p[1]:.3g}"
                                                          for p in pieces))
    lines.append(f"fixed validation prompt of the first image: {prompts.fixed(scan.items[0])!r}")
    train = [it for it in scan.items if not it.subset.is_reg]
    try:
        lines += check_prompts(prompts, train, cfg.token_string)
    except PrepareError as e:
        lines.append(f"training would refuse this: {e}")
    captioned = prompts.captioned(train)
    if captioned:
        missing = data.captions_missing_token(captioned, cfg.token_string)
        lines.append(f"{len(captioned) - len(missing)} of {len(captioned)} training captions name '{cfg.token_string}'")
    for path, why in scan.skipped:
        lines.append(f"skipped {path}: {why}")
    lines.append("nothing was trained (debug_dataset)")
    return "\n".join(lines)

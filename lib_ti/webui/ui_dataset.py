"""'Preview dataset' (kohya's --debug_dataset, made visible): the first images as training will
see them after resize, bucket crop and flip, each with one drawn prompt and its token ids, the
new token's ids highlighted. It catches the usual silent failures before a run: captions that
never name the token, crops that cut the subject off, a token that splits into common words."""

from __future__ import annotations

import html
import os
import random
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image

from lib_ti import data, prepare
from lib_ti.config import ConfigError, TrainConfig
from lib_ti.webui import host_model, job
from lib_ti.webui.ui_form import UI_FIXED, to_config_values
from lib_ti.webui.ui_handlers import _embeddings_dir, errors_html, message_html

MAX_IMAGES = 64
CHUNK = 75  # the WebUI encodes prompts in chunks of 75 tokens


def to_image(pixels: Any) -> Image.Image:
    """[3,H,W] float in [-1,1] -> PIL."""
    arr = ((pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def tokenizer_model() -> tuple[Any, str]:
    """The loaded checkpoint's model handle (for its tokenizer only), or None and the reason."""
    try:
        return host_model.borrow(), ""
    except Exception as e:  # no model loaded, Forge, lowvram: the preview still shows images
        return None, f"token ids need the loaded checkpoint: {e}"


def find(seq: list[int], sub: list[int]) -> list[int]:
    """Start indices of `sub` in `seq`."""
    n = len(sub)
    return [i for i in range(len(seq) - n + 1) if n and seq[i:i + n] == sub]


def token_ids_html(model: Any, prompt: str, token_ids: list[int]) -> str:
    ids = model.tokenize(prompt)
    pieces = model.decode_tokens(ids)
    marked = set()
    for start in find(ids, token_ids):
        marked.update(range(start, start + len(token_ids)))
    spans = "".join(
        f'<span class="{"ti-token" if i in marked else ""}" title="id {t}">{html.escape(p)}<sub>{t}</sub></span>'
        for i, (t, p) in enumerate(zip(ids, pieces))
    )
    warn = "" if marked else ' <b class="ti-trainer-error">token not in this prompt</b>'
    return f'<div class="ti-trainer-token-ids">{spans}</div><small>{len(ids)} tokens ({-(-len(ids) // CHUNK) or 1} ' \
           f"chunk(s) of {CHUNK}){warn}</small>"


def preview(form: dict[str, Any], count: Any) -> tuple[list, str]:
    """(gallery value, HTML table). Errors name the field, as the Train button does."""
    values = {k: v for k, v in to_config_values(form, _embeddings_dir()).items() if k not in UI_FIXED}
    if job.host_clip_skip(values):
        values.pop("clip_skip", None)
    try:
        cfg = TrainConfig.from_dict(values)
    except ConfigError as e:
        relevant = {k: v for k, v in e.errors.items() if k not in ("learning_rate", "optimizer_type")}
        if relevant:
            return [], errors_html(relevant)
        cfg = TrainConfig.from_dict({**values, "learning_rate": "1e-3", "optimizer_type": "AdamW"})
    try:
        n = max(1, min(MAX_IMAGES, int(count or 8)))
    except (TypeError, ValueError):
        n = 8
    try:
        scan = data.scan(prepare.dataset_spec(cfg))
    except prepare.PrepareError as e:
        return [], errors_html({e.field: str(e)})
    except data.DataError as e:
        return [], errors_html({"dataset_config" if cfg.dataset_config else "train_data_dir": str(e)})
    try:
        templates = data.load_template(cfg.template_file) if cfg.template_file else None
        prompts = data.PromptBuilder(cfg.token_string, prepare.prompt_mode(cfg), templates)
    except (OSError, data.DataError) as e:
        return [], errors_html({"template_file": str(e)})

    model, why = tokenizer_model()
    token_ids: list[int] = []
    head = []
    if model is not None:
        token_ids = model.tokenize(cfg.token_string)
        pieces = " ".join(html.escape(p) for p in model.decode_tokens(token_ids))
        head.append(f"<p>Token <code>{html.escape(cfg.token_string)}</code> is ids "
                    f"<code>{token_ids}</code> ({pieces}); highlighted below where the prompts name it.</p>")
    else:
        head.append(message_html(why, "info"))

    items = scan.items
    reg = sum(1 for it in items if it.subset.is_reg)
    buckets = Counter(f"{it.bucket[0]}x{it.bucket[1]}" for it in items)
    head.append(f"<p>{len(items)} image(s), {reg} regularization; buckets (w x h): "
                + ", ".join(f"{b}: {c}" for b, c in sorted(buckets.items())) + "</p>")
    if scan.skipped:
        skipped = "".join(f"<li>{html.escape(p)}: {html.escape(r)}</li>" for p, r in scan.skipped)
        head.append(f"<details><summary>{len(scan.skipped)} skipped</summary><ul>{skipped}</ul></details>")

    rng = random.Random(cfg.seed if cfg.seed >= 0 else 0)
    gallery, rows = [], []
    for i, it in enumerate(items[:n]):
        flip = bool(it.subset.flip_aug) and rng.random() < 0.5  # per subset, as training does
        pixels, _size = data.load_pixels(it, rng, flip=flip)
        name = os.path.basename(it.path)
        gallery.append((to_image(pixels), f"{name} {it.bucket[0]}x{it.bucket[1]}{' flipped' if flip else ''}"))
        prompt = prompts.build(it, rng)
        ids = token_ids_html(model, prompt, token_ids) if model is not None else ""
        kind = " (reg)" if it.subset.is_reg else ""
        rows.append(f"<tr><td>{i + 1}</td><td>{html.escape(name)}{kind}<br><small>{it.size[0]}x{it.size[1]} &rarr; "
                    f"{it.bucket[0]}x{it.bucket[1]}</small></td><td>{html.escape(prompt)}{ids}</td></tr>")
    table = ('<table class="ti-trainer-dataset"><tr><th>#</th><th>image</th><th>prompt and token ids</th></tr>'
             + "".join(rows) + "</table>")
    return gallery, "".join(head) + table

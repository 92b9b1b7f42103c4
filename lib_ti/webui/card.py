"""The host's Extra Networks card for a finished embedding: a picture and the training facts.

A1111 v1.10.1 (modules/ui_extra_networks.py `find_preview`) shows `<file>.<ext>` or
`<file>.preview.<ext>` beside an embedding as its card picture, and reads the card's description
and notes from the user-metadata file `<file>.json` (modules/extra_networks.py
`get_user_metadata`), which its card editor rewrites keeping every other key. We write
`<name>.preview.png` (the run's last preview, else one fresh render) and `<name>.json`, each only
where no file of the user's own is: both carry a mark saying we wrote them, so a later run may
replace ours but never the user's (a preview set with "Replace preview", a description edited in
the card editor).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from PIL import Image, PngImagePlugin

from lib_ti.config import TrainConfig
from lib_ti.embedding import Embedding
from lib_ti.webui import host

log = logging.getLogger("lib_ti")

MARK = "ti_trainer"  # PNG text key and JSON key that say "written by this extension"
PREVIEW_EXTS = ("png", "jpg", "jpeg", "webp", "gif")  # ui_extra_networks.default_allowed_preview_extensions


def write_card(task: Any, emb: Embedding, path: str, cfg: TrainConfig | None = None,
               preview: dict[str, Any] | None = None, step: int | None = None) -> list[str]:
    """Called after `path` was published and loaded. Never raises: a card is a nicety, the run's
    result stands without it. Returns what it wrote (or why not), for the task's notes.
    `step`: a published checkpoint's card, pictured by that step's preview only (never a render:
    a run may hold the model)."""
    base = os.path.splitext(path)[0]
    name = os.path.basename(base)
    notes = []
    for what, fn in (("preview", lambda: _preview(task, base, name, cfg, preview, step)),
                     ("metadata", lambda: _metadata(base, name, emb, cfg))):
        try:
            notes.append(fn())
        except Exception as e:  # (reported, never fatal)
            log.warning("card %s for %s not written: %s", what, name, e)
            notes.append(f"card {what} not written: {type(e).__name__}: {e}")
    _refresh_cards()
    return [n for n in notes if n]


# ---------------------------------------------------------------- the picture


def _ours_png(file: str) -> bool:
    try:
        with Image.open(file) as im:
            return MARK in getattr(im, "text", {})
    except Exception:  # (unreadable: not ours to replace)
        return False


def _preview(task: Any, base: str, name: str, cfg: TrainConfig | None, preview: dict[str, Any] | None,
             step: int | None = None) -> str:
    target = f"{base}.preview.png"
    existing = [f for ext in PREVIEW_EXTS for f in (f"{base}.{ext}", f"{base}.preview.{ext}") if os.path.isfile(f)]
    if existing and not (existing == [target] and _ours_png(target)):
        return f"card picture: kept the existing {os.path.basename(existing[0])}"
    shots = [(s, p) for s, p in (task.previews if task is not None else []) if step is None or s == step]
    last = shots[-1] if shots else None
    if last is not None:
        with Image.open(last[1]) as im:
            image, source = im.copy(), f"the preview of step {last[0]}"
    elif step is not None:
        return f"card picture: none, the run rendered no preview at step {step}"
    else:
        if task is not None and (task.stop or host.stop_requested()):
            return ""  # an interrupted run: a render now would stop at once
        image, source = _render(name, cfg, preview), "a fresh render"
        if image is None:
            return ""
    info = PngImagePlugin.PngInfo()
    for k, v in getattr(image, "text", {}).items():  # keep the host's infotext ("parameters")
        if k != MARK:
            info.add_text(k, v)
    info.add_text(MARK, source)
    tmp = target + ".tmp"
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, target)
    return f"card picture: {source}"


def _render(name: str, cfg: TrainConfig | None, preview: dict[str, Any] | None) -> Image.Image | None:
    """One txt2img with the published file (the host has reloaded it), at the preview settings the
    run was given, else at the training size: a card needs no more than that."""
    p = dict(preview or {})
    if not p.get("prompt"):
        p["prompt"] = f"a photo of {name}"
    if cfg is not None and not (p.get("width") and p.get("height")):
        p["width"], p["height"] = cfg.resolution_wh()
    p.setdefault("seed", cfg.seed if cfg is not None and cfg.seed >= 0 else 0)
    image = host.render_preview(**{k: v for k, v in p.items() if v is not None})
    return image


# ---------------------------------------------------------------- the facts


def facts(emb: Embedding, name: str, cfg: TrainConfig | None = None) -> dict[str, Any]:
    token = emb.metadata.get("token") or (cfg.token_string if cfg is not None else None) or name
    out: dict[str, Any] = {"token": token, "vectors": emb.num_vectors, "step": emb.step,
                           "sd_checkpoint": emb.sd_checkpoint, "sd_checkpoint_name": emb.sd_checkpoint_name}
    if cfg is not None:
        out.update(init_word=cfg.init_word, learning_rate=cfg.learning_rate, resolution=cfg.resolution)
    return out


def describe(f: dict[str, Any]) -> str:
    ckpt = f["sd_checkpoint_name"] or "an unknown checkpoint"
    if f["sd_checkpoint"]:
        ckpt += f" [{f['sd_checkpoint']}]"
    vec = f"{f['vectors']} vector" + ("s" if f["vectors"] != 1 else "")
    return f"Textual Inversion '{f['token']}': {vec}, {f['step']} training steps on {ckpt}."


def _metadata(base: str, name: str, emb: Embedding, cfg: TrainConfig | None) -> str:
    """`<name>.json`: description + notes for the card and its editor; our facts under MARK. A file
    without MARK is the user's and stays as it is; in ours, a description or notes the user edited
    since we wrote them (they differ from what MARK records) are kept, only the facts change."""
    target = f"{base}.json"
    f = facts(emb, name, cfg)
    desc = describe(f)
    notes = "\n".join(f"{k}: {v}" for k, v in f.items() if v is not None) + "\ntrained with sd-webui-ti-trainer"
    data: dict[str, Any] = {}
    if os.path.isfile(target):
        try:
            with open(target, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return f"card metadata: kept {os.path.basename(target)} (not readable as ours)"
        if not isinstance(data, dict) or not isinstance(data.get(MARK), dict):
            return f"card metadata: kept the user's {os.path.basename(target)}"
    was = data.get(MARK, {})
    for key, value in (("description", desc), ("notes", notes)):
        if key not in data or data[key] == was.get(key):
            data[key] = value
    data[MARK] = {**f, "description": desc, "notes": notes}
    tmp = target + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=4, ensure_ascii=False)
    os.replace(tmp, target)
    return f"card metadata: {os.path.basename(target)}"


def _refresh_cards() -> None:
    """The Textual Inversion page caches directory listings (MassFileLister) until its next full
    refresh; drop them so the next card render (refresh button, single-card refresh) sees the files."""
    try:
        from modules import ui_extra_networks
    except Exception:  # (a host without Extra Networks pages: nothing to refresh)
        return
    for page in getattr(ui_extra_networks, "extra_pages", []):
        lister = getattr(page, "lister", None)
        if getattr(page, "name", "") == "textual inversion" and lister is not None:
            lister.reset()

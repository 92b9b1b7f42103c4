"""GET /ti-trainer/v1/inspect/{name}: what an embedding file in the embeddings folder holds, without
trusting it. Its size is judged from the file, the safetensors header or the zip directory
before anything is loaded (lib_ti/preflight.py), the pickle loader runs no code, and the answer
is a summary: vector norms as min/mean/max per slot, short metadata, paths relative to the
embeddings folder."""

from __future__ import annotations

import math
import os
from typing import Any

from fastapi import HTTPException

from lib_ti import formats, preflight
from lib_ti.webui import api_checks, api_paths

MAX_META_ITEMS = 50
MAX_META_TEXT = 500


def inspect(name: str) -> dict[str, Any]:
    why = api_paths.bad_name(name) or ("is not valid Unicode text" if api_checks.bad_value(name) else None)
    if why:
        raise api_checks.unprocessable({("name",): why}, where="path")
    path = api_paths.find_embedding(name)
    if path is None:
        raise HTTPException(status_code=404, detail=f"no embedding '{name}' in the embeddings folder")
    partner, _ = formats.partner_path(path)
    for p in (path, partner):
        why = preflight.embedding_file_problem(p) if p == path or os.path.isfile(p) else None
        if why:
            raise HTTPException(status_code=422, detail=f"cannot inspect {api_paths.shown(p)}: it {why}")
    try:
        info = formats.inspect_embedding(path)
    except (OSError, formats.FormatError, ValueError, TypeError, OverflowError, RuntimeError) as e:
        # ValueError: e.g. a 'step' of 5000 digits; RuntimeError: torch refusing a broken file
        text = api_checks.clean_message(str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise HTTPException(status_code=422, detail=f"cannot read {api_paths.shown(path)}: {text}") from None
    return summary(info)


def summary(info: dict[str, Any]) -> dict[str, Any]:
    norms = info.get("norms")
    out = {
        "path": api_paths.shown(info.get("path")),
        "files": [api_paths.shown(f) for f in info.get("files", [])],
        "format": info.get("format"), "family": info.get("family"), "num_vectors": info.get("num_vectors"),
        "width": info.get("width"),
        "norms": ({k: _stats(v) for k, v in norms.items()} if isinstance(norms, dict) else _stats(norms)),
        "step": _int_or_none(info.get("step")), "name": _text(info.get("name")),
        "sd_checkpoint": _text(info.get("sd_checkpoint")), "sd_checkpoint_name": _text(info.get("sd_checkpoint_name")),
    }
    meta = info.get("metadata") or {}
    out["metadata"] = {_text(k): _text(v) for k, v in list(meta.items())[:MAX_META_ITEMS]}
    return out


def _stats(values: Any) -> dict[str, Any]:
    """min/mean/max of the per-vector norms; nan/inf are shown as text (worth seeing in a broken file)."""
    vals = [float(v) for v in (values.tolist() if hasattr(values, "tolist") else values or [])]
    if not vals:
        return {"count": 0}
    finite = [v for v in vals if math.isfinite(v)]
    stats: dict[str, Any] = {"count": len(vals)}
    if finite:
        stats.update(min=min(finite), mean=sum(finite) / len(finite), max=max(finite))
    if len(finite) != len(vals):
        stats["not_finite"] = len(vals) - len(finite)
    return stats


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**63 else None


def _text(v: Any) -> str | None:
    if v is None:
        return None
    try:
        text = str(v)
    except ValueError:  # an int too long to print
        return "(too long)"
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= MAX_META_TEXT else text[: MAX_META_TEXT - 3] + "..."

"""Submit-time checks of a train request that are not path policy: the body itself, the preview
options, and the queue limit (429). What the run would find before its first step is checked by
submit_checks.py, shared with the tab. Every other problem becomes a 422 naming its field,
whatever the JSON holds."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import HTTPException

from lib_ti.config import TrainConfig
from lib_ti.config_compat import INVOKEAI_ALIASES, INVOKEAI_ONLY
from lib_ti.preflight import PREVIEW_RANGES, preview_value_problem
from lib_ti.webui import api_paths, job
from lib_ti.webui.tasks import REGISTRY

PREVIEW_TYPES = {"prompt": str, "negative_prompt": str, "sampler_name": str, "steps": int,
                 "cfg_scale": float, "seed": int, "width": int, "height": int}
MAX_WAITING = 16  # runs queued or running at once; more is 429
MAX_MESSAGE = 300

Loc = tuple


def unprocessable(errors: dict[Loc, str], where: str = "body") -> HTTPException:
    """422 in the shape of FastAPI's own validation errors, so clients handle both alike. Messages
    are cut short and made encodable (a lone surrogate would break the JSON response)."""
    detail = [{"loc": [where, *[clean_message(x) for x in loc]], "msg": clean_message(msg), "type": "value_error"}
              for loc, msg in errors.items()]
    return HTTPException(status_code=422, detail=detail)


def clean_message(msg: str) -> str:
    msg = api_paths.redact(str(msg)).encode("utf-8", "replace").decode("utf-8")
    return msg if len(msg) <= MAX_MESSAGE else msg[: MAX_MESSAGE - 3] + "..."


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request, or 422."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, an int of more than 4300 digits
        raise unprocessable({(): "the body is not valid JSON"}) from None
    if not isinstance(body, dict):
        raise unprocessable({(): "the body must be a JSON object of training options"})
    return body


def bad_value(v: Any) -> str | None:
    """Values no field can take, found before anything converts them."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid Unicode text"
    elif isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 2**63:
        return "number is too large"
    elif isinstance(v, float) and not math.isfinite(v):
        return "must be a finite number"
    elif isinstance(v, (list, dict)):
        items = v.values() if isinstance(v, dict) else v
        if isinstance(v, dict) and any(bad_value(k) for k in v):
            return "is not valid Unicode text"
        return next((why for why in map(bad_value, items) if why), None)
    return None


def screen(values: dict[str, Any]) -> tuple[dict[str, Any], dict[Loc, str]]:
    out, errors = {}, {}
    fields = set(TrainConfig.field_names())
    for key, v in values.items():
        if bad_value(key):
            errors[("?",)] = "an option name is not valid Unicode text"
        elif key in INVOKEAI_ONLY and key not in fields:
            # InvokeAI's names are translated inside TrainConfig, after the path and host-field rules
            # here: refused, so `model`/`resume_from_checkpoint` cannot name what those rules forbid
            ours = INVOKEAI_ALIASES.get(key)
            errors[(key,)] = ("is an InvokeAI option name, read only from CLI configs; the API takes this "
                              "trainer's names" + (f" (here: {ours})" if ours else ""))
        elif key == "preview" and isinstance(v, dict) and not any(bad_value(k) for k in v):
            out[key] = v  # check_preview names the bad key itself
        elif bad_value(v):
            errors[(key,)] = bad_value(v)
        else:
            out[key] = v
    return out, errors


def check_preview(preview: Any) -> tuple[dict[str, Any] | None, dict[Loc, str]]:
    if preview is None:
        return None, {}
    if not isinstance(preview, dict):
        return None, {("preview",): "must be an object"}
    out, errors = {}, {}
    for key, value in preview.items():
        kind = PREVIEW_TYPES.get(key)
        if kind is None or key not in job.PREVIEW_KEYS:
            errors[("preview", key)] = f"unknown preview option; use {', '.join(job.PREVIEW_KEYS)}"
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and isinstance(value, int) and abs(value) >= 2**63:
            errors[("preview", key)] = "number is too large"
        elif kind is str and not isinstance(value, str):
            errors[("preview", key)] = "expected text"
        elif kind is str and bad_value(value):
            errors[("preview", key)] = bad_value(value)
        elif kind is not str and (not number or not math.isfinite(value) or (kind is int and value != int(value))):
            errors[("preview", key)] = f"expected a {'whole ' if kind is int else ''}number"
        elif key in PREVIEW_RANGES and (why := preview_value_problem(key, value)):
            errors[("preview", key)] = why
        else:
            out[key] = kind(value)
    return out, errors


def busy_with(name: str) -> str | None:
    """Two queued runs of one name would both pass the exists-check and the later one would
    overwrite the earlier one's file; refuse the second while the first is queued or running."""
    for t in REGISTRY.all():
        if t.name == name and t.status in ("queued", "running"):
            return f"a run writing '{name}' is already {t.status} ({t.id}); wait for it or pick another name"
    return None


def check_queue() -> None:
    waiting = sum(t.status in ("queued", "running") for t in REGISTRY.all())
    if waiting >= MAX_WAITING:
        raise HTTPException(status_code=429, detail=f"{waiting} runs are queued or running (at most "
                            f"{MAX_WAITING}); wait for some to finish", headers={"Retry-After": "60"})

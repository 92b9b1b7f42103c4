"""Submit-time checks of a train request that are not path policy: the body itself, the preview
options, what the run would find before its first step (lib_ti/preflight.py, shared with the
tab), and the queue limit (429). Every other problem becomes a 422 naming its field, whatever
the JSON holds."""

from __future__ import annotations

import json
import logging
import math
import traceback
from typing import Any

from fastapi import HTTPException

from lib_ti import preflight
from lib_ti.config import TrainConfig
from lib_ti.config_compat import INVOKEAI_ALIASES, INVOKEAI_ONLY
from lib_ti.webui import api_paths, job
from lib_ti.webui.tasks import REGISTRY

log = logging.getLogger("lib_ti")

PREVIEW_TYPES = {"prompt": str, "negative_prompt": str, "sampler_name": str, "steps": int,
                 "cfg_scale": float, "seed": int, "width": int, "height": int}
PREVIEW_RANGES = {"steps": (1, 150), "cfg_scale": (0.0, 30.0), "seed": (-1, 2**32 - 1),
                  "width": (64, 2048), "height": (64, 2048)}
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
        elif key in PREVIEW_RANGES and not PREVIEW_RANGES[key][0] <= value <= PREVIEW_RANGES[key][1]:
            errors[("preview", key)] = f"{value} is out of range {PREVIEW_RANGES[key][0]}..{PREVIEW_RANGES[key][1]}"
        elif key in ("width", "height") and int(value) % 8:
            errors[("preview", key)] = f"{value} is not a multiple of 8"
        else:
            out[key] = kind(value)
    return out, errors


def _model() -> Any:
    """The loaded model for the checks, or None (no model, --lowvram, ...): the run reports why."""
    from lib_ti.webui import host_model

    try:
        return host_model.borrow()
    except Exception:
        return None


def run_problems(cfg: TrainConfig, values: dict[str, Any]) -> dict[Loc, str]:
    """What the run would otherwise find only after it was queued (lib_ti/preflight.py)."""
    try:
        found = preflight.run_problems(cfg, _model())
        if not job.host_clip_skip(values):
            found.update(_clip_skip_problem(cfg.clip_skip))
    except Exception:  # a check that breaks must not turn a submit into a 500; the run will say it
        log.warning("TI trainer: a submit-time check failed:\n%s", traceback.format_exc())
        return {}
    return {(k,): v for k, v in found.items()}


def sample_prompt_problems(cfg: TrainConfig) -> dict[Loc, str]:
    """kohya's per-line preview options (--w 512 --s 30 ...) within the preview ranges, so a preview
    cannot fail or run for hours after the 202. Names the line and the option, never the value
    (the lines may come from a file)."""
    from lib_ti import sample_prompts

    if cfg.sample_every_n_steps <= 0 or not cfg.sample_prompts:
        return {}
    try:
        lines = sample_prompts.lines(cfg.sample_prompts)
    except (OSError, ValueError):  # unreadable: the policy check already said where it may be
        return {("sample_prompts",): "cannot be read as a prompts file"}
    for n, line in enumerate(lines, 1):
        options = {k: v for k, v in sample_prompts.parse_line(line).items() if k in PREVIEW_RANGES}
        bad = [k for k, v in options.items() if not PREVIEW_RANGES[k][0] <= v <= PREVIEW_RANGES[k][1]
               or (k in ("width", "height") and v % 8)]
        if bad:
            ranges = ", ".join(f"{k} {PREVIEW_RANGES[k][0]}..{PREVIEW_RANGES[k][1]}" for k in bad)
            return {("sample_prompts",): f"line {n}: preview options out of range ({ranges}; sizes multiples of 8)"}
    return {}


def _clip_skip_problem(clip_skip: int) -> dict[str, str]:
    """SD1's clip skip indexes the text encoder's hidden states: no more than it has layers."""
    from lib_ti.webui import host_model

    try:
        m = host_model.sd_model()
        if host_model.family_of(m) != "sd1":
            return {}  # SD2 and SDXL ignore it, as the host does
        layers = int(m.cond_stage_model.wrapped.transformer.config.num_hidden_layers)
    except Exception:  # another text encoder layout: the run reports a bad value itself
        return {}
    if clip_skip > layers:
        return {"clip_skip": f"{clip_skip} is more than the {layers} layers of the loaded text encoder"}
    return {}


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

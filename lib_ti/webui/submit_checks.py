"""The submit-time checks the tab and the HTTP API share, run on a config `job.make_config` built:
what the run would otherwise find only after it was queued (lib_ti/preflight.py: the name as a
file name, the optimizer arguments, the weights file, and with the loaded model the token, init
word, weights width, images, template and captions), the per-line options of `sample_prompts`, and
SD1's clip skip against the loaded text encoder. Field names as keys; each front end words the
answer its own way (a 422, the tab's list of labelled fields)."""

from __future__ import annotations

import logging
import traceback
from typing import Any

from lib_ti import preflight
from lib_ti.config import TrainConfig

log = logging.getLogger("lib_ti")


def problems(cfg: TrainConfig, clip_skip_from_host: bool) -> dict[str, str]:
    """Every problem found, by field. `clip_skip_from_host`: no clip_skip was given (job.host_clip_skip)."""
    found = preflight.sample_prompt_problems(cfg)
    try:
        found.update(preflight.run_problems(cfg, _model()))
        if not clip_skip_from_host:
            found.update(_clip_skip_problem(cfg.clip_skip))
    except Exception:  # a check that breaks must not block a submit (or be a 500); the run will say it
        log.warning("TI trainer: a submit-time check failed:\n%s", traceback.format_exc())
    return found


def _model() -> Any:
    """The loaded model for the checks, or None (no model, --lowvram, ...): the run reports why."""
    from lib_ti.webui import host_model

    try:
        return host_model.borrow()
    except Exception:
        return None


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

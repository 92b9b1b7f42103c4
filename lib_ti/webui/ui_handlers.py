"""What the tab's buttons do. Each handler is a short function over job.py and the task registry
that returns display values; gradio wiring stays in tab.py, so these are testable without a browser."""

from __future__ import annotations

import html
import logging
import os
import threading
import traceback
from collections.abc import Callable
from typing import Any

import gradio as gr

from lib_ti.config import ConfigError
from lib_ti.preflight import PREVIEW_RANGES, preview_value_problem
from lib_ti.webui import host_model, job, plot
from lib_ti.webui.tasks import REGISTRY, Task
from lib_ti.webui.ui_form import LABELS, NEW_EMBEDDING, PREVIEW_LABELS, list_embeddings, to_config_values

log = logging.getLogger("lib_ti")

# Ids whose Interrupt came while they were still waiting for the queue lock: no task exists yet.
_cancelled: set[str] = set()
_cancel_lock = threading.Lock()


# ---------------------------------------------------------------- HTML pieces

def errors_html(errors: dict[str, str], title: str = "Please fix these options") -> str:
    """Every bad field with its label; data-field lets the JS mark the inputs themselves."""
    items = "".join(
        f'<li data-field="{html.escape(k)}"><b>{html.escape(LABELS.get(k) or PREVIEW_LABELS.get(k, k))}</b> '
        f"<code>{html.escape(k)}</code>: {html.escape(v)}</li>"
        for k, v in errors.items()
    )
    return f'<div class="ti-trainer-error error"><p>{html.escape(title)}:</p><ul>{items}</ul></div>'


def message_html(text: str, kind: str = "error") -> str:
    return f'<div class="ti-trainer-{kind}{" error" if kind == "error" else ""}">{html.escape(text)}</div>'


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    return f"ETA {s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"ETA {s // 60}:{s % 60:02d}"


def status_html(task: Task | None) -> str:
    if task is None:
        return '<div class="ti-trainer-status ti-trainer-muted">No run yet.</div>'
    parts = [f"<b>{html.escape(task.name)}</b>", html.escape(task.status)]
    if task.max_steps:
        parts.append(f"step {task.step}/{task.max_steps}")
    if task.loss is not None:
        parts.append(f"loss {task.loss:.4f}")
    if task.val_loss is not None:
        parts.append(f"val {task.val_loss:.4f}")
    if task.status == "running" and task.eta_s is not None:
        parts.append(_eta(task.eta_s))
    line = " · ".join(parts)
    extra = ""
    if task.message:
        extra += f'<div class="ti-trainer-message">{html.escape(task.message)}</div>'
    if task.output and task.status in ("done", "interrupted"):
        extra += f'<div>Saved <code>{html.escape(task.output)}</code></div>'
    if task.error:
        extra += message_html(task.error)
    if task.recovery:
        extra += (f'<div class="ti-trainer-recovery">The trained vectors are kept in <code>{html.escape(task.recovery)}'
                  "</code>: resume from it, or copy it into the embeddings folder.</div>")
    if task.notes:
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in task.notes)
        extra += f"<details><summary>{len(task.notes)} note(s)</summary><ul>{notes}</ul></details>"
    return (f'<div class="ti-trainer-status" data-status="{html.escape(task.status)}" '
            f'data-step="{task.step}">{line}{extra}</div>')


def load_check_html(task: Task | None) -> str:
    if task is None or not task.load_check:
        return ""
    ok = task.load_check.startswith("ok")
    cls = "ti-trainer-ok" if ok else "ti-trainer-error error"
    return f'<div class="{cls}">Host load check: {html.escape(task.load_check)}</div>'


# ---------------------------------------------------------------- train / interrupt

def find_task(task_id: str | None) -> Task | None:
    """The run this page started, else the newest run (an API run, or one from another page)."""
    task = REGISTRY.get(task_id) if task_id else None
    return task or REGISTRY.latest()


def _was_cancelled(id_task: str) -> bool:
    with _cancel_lock:
        if id_task in _cancelled:
            _cancelled.discard(id_task)
            return True
        return False


def _end_progress(id_task: str) -> None:
    """A submit refused before the queue never reaches wrap_gradio_gpu_call: mark its id finished,
    so the host's progress bar ends now instead of waiting out its inactivity timeout."""
    try:
        from modules import progress

        progress.finish_task(id_task)
    except Exception:  # (a host without it: the bar ends by its timeout)
        pass


Locked = Callable[[str, dict[str, Any], dict[str, Any] | None], tuple[Any, str]]


def start(id_task: str, form: dict[str, Any], preview: dict[str, Any] | None, locked: Locked,
          own_preview: bool = True) -> tuple[Any, str]:
    """The Train button: every check the API makes (job.ui_check) at once, before waiting for the
    queue, so a problem is listed now and nothing is queued; then `locked` (train() behind
    wrap_gradio_gpu_call) while the name stays held for this id. `own_preview`: the preview
    settings are the tab's own fields (not the txt2img tab's), checked under their labels."""
    keep = gr.update()
    if _was_cancelled(id_task):
        _end_progress(id_task)
        return keep, message_html("Interrupted before the run started.", "info")
    bad_preview = preview_problems(preview) if own_preview else {}
    try:
        cfg = job.ui_check(id_task, to_config_values(form, _embeddings_dir()))
    except ConfigError as e:
        _end_progress(id_task)
        return keep, errors_html({**e.errors, **bad_preview})
    except Exception as e:  # outside the host's wrapper: say it here rather than a bare gradio "Error"
        log.error("TI trainer: checking the options failed:\n%s", traceback.format_exc())
        _end_progress(id_task)
        return keep, message_html(f"Could not check the options: {type(e).__name__}: {e}")
    try:
        if bad_preview:
            _end_progress(id_task)
            return keep, errors_html(bad_preview)
        return locked(id_task, form, preview)
    finally:
        job.unreserve(cfg, id_task)  # a run that never started (Interrupt while waiting, a refusal)


def preview_problems(preview: dict[str, Any] | None) -> dict[str, str]:
    """The preview settings in the ranges a render accepts (the API's `preview` ranges), keyed as
    the tab's preview fields; a bad one would otherwise fail the run at its first preview."""
    errors = {}
    for key in PREVIEW_RANGES:
        value = (preview or {}).get(key)
        if value is None:
            if preview and key in preview:
                errors[f"preview_{key}"] = "is empty"
            continue
        why = preview_value_problem(key, value)
        if why:
            errors[f"preview_{key}"] = why
    return errors


def train(id_task: str, form: dict[str, Any], preview: dict[str, Any] | None) -> tuple[Any, str]:
    """The Train button's body (under the host's queue lock): (status HTML or no change, error HTML)."""
    keep = gr.update()
    if _was_cancelled(id_task):
        return keep, message_html("Interrupted before the run started.", "info")
    values = to_config_values(form, _embeddings_dir())
    try:
        task = job.ui_train(id_task, values, preview)  # validates first: every bad field, the token too
    except ConfigError as e:
        return keep, errors_html(e.errors)
    if task.status == "failed":
        return status_html(task), message_html(f"Training failed: {task.error}")
    return status_html(task), ""


def interrupt(task_id: str | None) -> str:
    """Stop and save. A run that is still waiting for the queue lock has no task yet: remember its
    id so it ends as soon as it gets the lock instead of training."""
    task = REGISTRY.get(task_id) if task_id else None
    if task is None:
        running = [t for t in REGISTRY.all() if t.status in ("queued", "running")]
        task = running[0] if running else None
    if task is not None and job.interrupt(task.id):
        return message_html(f"Stopping {task.name}: it saves what it has learned.", "info")
    if task_id and REGISTRY.get(task_id) is None:
        with _cancel_lock:
            _cancelled.add(task_id)
        return message_html("Interrupted before the run started.", "info")
    return message_html("No run to interrupt.", "info")


# ---------------------------------------------------------------- live view

def refresh(task_id: str | None, seen: dict[str, Any] | None) -> tuple:
    """The live view: (status, plot, norms, load check, gallery, checkpoints, seen).
    The gallery and the checkpoint list are only re-sent when they changed, so a poll every
    1.5 s neither reloads images nor resets the user's choice in the dropdown."""
    task = find_task(task_id)
    seen = dict(seen or {})
    if task is None:
        return (status_html(None), plot.loss_svg([], []), plot.norms_table({}), "", gr.update(), gr.update(), seen)
    gallery = gr.update()
    checkpoints = gr.update()
    if seen.get("previews") != [task.id, len(task.previews)]:
        gallery = [(path, f"step {step}") for step, path in task.previews]
    if seen.get("checkpoints") != [task.id, len(task.checkpoints), task.output]:
        names = [os.path.basename(p) for _s, p in task.checkpoints]  # publish() finds the path again
        checkpoints = gr.update(choices=names, value=names[-1] if names else None)
    seen.update(previews=[task.id, len(task.previews)], checkpoints=[task.id, len(task.checkpoints), task.output])
    return (status_html(task), plot.loss_svg(task.losses, task.val_losses), plot.norms_table(task.norms),
            load_check_html(task), gallery, checkpoints, seen)


def checkpoint_of(name: str) -> tuple[Task, str] | None:
    """A checkpoint file name from the dropdown -> the newest run that wrote it, and its path."""
    for task in REGISTRY.all():
        for _step, path in reversed(task.checkpoints):
            if os.path.basename(path) == name:
                return task, path
    return None


def publish(name: str | None, overwrite: bool) -> str:
    if not name:
        return message_html("Pick a checkpoint first.")
    found = checkpoint_of(name)
    if found is None:
        return message_html(f"{name} is not a checkpoint of a recent run.")
    task, checkpoint = found
    try:
        dest, card_notes = job.publish_checkpoint(checkpoint, overwrite=bool(overwrite), task=task)
    except job.NameBusy as e:
        return message_html(str(e))
    except FileExistsError as e:
        return message_html(f"{e}; tick 'Replace a published file' to replace it.")
    except OSError as e:
        return message_html(f"Could not publish: {e}")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in card_notes)
    return message_html(f"Published as {dest}", "ok") + (f"<ul>{notes}</ul>" if notes else "")


def embedding_choices() -> list[str]:
    """The embeddings folder, then this session's checkpoints and recovery files (full paths), so
    an interrupted or failed run can be resumed from where it stopped."""
    recent = []
    for task in REGISTRY.all():
        for path in [task.recovery, *(p for _s, p in reversed(task.checkpoints))]:
            if path and path not in recent and os.path.isfile(path):
                recent.append(path)
    return [NEW_EMBEDDING, *list_embeddings(_embeddings_dir()), *recent]


def _embeddings_dir() -> str | None:
    try:
        return host_model.embeddings_dir()
    except Exception:  # a host without an embeddings folder: resume takes a full path only
        return None


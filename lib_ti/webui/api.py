"""HTTP routes under /ti-trainer/v1, added by on_app_started when the host runs its own API
(--api or --nowebui): start a run (it queues behind the host's queue lock like a UI job), poll it,
interrupt it, list runs, inspect an embedding file.

Who may call them: api_guard.py (--api-auth, origin, JSON bodies, body size). What a request may
name: api_paths.py (server-side folders). What is checked before 202: api_checks.py and
submit_checks.py (shared with the tab), each problem a 422 naming its field.

The models are plain pydantic BaseModels with defaults and optional fields only, which mean the same
under pydantic 1 (A1111, reForge) and 2 (Forge). The train body is not a model: TrainConfig
validates it, so the API accepts exactly what a TOML config does and reports every bad field.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from lib_ti.config import ConfigError
from lib_ti.webui import api_checks, api_guard, api_inspect, api_paths, job, submit_checks
from lib_ti.webui.api_checks import unprocessable
from lib_ti.webui.tasks import REGISTRY, Task

PREFIX = "/ti-trainer/v1"


class Submitted(BaseModel):
    task_id: str


class TaskInfo(BaseModel):
    task_id: str
    name: str = ""
    status: str = "queued"
    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    val_loss: float | None = None
    eta_s: float | None = None
    output: str | None = None
    error: str | None = None
    recovery: str | None = None  # where a failed run kept its vectors


class InterruptResult(BaseModel):
    task_id: str
    status: str
    stop_requested: bool


# ---------------------------------------------------------------- routes

_submit_lock = threading.Lock()
TRAIN_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "description": "training options by TrainConfig name (as in a TOML config), "
    "plus an optional 'preview' object"}}}}}


def _finite(x: Any) -> Any:
    """JSON has no NaN/inf and starlette refuses them; a diverged loss must not turn polls into 500s."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def task_info(task: Task) -> dict[str, Any]:
    info = {k: _finite(v) for k, v in task.public().items()}
    for key in ("output", "recovery"):  # relative to the embeddings folder or the WebUI data folder
        if key in info:
            info[key] = api_paths.shown(info[key])
    if info.get("error"):
        info["error"] = api_checks.clean_message(info["error"])
    return info


async def post_train(request: Request) -> Any:
    raw = await api_guard.json_body(request)
    return await run_in_threadpool(submit, raw)


def submit(raw: bytes) -> Any:
    """Every check that can run now runs now; 202 only for a run that should start."""
    values, errors = api_checks.screen(api_checks.parse_body(raw))
    preview, preview_errors = api_checks.check_preview(values.pop("preview", None))
    errors.update(preview_errors)
    prompt = api_paths.inline_prompt(values)
    if prompt and not (preview or {}).get("prompt"):
        preview = {**(preview or {}), "prompt": prompt}
    values, path_errors = api_paths.check_paths(values)
    errors.update(path_errors)
    try:  # also with errors: one answer names every bad field
        cfg = job.make_config({k: v for k, v in values.items() if (k,) not in errors})
    except ConfigError as e:
        for key, msg in e.errors.items():
            errors.setdefault((key,), msg)
        raise unprocessable(errors) from None
    if errors:
        raise unprocessable(errors)
    problems = submit_checks.problems(cfg, job.host_clip_skip(values))
    if problems:
        raise unprocessable({(k,): v for k, v in problems.items()})
    with _submit_lock:  # the limit, the name check and the queueing as one step
        api_checks.check_queue()
        busy = api_checks.busy_with(cfg.name)
        if busy is not None:
            raise unprocessable({("output_name" if cfg.output_name else "token_string",): busy})
        try:
            task = job.api_submit(values, preview, cfg)  # the config built once
        except ConfigError as e:  # the state changed since the check above (a file appeared)
            raise unprocessable({(k,): v for k, v in e.errors.items()}) from None
    return JSONResponse(status_code=202, content={"task_id": task.id})


def get_tasks() -> list[dict[str, Any]]:
    return [task_info(t) for t in REGISTRY.all()]  # newest first


def _task_or_404(task_id: str) -> Task:
    task = REGISTRY.get(task_id)
    if task is None:
        raise HTTPException(status_code=404, detail="no such task")
    return task


def get_task(task_id: str) -> dict[str, Any]:
    return task_info(_task_or_404(task_id))


def post_interrupt(task_id: str) -> dict[str, Any]:
    _task_or_404(task_id)
    ok = job.interrupt(task_id)
    task = _task_or_404(task_id)
    return {"task_id": task.id, "status": task.status, "stop_requested": ok}


def get_inspect(name: str) -> dict[str, Any]:
    return api_inspect.inspect(name)


def register(app: Any) -> None:
    """Add the routes to the host's FastAPI app when the host serves its own API (--api or
    --nowebui); every route carries the origin check and the --api-auth check (pitfall 20)."""
    if not api_guard.routes_enabled():
        return  # like /sdapi/v1: absent, so they answer as any unknown path does
    if any(getattr(r, "path", "").startswith(PREFIX + "/") for r in app.routes):
        return  # already on this app (a second on_app_started for the same app)
    deps = [Depends(api_guard.require_origin), Depends(api_guard.require_auth)]
    routes = [
        ("/train", post_train, "POST", Submitted, 202, TRAIN_BODY),
        ("/tasks", get_tasks, "GET", list[TaskInfo], 200, None),
        ("/tasks/{task_id}", get_task, "GET", TaskInfo, 200, None),
        ("/tasks/{task_id}/interrupt", post_interrupt, "POST", InterruptResult, 200, None),
        ("/inspect/{name}", get_inspect, "GET", None, 200, None),
    ]
    for path, fn, method, model, code, extra in routes:
        app.add_api_route(PREFIX + path, fn, methods=[method], response_model=model, status_code=code,
                          dependencies=deps, tags=["ti-trainer"], openapi_extra=extra)

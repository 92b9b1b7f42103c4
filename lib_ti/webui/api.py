"""HTTP routes under /ti-trainer/v1, added by on_app_started: start a run (it queues behind the
host's queue lock like a UI job), poll it, interrupt it, list runs, inspect an embedding file.

The models are plain pydantic BaseModels with defaults and optional fields only, which mean the same
under pydantic 1 (A1111, reForge) and 2 (Forge). The train body is not a model: TrainConfig
validates it, so the API accepts exactly what a TOML config does and reports every bad field.
"""

from __future__ import annotations

import base64
import math
import os
import secrets
import threading
from typing import Any

from fastapi import Body, Depends, HTTPException, Request
from pydantic import BaseModel

from lib_ti import formats
from lib_ti.config import ConfigError
from lib_ti.webui import host, host_model, job
from lib_ti.webui.tasks import REGISTRY, Task

PREFIX = "/ti-trainer/v1"
EMBEDDING_EXTS = (".safetensors", ".pt", ".bin")
# The host decides where the model comes from and where files go; a request must not.
HOST_DECIDES = ("output_dir", "pretrained_model_name_or_path", "device")
NAME_FIELDS = ("token_string", "output_name", "caption_extension")
PATH_FIELDS = (*NAME_FIELDS, "weights", "template_file", "sample_prompts", "train_data_dir", "reg_data_dir",
               "dataset_config")
PREVIEW_TYPES = {"prompt": str, "negative_prompt": str, "sampler_name": str, "steps": int,
                 "cfg_scale": float, "seed": int, "width": int, "height": int}
PREVIEW_RANGES = {"steps": (1, 150), "cfg_scale": (0.0, 30.0), "seed": (-1, 2**32 - 1),
                  "width": (64, 2048), "height": (64, 2048)}

Loc = tuple  # ('field',) or ('preview', 'key')


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


# ---------------------------------------------------------------- auth

def api_users() -> dict[str, str] | None:
    """None when --api-auth is off; else user -> password, parsed as the host does ("u:p,u2:p2").
    Read per request so a relaunch with other flags needs no re-registration."""
    from modules import shared

    raw = getattr(shared.cmd_opts, "api_auth", None)
    if not raw:
        return None
    users = {}
    for entry in str(raw).split(","):
        user, sep, password = entry.partition(":")  # the host splits on every ':'; we allow one in passwords
        if sep:
            users[user] = password
    return users  # set but malformed: {} locks every route rather than leaving them open


def basic_credentials(header: str) -> tuple[bytes, bytes] | None:
    """(user, password) from an `Authorization: Basic ...` header, or None. Parsed here rather than
    by fastapi's HTTPBasic, which answers 401 to a malformed header even when auth is off."""
    scheme, _, param = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(param.strip(), validate=True).partition(b":")
    except ValueError:  # binascii.Error is one
        return None
    return (user, password) if sep else None


def require_auth(request: Request) -> None:
    users = api_users()
    if users is None:
        return
    given = basic_credentials(request.headers.get("authorization", ""))
    ok = False
    if given is not None:
        for user, password in users.items():  # no early exit: timing tells nothing about which user matched
            ok |= secrets.compare_digest(given[0], user.encode()) & secrets.compare_digest(
                given[1], password.encode())
    if not ok:
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})


# ---------------------------------------------------------------- paths


def _inside(path: str, root: str) -> bool:
    """True when `path`, with every symlink resolved, lies within `root` (also resolved)."""
    try:
        real, base = os.path.realpath(path), os.path.realpath(root)
        return os.path.commonpath([real, base]) == base
    except ValueError:  # a NUL byte, or different drives on Windows
        return False


def bad_name(name: str) -> str | None:
    """Why `name` cannot be a bare file name, or None."""
    if any(c in name for c in ("/", "\\", "\0", ":")):
        return "must be a plain name without path separators or ':'"
    if ".." in name:
        return "must not contain '..'"
    return None


def _templates_dir() -> str | None:
    from modules import shared

    return getattr(shared.cmd_opts, "textual_inversion_templates_dir", None)


def check_paths(values: dict[str, Any]) -> tuple[dict[str, Any], dict[Loc, str]]:
    """Path rules for a train request. Returns the values to use (weights made absolute) and errors.
    Datasets may be anywhere (reading the user's data is the point); everything else we read must
    come from a dataset folder, the embeddings folder, the trainer's log folder or the host's
    template folder, and nothing we write is placed by the request."""
    values, errors = dict(values), {}
    for key in PATH_FIELDS:
        # numbers would become text in TrainConfig and slip past the rules below
        if values.get(key) is not None and not isinstance(values[key], str):
            errors[(key,)] = f"expected text, got {values.pop(key)!r}"
        elif "\0" in (values.get(key) or ""):
            errors[(key,)] = "must not contain a NUL character"
            del values[key]
    for key in HOST_DECIDES:
        if key in values:
            errors[(key,)] = "is decided by the host; not accepted from the API"
            del values[key]
    for key in NAME_FIELDS:
        v = values.get(key)
        if isinstance(v, str) and bad_name(v):
            errors[(key,)] = bad_name(v)

    read_roots = []
    for key in ("train_data_dir", "reg_data_dir"):
        v = values.get(key)
        if isinstance(v, str) and v:
            if os.path.isdir(v):
                read_roots.append(v)
            else:
                errors[(key,)] = f"folder '{v}' does not exist"
    v = values.get("dataset_config")
    if isinstance(v, str) and v:
        if os.path.isfile(v):
            read_roots.append(os.path.dirname(os.path.abspath(v)))
        else:
            errors[("dataset_config",)] = f"file '{v}' does not exist"
    if _templates_dir():
        read_roots.append(_templates_dir())

    v = values.get("weights")
    if isinstance(v, str) and v:
        emb_dir = host_model.embeddings_dir()
        path = os.path.abspath(os.path.join(emb_dir, v))  # a relative path means inside the embeddings folder
        log_root = os.path.join(host.data_dir(), "textual_inversion")
        if not (_inside(path, emb_dir) or _inside(path, log_root)):
            errors[("weights",)] = "must be a file in the embeddings folder or the trainer's log folder"
        elif not os.path.isfile(path):
            errors[("weights",)] = f"file '{v}' does not exist"
        else:
            values["weights"] = path

    v = values.get("template_file")
    if isinstance(v, str) and v:
        plain = not bad_name(v) and not os.path.isabs(v) and not os.path.exists(v)
        hosted = os.path.join(_templates_dir() or "", v)
        if plain and _templates_dir() and os.path.isfile(hosted):
            values["template_file"] = hosted  # a name from the host's templates, as its own API takes
        elif not plain and not any(_inside(v, root) for root in read_roots):
            # a path (any other plain name is a built-in template): read only from the allowed folders
            errors[("template_file",)] = "a template file must lie in the dataset folder or the host's templates"
        elif not plain and not os.path.isfile(v):
            errors[("template_file",)] = f"file '{v}' does not exist"

    v = values.get("sample_prompts")
    lines = [ln.strip() for ln in v.splitlines() if ln.strip()] if isinstance(v, str) else []
    # job.py reads a one-line value that names an existing file as a prompts file
    if len(lines) == 1 and os.path.isfile(lines[0]) and not any(_inside(lines[0], r) for r in read_roots):
        errors[("sample_prompts",)] = "a prompts file must lie in the dataset folder"
    return values, errors


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
        if kind is str and not isinstance(value, str):
            errors[("preview", key)] = f"expected text, got {value!r}"
        elif kind is not str and (not number or not math.isfinite(value) or (kind is int and value != int(value))):
            errors[("preview", key)] = f"expected a {'whole ' if kind is int else ''}number, got {value!r}"
        elif key in PREVIEW_RANGES and not PREVIEW_RANGES[key][0] <= value <= PREVIEW_RANGES[key][1]:
            errors[("preview", key)] = f"{value} is out of range {PREVIEW_RANGES[key][0]}..{PREVIEW_RANGES[key][1]}"
        elif key in ("width", "height") and int(value) % 8:
            errors[("preview", key)] = f"{value} is not a multiple of 8"
        else:
            out[key] = kind(value)
    return out, errors


def unprocessable(errors: dict[Loc, str], where: str = "body") -> HTTPException:
    """422 in the shape of FastAPI's own validation errors, so clients handle both alike."""
    detail = [{"loc": [where, *loc], "msg": msg, "type": "value_error"} for loc, msg in errors.items()]
    return HTTPException(status_code=422, detail=detail)


def find_embedding(name: str) -> str | None:
    """The file `name` (with or without extension) at any depth of the embeddings folder.
    Exact names beat case-insensitive ones, then shallower files, then .safetensors over .pt/.bin.
    Symlinks that lead out of the folder are ignored."""
    root = host_model.embeddings_dir()
    if not os.path.isdir(root):
        return None
    found = []
    for dirpath, _dirs, files in os.walk(root):  # followlinks=False: no walking out through a linked dir
        depth = os.path.relpath(dirpath, root).count(os.sep)
        for fn in files:
            stem, ext = os.path.splitext(fn)
            if ext.lower() not in EMBEDDING_EXTS:
                continue
            exact = name in (fn, stem)
            if exact or name.lower() in (fn.lower(), stem.lower()):
                found.append((not exact, depth, EMBEDDING_EXTS.index(ext.lower()), os.path.join(dirpath, fn)))
    for *_rank, path in sorted(found):
        if _inside(path, root) and os.path.isfile(path):
            return path
    return None


# ---------------------------------------------------------------- routes

_submit_lock = threading.Lock()
_BODY = Body(...)  # the whole JSON object; TrainConfig, not pydantic, checks its fields


def _finite(x: Any) -> Any:
    """JSON has no NaN/inf and starlette refuses them; a diverged loss must not turn polls into 500s."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def task_info(task: Task) -> dict[str, Any]:
    return {k: _finite(v) for k, v in task.public().items()}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # "nan"/"inf": worth seeing when inspecting a broken file
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    if hasattr(x, "tolist"):  # tensors, numpy values
        return _jsonable(x.tolist())
    return str(x)


def post_train(body: dict[str, Any] = _BODY) -> dict[str, Any]:
    values = dict(body)
    preview, errors = check_preview(values.pop("preview", None))
    values, path_errors = check_paths(values)
    errors.update(path_errors)
    try:
        if not errors:
            with _submit_lock:  # the name check and the queueing as one step
                cfg = job.make_config(values)  # raises naming every bad field
                busy = _busy_with(cfg.name)
                if busy is None:
                    return {"task_id": job.api_submit(values, preview, cfg).id}  # the config built once
            key = "output_name" if cfg.output_name else "token_string"
            raise unprocessable({(key,): busy})
        # still run the config check on the rest, so one answer names every bad field
        job.make_config({k: v for k, v in values.items() if (k,) not in errors})
    except ConfigError as e:
        for key, msg in e.errors.items():
            errors.setdefault((key,), msg)
    raise unprocessable(errors)


def _busy_with(name: str) -> str | None:
    """Two queued runs of one name would both pass the exists-check and the later one would
    overwrite the earlier one's file; refuse the second while the first is queued or running."""
    for t in REGISTRY.all():
        if t.name == name and t.status in ("queued", "running"):
            return f"a run writing '{name}' is already {t.status} ({t.id}); wait for it or pick another name"
    return None


def get_tasks() -> list[dict[str, Any]]:
    return [task_info(t) for t in REGISTRY.all()]  # newest first


def _task_or_404(task_id: str) -> Task:
    task = REGISTRY.get(task_id)
    if task is None:
        raise HTTPException(status_code=404, detail=f"no task '{task_id}'")
    return task


def get_task(task_id: str) -> dict[str, Any]:
    return task_info(_task_or_404(task_id))


def post_interrupt(task_id: str) -> dict[str, Any]:
    _task_or_404(task_id)
    ok = job.interrupt(task_id)
    task = _task_or_404(task_id)
    return {"task_id": task.id, "status": task.status, "stop_requested": ok}


def get_inspect(name: str) -> dict[str, Any]:
    why = bad_name(name)
    if why:
        raise unprocessable({("name",): why}, where="path")
    path = find_embedding(name)
    if path is None:
        raise HTTPException(status_code=404, detail=f"no embedding '{name}' in the embeddings folder")
    try:
        info = formats.inspect_embedding(path)
    except (OSError, formats.FormatError) as e:
        raise HTTPException(status_code=422, detail=f"cannot read {os.path.basename(path)}: {e}") from None
    return _jsonable(info)


def register(app: Any) -> None:
    """Add the routes to the host's FastAPI app; every one carries the --api-auth check (pitfall 20)."""
    if any(getattr(r, "path", "").startswith(PREFIX + "/") for r in app.routes):
        return  # already on this app (a second on_app_started for the same app)
    deps = [Depends(require_auth)]
    routes = [
        ("/train", post_train, "POST", Submitted, 202),
        ("/tasks", get_tasks, "GET", list[TaskInfo], 200),
        ("/tasks/{task_id}", get_task, "GET", TaskInfo, 200),
        ("/tasks/{task_id}/interrupt", post_interrupt, "POST", InterruptResult, 200),
        ("/inspect/{name}", get_inspect, "GET", None, 200),
    ]
    for path, fn, method, model, code in routes:
        app.add_api_route(PREFIX + path, fn, methods=[method], response_model=model, status_code=code,
                          dependencies=deps, tags=["ti-trainer"])

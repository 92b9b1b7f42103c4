"""One training run inside the WebUI: config from named values, the core loop on the borrowed
model, checkpoints in the log folder, the final file in the embeddings folder, hot reload and the
host-load check. Used by the tab (through wrap_gradio_gpu_call) and the API (through queued_job)."""

from __future__ import annotations

import logging
import os
import threading
import traceback
import uuid
from typing import Any

import torch

from lib_ti import files, formats, resume, run, sample_prompts
from lib_ti.config import ConfigError, TrainConfig
from lib_ti.embedding import Embedding
from lib_ti.files import RESERVED
from lib_ti.prepare import PrepareError
from lib_ti.tokens import TokenError, check_token_string
from lib_ti.train import Callbacks, Progress
from lib_ti.webui import card, host, host_model, submit_checks
from lib_ti.webui.tasks import REGISTRY, Task

log = logging.getLogger("lib_ti")

# Options the WebUI decides itself; the CLI-only ones make no sense with a borrowed model.
HOST_FIXED = TrainConfig.host_decided()
_configs: dict[str, TrainConfig] = {}  # task id -> its config, for the cards of published checkpoints
PREVIEW_KEYS = ("prompt", "negative_prompt", "steps", "sampler_name", "cfg_scale", "seed", "width", "height")


class HostOutputs(run.Outputs):
    """Final files published into the host's embeddings folder (any subfolder counts for names),
    checkpoints, previews and recovery files in the run's log folder."""

    recursive = True

    def __init__(self, cfg: TrainConfig, task: Task | None = None, preview: dict[str, Any] | None = None):
        self.final_dir, self.log_dir, self.task = host_model.embeddings_dir(), cfg.output_dir, task
        self.preview = preview

    def saved(self, path: str, emb: Embedding, cfg: TrainConfig, final: bool, published: bool) -> None:
        if self.task is None:
            return
        if not final:
            REGISTRY.update(self.task.id, checkpoints=[*self.task.checkpoints, (emb.step, path)])
        elif published:  # the host reloads, and we check it loaded this very file
            host_model.reload_embeddings()
            ok, message = host_model.host_load_check(cfg.name, emb.num_vectors, path=path)
            REGISTRY.update(self.task.id, load_check=("ok: " if ok else "NOT LOADED: ") + message)
            REGISTRY.update(self.task.id, notes=[*self.task.notes,
                                                 *card.write_card(self.task, emb, path, cfg, self.preview)])


def final_path(cfg: TrainConfig) -> str:
    return HostOutputs(cfg).final_path(cfg)


def token_problem(token: Any) -> dict[str, str]:
    """The token checked against the loaded model's tokenizer, so the tab and the API (422) name
    the field before anything runs. Without a usable model the run itself reports why."""
    if not isinstance(token, str) or not token:
        return {}
    try:
        check_token_string(host_model.borrow(), token)  # tokenizing does not depend on clip skip
    except TokenError as e:
        return {e.field: str(e)}
    except Exception:  # host refusals (no model, --lowvram...) come from the run, in the host's words
        return {}
    return {}


def host_clip_skip(values: dict[str, Any]) -> bool:
    """No clip_skip (or 0) means: follow the host's "Clip skip" setting, as txt2img does."""
    return values.get("clip_skip") in (None, "", 0, 0.0)


def make_config(values: dict[str, Any]) -> TrainConfig:
    """Validated config, or ConfigError naming every bad field (shown in the tab, 422 in the API)."""
    values = {k: v for k, v in values.items() if k not in HOST_FIXED}
    if host_clip_skip(values):
        values.pop("clip_skip", None)
    try:
        cfg = TrainConfig.from_dict(values)
    except ConfigError as e:
        raise ConfigError({**e.errors, **token_problem(values.get("token_string"))}) from None
    bad_token = token_problem(cfg.token_string)
    if bad_token:
        raise ConfigError(bad_token)
    if cfg.save_model_as == "invokeai":
        raise ConfigError({"save_model_as": "the invokeai folder layout is for the CLI; the WebUI loads "
                           "safetensors or pt"})
    if cfg.save_model_as == "pt" and _host_family() == "sdxl":
        raise ConfigError({"save_model_as": "an SDXL embedding (clip_l + clip_g) cannot be stored in A1111's .pt "
                           "layout; use safetensors"})
    cfg = cfg.replace(output_dir=host.log_dir(cfg.name))
    run.check_names(HostOutputs(cfg), cfg)
    return cfg


def _host_family() -> str | None:
    try:
        return host_model.family_of(host_model.sd_model())
    except Exception:  # no model loaded: the run itself reports why
        return None


def _reserve(cfg: TrainConfig, task_id: str) -> None:
    """Hold the name from submit to the end of the run, across the tab and the API."""
    holder = RESERVED.take(host_model.embeddings_dir(), cfg.name, task_id)
    if holder is not None:
        raise ConfigError({run.name_field(cfg): f"a run writing '{cfg.name}' is already queued or running "
                           f"({holder}); wait for it or pick another name"})


def unreserve(cfg: TrainConfig, owner: str) -> None:
    """Free the name if `owner` still holds it (a no-op after the run released it)."""
    try:
        RESERVED.release(host_model.embeddings_dir(), cfg.name, owner)
    except Exception:
        log.exception("releasing the name %s", cfg.name)


def execute(task: Task, cfg: TrainConfig, preview: dict[str, Any] | None = None,
            clip_skip: int | None = None) -> Task:
    """Run under the host's queue lock with shared.state begun (the callers see to that). Everything
    happens inside the error handling: the task always ends done, failed or interrupted."""
    _configs[task.id] = cfg
    for old in [k for k in _configs if REGISTRY.get(k) is None]:
        del _configs[old]  # dropped from the registry: nothing to publish any more
    try:
        REGISTRY.update(task.id, status="running")
        model = host_model.borrow(clip_skip=clip_skip)
        if model.dtype == torch.float16 and cfg.mixed_precision == "no":
            # the host keeps fp16 weights: without autocast and loss scaling, small gradients
            # underflow to zero (the host's own trainer always scales)
            cfg = cfg.replace(mixed_precision="fp16")
            REGISTRY.update(task.id, notes=[*task.notes, "the model is fp16: training with fp16 mixed precision"])
        result = run.run(cfg, model, HostOutputs(cfg, task, preview), _callbacks(task, cfg, preview),
                         host_model.checkpoint_ids())
        REGISTRY.update(task.id, status=result.status, step=result.step, output=result.output,
                        message=result.message, error=result.error, recovery=result.recovery)
    except (ConfigError, PrepareError, formats.FormatError, host_model.HostError) as e:
        REGISTRY.update(task.id, status="failed", error=str(e))
    except Exception as e:  # shown in the tab and the API; the traceback goes to the console
        log.error("training failed:\n%s", traceback.format_exc())
        REGISTRY.update(task.id, status="failed", error=f"{type(e).__name__}: {e}")
    finally:
        if task.status in ("queued", "running"):  # a BaseException: still never a ghost task
            REGISTRY.update(task.id, status="failed", error=task.error or "the run ended without a result")
        unreserve(cfg, task.id)
    return task


def _callbacks(task: Task, cfg: TrainConfig, preview: dict[str, Any] | None) -> Callbacks:
    def progress(p: Progress) -> None:
        changes: dict[str, Any] = {"step": p.step, "max_steps": p.max_steps, "eta_s": p.eta_s}
        if p.loss is not None:
            changes["loss"] = p.loss
        if p.val_loss is not None:
            changes["val_loss"] = p.val_loss
        if p.norms:
            changes["norms"] = p.norms
        if p.phase == "training":
            task.losses.append((p.step, p.loss))
            if p.val_loss is not None and (not task.val_losses or task.val_losses[-1][1] != p.val_loss):
                task.val_losses.append((p.step, p.val_loss))
        REGISTRY.update(task.id, message=p.message or task.message, **changes)
        host.report(p.step, p.max_steps, _textinfo(p))

    def sample(step: int, emb: Embedding) -> None:
        prompts = _preview_prompts(cfg, preview)
        for i, opts in enumerate(prompts):
            image = host.render_preview(**{**(preview or {}), **opts})
            if image is None:
                continue
            path = os.path.join(cfg.output_dir, "images", f"{cfg.name}-{step}-{i}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            image.save(path)
            host.show_image(image)
            REGISTRY.update(task.id, previews=[*task.previews, (step, path)])

    def note(msg: str) -> None:
        log.info(msg)
        REGISTRY.update(task.id, notes=[*task.notes, msg])

    return Callbacks(progress=progress, should_stop=lambda: task.stop or host.stop_requested(),
                     on_sample=sample, log=note)


def _preview_prompts(cfg: TrainConfig, preview: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The tab's txt2img prompt wins; else `sample_prompts` with kohya's per-line options, as the CLI."""
    if preview and preview.get("prompt"):
        return [{"prompt": preview["prompt"]}]
    return [{k: v for k, v in p.items() if k in PREVIEW_KEYS} for p in sample_prompts.parse(cfg)]


def publish(task: Task | None, emb: Embedding, path: str, overwrite: bool) -> str:
    """Write at the top level of the embeddings folder (atomic, so the folder's mtime changes and
    hosts notice), force the host to reload, and check that it loaded what we wrote."""
    fmt = "a1111-pt" if path.lower().endswith(".pt") else "safetensors"
    formats.save_embedding(emb, path, fmt, overwrite=overwrite)
    host_model.reload_embeddings()
    name = os.path.splitext(os.path.basename(path))[0]
    ok, message = host_model.host_load_check(name, emb.num_vectors, path=path)
    if task is not None:
        REGISTRY.update(task.id, load_check=("ok: " if ok else "NOT LOADED: ") + message)
    return path


def publish_checkpoint(checkpoint_path: str, overwrite: bool = False, task: Task | None = None) -> tuple[str, list[str]]:
    """The tab's one-click publish of `<name>-<step>` from the log folder into the embeddings folder,
    with the card a final save gets (that step's preview, the facts; never over the user's own
    files), holding the name meanwhile. While a run holds the model, only the files are written;
    its final reload picks them up. -> (the published path, what the card got)."""
    folder = host_model.embeddings_dir()
    dest = os.path.join(folder, os.path.basename(checkpoint_path))
    stem = os.path.splitext(os.path.basename(dest))[0]
    owner = f"publish-{uuid.uuid4().hex[:8]}"
    holder = RESERVED.take(folder, stem, owner)  # a run of that name would write over what we publish
    if holder is not None:
        raise NameBusy(f"a run writing '{stem}' is queued or running ({holder}); publish it after that run ends")
    try:
        return _publish_checkpoint(checkpoint_path, dest, overwrite, task)
    finally:
        RESERVED.release(folder, stem, owner)


class NameBusy(Exception):
    """The name is held by a queued or running run."""


def _publish_checkpoint(checkpoint_path: str, dest: str, overwrite: bool, task: Task | None) -> tuple[str, list[str]]:
    folder, stem = os.path.dirname(dest), os.path.splitext(os.path.basename(dest))[0]
    twins = [p for p in files.files_named(folder, stem) if not files.same_file(p, dest)]
    if twins:
        raise FileExistsError(f"an embedding named '{stem}' already exists as {twins[0]}")
    with open(checkpoint_path, "rb") as f:
        data = f.read()
    files.atomic_write([(dest, lambda out: out.write(data))], overwrite=overwrite)
    state = resume.state_path(checkpoint_path)
    if os.path.isfile(state):  # so that resuming from the published file is exact too
        with open(state, "rb") as f:
            blob = f.read()
        files.atomic_write([(resume.state_path(dest), lambda out: out.write(blob))], overwrite=True)
    if not any(t.status == "running" for t in REGISTRY.all()):
        host_model.reload_embeddings()
    try:
        emb = formats.read_embedding(dest)
    except (OSError, formats.FormatError) as e:  # published all the same; only the card is missing
        return dest, [f"card not written: {e}"]
    step = next((s for s, p in (task.checkpoints if task else []) if files.same_file(p, checkpoint_path)), emb.step)
    cfg = _configs.get(task.id) if task is not None else None
    return dest, card.write_card(task, emb, dest, cfg, step=step)


def _textinfo(p: Progress) -> str:
    if p.phase != "training":
        return p.message
    parts = [f"Step {p.step}/{p.max_steps}", f"loss {p.loss:.4f}" if p.loss is not None else ""]
    if p.val_loss is not None:
        parts.append(f"val {p.val_loss:.4f}")
    if p.eta_s is not None:
        parts.append(f"ETA {int(p.eta_s) // 60}:{int(p.eta_s) % 60:02d}")
    return " · ".join(x for x in parts if x)


def api_submit(values: dict[str, Any], preview: dict[str, Any] | None = None,
               cfg: TrainConfig | None = None) -> Task:
    """Validate now (so the API can answer 422), reserve the name, then queue behind the host's
    lock in a thread. `cfg`: the config the caller already built from `values`."""
    cfg = cfg or make_config(values)
    clip_skip = None if host_clip_skip(values) else cfg.clip_skip
    task_id = f"ti-{uuid.uuid4().hex[:12]}"
    _reserve(cfg, task_id)
    task = REGISTRY.create(cfg.name, task_id=task_id)
    REGISTRY.update(task.id, notes=cfg.notes())

    def work() -> None:
        try:
            with host.queued_job(task.id):
                if task.stop:
                    REGISTRY.update(task.id, status="interrupted", message="interrupted before it started")
                    return
                execute(task, cfg, preview, clip_skip)
        except Exception as e:  # the queue itself failed: still end the task and free the name
            REGISTRY.update(task.id, status="failed", error=f"{type(e).__name__}: {e}")
        finally:
            if task.status in ("queued", "running"):
                REGISTRY.update(task.id, status="failed", error="the run ended without a result")
            unreserve(cfg, task.id)

    threading.Thread(target=work, name=f"ti-trainer {task.id}", daemon=True).start()
    return task


def ui_check(id_task: str, values: dict[str, Any]) -> TrainConfig:
    """The tab's submit, before it waits for the queue lock: the API's checks (make_config and
    submit_checks), then the name held for `id_task`, so a second click, or a run of the same name
    queued by the API or another page, is refused now rather than after the first run ends. The
    caller frees the name (`unreserve`) when the run never started. ConfigError names every field."""
    cfg = make_config(values)
    problems = submit_checks.problems(cfg, host_clip_skip(values))
    if problems:
        raise ConfigError(problems)
    _reserve(cfg, id_task)
    return cfg


def ui_train(id_task: str, values: dict[str, Any], preview: dict[str, Any] | None) -> Task:
    """The tab's handler body; wrap_gradio_gpu_call already holds the queue lock and began the job.
    The config is built again: a file may have appeared while the run waited (ui_check held the name)."""
    cfg = make_config(values)
    _reserve(cfg, id_task)
    task = REGISTRY.create(cfg.name, task_id=id_task)
    REGISTRY.update(task.id, notes=cfg.notes())
    return execute(task, cfg, preview, None if host_clip_skip(values) else cfg.clip_skip)


def interrupt(task_id: str) -> bool:
    """Stop a queued or running task. The host's interrupt (which also stops a preview render) is
    touched only when this task is the host's current job, never for another one."""
    task = REGISTRY.get(task_id)
    if task is None:
        return False
    ok = REGISTRY.request_stop(task_id)
    if ok and task.status == "running" and getattr(host.state(), "job", None) == task.id:
        host.state().interrupt()
    return ok

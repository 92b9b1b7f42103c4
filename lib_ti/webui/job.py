"""One training run inside the WebUI: config from named values, the core loop on the borrowed
model, checkpoints in the log folder, the final file in the embeddings folder, hot reload and the
host-load check. Used by the tab (through wrap_gradio_gpu_call) and the API (through queued_job)."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import traceback
from typing import Any

import torch

from lib_ti import formats
from lib_ti.config import ConfigError, TrainConfig
from lib_ti.embedding import Embedding
from lib_ti.prepare import PrepareError
from lib_ti.tokens import TokenError, check_token_string
from lib_ti.train import Callbacks, Progress, run_training
from lib_ti.webui import card, host, host_model
from lib_ti.webui.tasks import REGISTRY, Task

log = logging.getLogger("lib_ti")

# Options the WebUI decides itself; the CLI-only ones make no sense with a borrowed model.
HOST_FIXED = ("pretrained_model_name_or_path", "device", "v2", "output_dir")
PREVIEW_KEYS = ("prompt", "negative_prompt", "steps", "sampler_name", "cfg_scale", "seed", "width", "height")


def final_path(cfg: TrainConfig) -> str:
    return os.path.join(host_model.embeddings_dir(), f"{cfg.name}.safetensors")


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
    cfg = cfg.replace(output_dir=host.log_dir(cfg.name), save_model_as="safetensors")
    path = final_path(cfg)
    resuming = bool(cfg.weights) and os.path.abspath(cfg.weights) == os.path.abspath(path)
    if os.path.exists(path) and not cfg.overwrite and not resuming:
        raise ConfigError({"token_string": f"an embedding named '{cfg.name}' already exists ({path}); "
                           "pick another name, resume from it, or tick 'Overwrite'"})
    return cfg


def execute(task: Task, cfg: TrainConfig, preview: dict[str, Any] | None = None,
            clip_skip: int | None = None) -> Task:
    """Run under the host's queue lock with shared.state begun (the callers see to that)."""
    REGISTRY.update(task.id, status="running")
    os.makedirs(cfg.output_dir, exist_ok=True)
    try:
        model = host_model.borrow(clip_skip=clip_skip)
        if model.dtype == torch.float16 and cfg.mixed_precision == "no":
            # the host keeps fp16 weights: without autocast and loss scaling, small gradients
            # underflow to zero (the host's own trainer always scales)
            cfg = cfg.replace(mixed_precision="fp16")
            REGISTRY.update(task.id, notes=[*task.notes, "the model is fp16: training with fp16 mixed precision"])
        result = run_training(cfg, model, _callbacks(task, cfg, preview))
    except (ConfigError, PrepareError, formats.FormatError, host_model.HostError) as e:
        REGISTRY.update(task.id, status="failed", error=str(e))
        return task
    except Exception as e:  # shown in the tab and the API; the traceback goes to the console
        log.error("training failed:\n%s", traceback.format_exc())
        REGISTRY.update(task.id, status="failed", error=f"{type(e).__name__}: {e}")
        return task
    status = {"done": "done", "auto_stopped": "done", "interrupted": "interrupted"}.get(result.status, "failed")
    REGISTRY.update(task.id, status=status, step=result.step, output=result.output, message=result.message,
                    error=None if status != "failed" else result.message,
                    notes=task.notes + [f"{w}" for w in result.warnings if w not in task.notes])
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

    def checkpoint(emb: Embedding, final: bool) -> str | None:
        emb.name = cfg.name
        emb.metadata.update({"trainer": "sd-webui-ti-trainer", "token": cfg.token_string})
        emb.sd_checkpoint, emb.sd_checkpoint_name = host_model.checkpoint_ids()
        if not final:
            path = os.path.join(cfg.output_dir, f"{cfg.name}-{emb.step}.safetensors")
            formats.save_embedding(emb, path, "safetensors", overwrite=True)
            REGISTRY.update(task.id, checkpoints=[*task.checkpoints, (emb.step, path)])
            return path
        path = publish(task, emb, final_path(cfg), overwrite=True)
        REGISTRY.update(task.id, notes=[*task.notes, *card.write_card(task, emb, path, cfg, preview)])
        return path

    def sample(step: int, emb: Embedding) -> None:
        prompts = _preview_prompts(cfg, preview)
        for i, prompt in enumerate(prompts):
            image = host.render_preview(**{**(preview or {}), "prompt": prompt})
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
                     on_checkpoint=checkpoint, on_sample=sample, log=note)


def _preview_prompts(cfg: TrainConfig, preview: dict[str, Any] | None) -> list[str]:
    if preview and preview.get("prompt"):
        return [preview["prompt"]]
    lines = [ln.strip() for ln in (cfg.sample_prompts or "").splitlines() if ln.strip()]
    if len(lines) == 1 and os.path.isfile(lines[0]):
        with open(lines[0], encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    return lines or [f"a photo of {cfg.token_string}"]


def publish(task: Task | None, emb: Embedding, path: str, overwrite: bool) -> str:
    """Write at the top level of the embeddings folder (atomic, so the folder's mtime changes and
    hosts notice), force the host to reload, and check that it loaded what we wrote."""
    formats.save_embedding(emb, path, "safetensors", overwrite=overwrite)
    host_model.reload_embeddings()
    name = os.path.splitext(os.path.basename(path))[0]
    ok, message = host_model.host_load_check(name, emb.num_vectors)
    if task is not None:
        REGISTRY.update(task.id, load_check=("ok: " if ok else "NOT LOADED: ") + message)
    return path


def publish_checkpoint(checkpoint_path: str, overwrite: bool = False) -> str:
    """The tab's one-click publish of `<name>-<step>` from the log folder into the embeddings folder.
    While a run holds the model, only the file is copied; the run's final reload picks it up."""
    dest = os.path.join(host_model.embeddings_dir(), os.path.basename(checkpoint_path))
    if os.path.exists(dest) and not overwrite:
        raise FileExistsError(f"{dest} already exists")
    tmp = dest + ".tmp"
    shutil.copyfile(checkpoint_path, tmp)
    os.replace(tmp, dest)
    if not any(t.status == "running" for t in REGISTRY.all()):
        host_model.reload_embeddings()
    return dest


def _textinfo(p: Progress) -> str:
    if p.phase != "training":
        return p.message
    parts = [f"Step {p.step}/{p.max_steps}", f"loss {p.loss:.4f}" if p.loss is not None else ""]
    if p.val_loss is not None:
        parts.append(f"val {p.val_loss:.4f}")
    if p.eta_s is not None:
        parts.append(f"ETA {int(p.eta_s) // 60}:{int(p.eta_s) % 60:02d}")
    return " · ".join(x for x in parts if x)


def api_submit(values: dict[str, Any], preview: dict[str, Any] | None = None) -> Task:
    """Validate now (so the API can answer 422), then queue behind the host's lock in a thread."""
    cfg = make_config(values)
    clip_skip = None if host_clip_skip(values) else cfg.clip_skip
    task = REGISTRY.create(cfg.name)
    REGISTRY.update(task.id, notes=cfg.notes())

    def run() -> None:
        with host.queued_job(task.id):
            if task.stop:
                REGISTRY.update(task.id, status="interrupted", message="interrupted before it started")
                return
            execute(task, cfg, preview, clip_skip)

    threading.Thread(target=run, name=f"ti-trainer {task.id}", daemon=True).start()
    return task


def ui_train(id_task: str, values: dict[str, Any], preview: dict[str, Any] | None) -> Task:
    """The tab's handler body; wrap_gradio_gpu_call already holds the queue lock and began the job."""
    cfg = make_config(values)
    task = REGISTRY.create(cfg.name, task_id=id_task)
    REGISTRY.update(task.id, notes=cfg.notes())
    return execute(task, cfg, preview, None if host_clip_skip(values) else cfg.clip_skip)


def interrupt(task_id: str) -> bool:
    task = REGISTRY.get(task_id)
    if task is None:
        return False
    ok = REGISTRY.request_stop(task_id)
    if ok and task.status == "running":
        host.state().interrupt()  # also stops a preview render in progress
    return ok

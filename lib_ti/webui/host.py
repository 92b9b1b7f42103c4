"""Thin functions over the host's job system, paths and txt2img (A1111 v1.10.1, reForge).

Only this module and host_model.py import `modules`; each import sits inside the function that
needs it because `shared.sd_model` and friends are lazy and must not be touched at import time.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import closing, contextmanager
from typing import Any


def state() -> Any:
    from modules import shared

    return shared.state


def stop_requested() -> bool:
    """Interrupt and the top-row 'stop after current' both mean: save and stop (pitfall 18).
    Skip is left alone: it only cuts a preview render short."""
    s = state()
    return bool(s.interrupted or getattr(s, "stopping_generation", False))


def report(step: int, max_steps: int, textinfo: str) -> None:
    s = state()
    s.job_count = max_steps
    s.job_no = step
    s.sampling_step = 0
    s.sampling_steps = 0
    s.textinfo = textinfo


@contextmanager
def queued_job(task_id: str):
    """What wrap_gradio_gpu_call does, for runs started by the API: wait in the host's FIFO queue
    lock behind txt2img and model switches, then report through shared.state and /internal/progress."""
    from modules import call_queue, progress

    progress.add_task_to_queue(task_id)
    with call_queue.queue_lock:
        s = state()
        s.begin(job=task_id)
        progress.start_task(task_id)
        try:
            yield
        finally:
            progress.finish_task(task_id)
            s.end()


def data_dir() -> str:
    from modules import paths_internal

    return str(paths_internal.data_path)


def log_dir(name: str) -> str:
    """<data>/textual_inversion/<date>/<name>, where the host's own trainer logs."""
    import datetime

    return os.path.join(data_dir(), "textual_inversion", datetime.date.today().isoformat(), name)


def show_image(image: Any) -> None:
    state().assign_current_image(image)


def sampler_names() -> list[str]:
    try:
        from modules import sd_samplers

        return [s.name for s in sd_samplers.visible_samplers()]
    except Exception:  # an older host without visible_samplers: the tab still works with a text box
        return []


def empty_script_runner(p: Any) -> None:
    """reForge's process_images reads p.scripts.alwayson_scripts without checking for None (A1111
    checks): give a script-less job an empty runner there, so no script runs, as in A1111."""
    if getattr(p, "scripts", None) is None and importlib.util.find_spec("ldm_patched") is not None:
        from modules import scripts

        p.scripts, p.script_args = scripts.ScriptRunner(), []


def render_preview(prompt: str, negative_prompt: str = "", steps: int = 20, sampler_name: str = "Euler a",
                   cfg_scale: float = 7.0, seed: int = -1, width: int = 512, height: int = 512) -> Any:
    """One image by the host's own txt2img with the live embedding, as the built-in trainer does.
    No embedding reload: it would replace the training embedding with the file on disk."""
    from modules import processing, shared

    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, do_not_save_grid=True, do_not_save_samples=True,
        do_not_reload_embeddings=True, prompt=prompt, negative_prompt=negative_prompt, steps=int(steps),
        sampler_name=sampler_name, cfg_scale=float(cfg_scale), seed=int(seed), width=int(width), height=int(height),
    )
    empty_script_runner(p)
    s = state()
    job_count, job_no = s.job_count, s.job_no
    with closing(p):
        processed = processing.process_images(p)
    s.job_count, s.job_no = job_count, job_no  # txt2img moved the bar; give it back to training
    return processed.images[0] if processed.images else None

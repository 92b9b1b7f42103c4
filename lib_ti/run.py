"""The run layer: one owner for a run between the front ends (CLI, tab, API) and the loop.

It takes a validated config, a model, an `Outputs` (where files go and what publishing means) and
the front end's hooks, and owns the rest: the name rules, the overwrite decision (checked at
submit and again at the final save), checkpoints with their resume state, the final save, and
recovery, so that no exception after the first step loses the trained vectors.
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile
import traceback
from dataclasses import dataclass, field, replace
from typing import Any

from lib_ti import files, formats, outputs, resume
from lib_ti.config import ConfigError, TrainConfig
from lib_ti.embedding import Embedding
from lib_ti.model import TrainableModel
from lib_ti.train import Callbacks, Progress, TrainResult, run_training

log = logging.getLogger("lib_ti")

# save_model_as -> (formats.save_embedding format, file extension)
# (invokeai: checkpoints; its final file is `<name>/learned_embeds.bin`, see FolderOutputs)
SAVE_AS = {"safetensors": ("safetensors", ".safetensors"), "pt": ("a1111-pt", ".pt"),
           "invokeai": ("safetensors", ".safetensors")}
TRAINER = "sd-webui-ti-trainer"


class RunError(RuntimeError):
    """A run that failed after training started; `recovery` is where its vectors were kept."""

    def __init__(self, message: str, recovery: str | None):
        self.recovery = recovery
        super().__init__(message)


@dataclass
class RunResult:
    status: str  # "done" | "interrupted" | "failed"
    step: int = 0
    output: str | None = None
    message: str = ""
    error: str | None = None
    recovery: str | None = None  # the kept vectors of a failed run
    error_field: str | None = None  # the option at fault, for errors found before the first step
    notes: list[str] = field(default_factory=list)
    train: TrainResult | None = None


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a file name of its own in the output folder, or None."""
    if not name:
        return "is empty"
    if any(c in name for c in ("/", "\\", "\0", ":")) or os.path.isabs(name):
        return f"'{name}' must be a plain file name without path separators or ':'"
    if ".." in name:
        return f"'{name}' must not contain '..'"
    if name.startswith("."):
        return f"'{name}' would be a hidden file; do not start it with '.'"
    if len(name.encode()) > 200:  # leaves room for -<step>, the extension and the state suffix
        return f"is {len(name.encode())} bytes long; file names allow about 200 here"
    return None


def name_field(cfg: TrainConfig) -> str:
    return "output_name" if cfg.output_name else "token_string"


class Outputs:
    """Where a run's files go. `final_dir` holds the finished embedding (the CLI's output folder, or
    the WebUI's embeddings folder); `log_dir` its checkpoints, previews and recovery files."""

    final_dir: str = ""
    log_dir: str = ""
    recursive = False  # whether hosts load subfolders of final_dir too (the embeddings folder)

    def final_path(self, cfg: TrainConfig) -> str:
        return os.path.join(self.final_dir, cfg.name + SAVE_AS[cfg.save_model_as][1])

    def checkpoint_path(self, cfg: TrainConfig, step: int) -> str:
        return os.path.join(self.log_dir, f"{cfg.name}-{step}{SAVE_AS[cfg.save_model_as][1]}")

    def write(self, emb: Embedding, path: str, cfg: TrainConfig, overwrite: bool) -> str:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        formats.save_embedding(emb, path, SAVE_AS[cfg.save_model_as][0], overwrite=overwrite, token=cfg.token_string)
        return path

    def taken(self, cfg: TrainConfig) -> list[str]:
        """Files a host would load under the run's name where the final file goes."""
        return files.files_named(self.final_dir, cfg.name, recursive=self.recursive)

    def saved(self, path: str, emb: Embedding, cfg: TrainConfig, final: bool, published: bool) -> None:
        """After each checkpoint and the final file (the WebUI lists them, reloads and checks that the
        host loaded what was published)."""

    def progress(self, p: Progress) -> None:
        """Every progress report (the CLI keeps the loss rows)."""

    def finish(self, result: RunResult, cfg: TrainConfig) -> None:
        """Once, at the end, whatever happened."""


def collision(out: Outputs, cfg: TrainConfig) -> str | None:
    """Why the final file may not be written now, or None. A file of the same name in another
    layout or subfolder is never allowed (the host keeps one of them); the target itself only with
    `overwrite` or when resuming from it."""
    target = out.final_path(cfg)
    for p in out.taken(cfg):
        if not files.same_file(p, target):
            return (f"an embedding named '{cfg.name}' already exists as {p}; the host would load only one of "
                    "them: pick another name, or move or delete that file")
    resuming = bool(cfg.weights) and os.path.exists(target) and files.same_file(cfg.weights, target)
    if os.path.exists(target) and not cfg.overwrite and not resuming:
        return f"'{cfg.name}' already exists ({target}); pick another name, resume from it, or set overwrite ('Overwrite' in the tab)"
    return None


def check_names(out: Outputs, cfg: TrainConfig) -> None:
    """At submit: ConfigError naming the field when the name cannot be used."""
    why = name_problem(cfg.name)
    if why is None:
        why = collision(out, cfg)
    if why:
        raise ConfigError({name_field(cfg): why})


def stamp(emb: Embedding, cfg: TrainConfig, ids: tuple[str | None, str | None] = (None, None)) -> Embedding:
    emb.name = cfg.name
    emb.metadata.update({"trainer": TRAINER, "token": cfg.token_string})
    emb.sd_checkpoint, emb.sd_checkpoint_name = ids
    return emb


def keep_vectors(out: Outputs, cfg: TrainConfig, emb: Embedding) -> str | None:
    """The recovery file: in the log folder, else the system temp folder. Never raises."""
    name = f"{cfg.name}-recovered-{emb.step}.safetensors"
    for folder in (out.log_dir, tempfile.gettempdir()):
        try:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, name)
            formats.save_embedding(emb, path, "safetensors", overwrite=True)
            return path
        except Exception as e:  # a full disk, a removed folder: try the next place
            log.error("could not keep the vectors in %s: %s", folder, e)
    return None


def run(cfg: TrainConfig, model: TrainableModel, out: Outputs, hooks: Callbacks | None = None,
        checkpoint_ids: tuple[str | None, str | None] = (None, None)) -> RunResult:
    """Train and save. Returns a result in exactly one of done / interrupted / failed; an exception
    after the first step fails the run with the vectors kept in a recovery file."""
    hooks = hooks or Callbacks()
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        hooks.log(msg)

    for folder in {out.final_dir, out.log_dir}:
        files.clean_stale_temps(folder)
    cb = replace(hooks, log=note, live=hooks.live, progress=lambda p: (out.progress(p), hooks.progress(p)))
    if cfg.weights:
        state, why = resume.load(resume.state_path(cfg.weights))
        if state is None:
            note(f"weights: resuming from the vectors only: {why}")
        cb.resume = state
    written: dict[str, Any] = {"final": None}

    def checkpoint(emb: Embedding, final: bool) -> str | None:
        if cb.rank != 0:
            return None
        stamp(emb, cfg, checkpoint_ids)
        path = _save_final(out, cfg, emb, note) if final else out.write(emb, out.checkpoint_path(cfg, emb.step), cfg, True)
        state = cb.live.state()
        if state is not None:
            resume.save(resume.state_path(path), state, emb.vectors)
        if final:
            written["final"] = path
        out.saved(path, emb, cfg, final, final and files.same_file(path, out.final_path(cfg)))
        return path

    cb.on_checkpoint = checkpoint
    result: RunResult
    try:
        tr = run_training(cfg, model, cb)
        status = {"done": "done", "auto_stopped": "done", "interrupted": "interrupted"}.get(tr.status, "failed")
        result = RunResult(status, tr.step, tr.output, tr.message, tr.message if status == "failed" else None,
                           notes=notes, train=tr)
    except BaseException as e:
        live = cb.live
        recovery = None
        if live.good and live.step > live.start_step:
            emb = stamp(Embedding({k: v.detach() for k, v in live.good.items()}, step=live.step).detached(),
                        cfg, checkpoint_ids)
            recovery = keep_vectors(out, cfg, emb)
            if recovery:
                log.warning("the vectors of step %d are kept in %s", live.step, recovery)
        if not isinstance(e, Exception):
            raise  # Ctrl-C twice, SystemExit: the vectors are kept, the process still ends
        if not isinstance(e, (ConfigError, formats.FormatError)) and not hasattr(e, "field"):
            log.error("training failed:\n%s", traceback.format_exc())
        error = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
        if recovery:
            error += f" (the vectors of step {live.step} are kept in {recovery})"
        elif live.step > live.start_step:
            error += " (the vectors could not be kept anywhere: see the console)"
        result = RunResult("failed", live.step, written["final"], error, error, recovery, notes=notes,
                           error_field=getattr(e, "field", None))
    out.finish(result, cfg)
    return result


def _save_final(out: Outputs, cfg: TrainConfig, emb: Embedding, note: Any) -> str:
    """The final file, under the overwrite decision checked again now: a file that appeared since
    submit is never replaced without `overwrite`; the vectors then go to the log folder."""
    target = out.final_path(cfg)
    why = collision(out, cfg)
    if why is None:
        try:
            return out.write(emb, target, cfg, overwrite=os.path.exists(target))
        except formats.OverwriteError as e:  # appeared between the check and the write
            why = str(e)
    # named like a checkpoint of this step: never the target, even where the log folder is the output folder
    path = out.write(emb, out.checkpoint_path(cfg, emb.step or 0), cfg, overwrite=True)
    note(f"not published: {why}. Saved to {path} instead; to publish it, copy it into "
         f"{out.final_dir} under a free name, or run again with overwrite")
    return path


class FolderOutputs(Outputs):
    """The CLI's output: everything in one folder (created on the first write), the final file as
    `<name>.<ext>`, checkpoints as `<name>-<step>.<ext>`, the loss as `<name>.loss.csv`."""

    def __init__(self, folder: str):
        self.final_dir = self.log_dir = os.path.abspath(folder or ".")
        self.write_files = True  # only the first process of a multi-GPU run writes
        self.rows: list[tuple[int, float, float | str]] = []

    def final_path(self, cfg: TrainConfig) -> str:
        if cfg.save_model_as != "invokeai":
            return super().final_path(cfg)
        found = [p for p in (outputs.output_file(cfg, sdxl=x)[0] for x in (False, True)) if p.exists()]
        return str(found[0] if found else outputs.output_file(cfg)[0])

    def taken(self, cfg: TrainConfig) -> list[str]:
        return [] if cfg.save_model_as == "invokeai" else super().taken(cfg)  # its own <name>/ folder

    def write(self, emb: Embedding, path: str, cfg: TrainConfig, overwrite: bool) -> str:
        if cfg.save_model_as == "invokeai" and files.same_file(path, self.final_path(cfg)):
            target, fmt, token = outputs.output_file(cfg, sdxl="clip_g" in emb.vectors)
            os.makedirs(target.parent, exist_ok=True)
            formats.save_embedding(emb, target, fmt, overwrite=overwrite, token=token)
            return str(target)
        return super().write(emb, path, cfg, overwrite)

    def progress(self, p: Progress) -> None:
        # the validation column only where validation ran at this step
        if p.phase == "training" and p.loss is not None:
            self.rows.append((p.step, p.loss, p.val_loss if getattr(p, "validated", False) else ""))

    def csv_path(self, cfg: TrainConfig) -> str:
        return os.path.join(self.log_dir, f"{cfg.name}.loss.csv")

    def finish(self, result: RunResult, cfg: TrainConfig) -> None:
        if not self.rows or not self.write_files:
            return
        try:
            os.makedirs(self.log_dir, exist_ok=True)
            with open(self.csv_path(cfg), "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["step", "loss", "val_loss"])
                w.writerows(self.rows)
        except OSError as e:
            result.notes.append(f"could not write {self.csv_path(cfg)}: {e}")

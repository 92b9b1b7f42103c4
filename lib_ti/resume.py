"""What an exact resume needs, saved beside each checkpoint and final file: optimizer moments, the
step, the sampler's place, the RNG states and a fingerprint of the config and data it must match.

The file is `<embedding file>.ti-state`: safetensors inside (tensors plus a JSON header, no pickle),
an extension no host loads. A1111 keeps `<file>.optim` the same way; kohya has `save_state`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import safetensors
import safetensors.torch
import torch

from lib_ti import files

SUFFIX = ".ti-state"
VERSION = "1"
# Options that may change between the run and its resume without breaking exactness of what was
# done so far: how long to train, where to write, previews, validation and the rate itself.
FREE = {"max_train_steps", "max_train_epochs", "output_dir", "output_name", "overwrite", "save_every_n_steps",
        "weights", "sample_every_n_steps", "sample_prompts", "save_model_as", "device",
        "pretrained_model_name_or_path", "validation_every_n_steps", "validation_batch_size", "validation_seed",
        "auto_stop", "auto_stop_window", "auto_stop_threshold", "learning_rate", "lr_scheduler",
        "lr_warmup_steps", "lr_scheduler_num_cycles", "lr_scheduler_power", "mixed_precision", "ignored",
        "gradient_checkpointing", "cache_latents_to_disk", "vae_batch_size"}


def state_path(embedding_path: str) -> str:
    return os.fspath(embedding_path) + SUFFIX


def fingerprint(cfg: Any, items: list) -> str:
    """sha256 over the options that shape the batches and the optimizer, and over the data (paths,
    captions, sizes, repeats): a resume with other data or batches is not a continuation."""
    opts = {k: v for k, v in sorted(cfg.to_dict().items()) if k not in FREE}
    data = [(os.path.abspath(it.path), it.caption, list(it.size), it.subset.num_repeats, it.subset.is_reg)
            for it in items]
    blob = json.dumps([opts, data], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def vectors_hash(vectors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(vectors):
        h.update(k.encode())
        h.update(vectors[k].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def save(path: str, state: dict[str, Any], vectors: dict[str, torch.Tensor]) -> str:
    """Tensors (optimizer moments, torch RNG) as safetensors, everything else as JSON metadata."""
    tensors: dict[str, torch.Tensor] = {"gen": state["gen"].clone()}
    opt = state["optimizer"]
    opt_state: dict[str, dict[str, Any]] = {}
    for idx, entries in opt["state"].items():
        plain: dict[str, Any] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                plain[key] = value
        opt_state[str(idx)] = plain
    rng = state["rng"]
    meta = {"version": VERSION, "fingerprint": state["fingerprint"], "vectors": vectors_hash(vectors),
            "json": json.dumps({"seed": state["seed"], "step": state["step"], "epoch": state["epoch"],
                                "pos": state["pos"], "rng": [rng[0], list(rng[1]), rng[2]],
                                "vals": state["vals"], "scaler": state.get("scaler") or {},
                                "param_groups": opt["param_groups"], "opt_state": opt_state})}
    data = safetensors.torch.save(tensors, metadata=meta)
    files.atomic_write([(path, lambda f: f.write(data))], overwrite=True)
    return path


def load(path: str) -> tuple[dict[str, Any] | None, str]:
    """(state, note), or (None, why) when there is none or it cannot be read. Whether it fits this
    run is checked after the data is read (`mismatch`)."""
    if not os.path.isfile(path):
        return None, "no resume state beside it (a peer's file, or saved without one)"
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        body = json.loads(meta["json"])
    except Exception as e:  # damaged or foreign: fall back, never fail the run for it
        return None, f"its resume state {os.path.basename(path)} is unreadable ({type(e).__name__})"
    if meta.get("version") != VERSION:
        return None, f"its resume state has version {meta.get('version')}, not {VERSION}"
    opt_state: dict[int, dict[str, Any]] = {}
    for idx, plain in body["opt_state"].items():
        entry = dict(plain)
        prefix = f"opt.{idx}."
        entry.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        opt_state[int(idx)] = entry
    rng = body["rng"]
    return {"seed": body["seed"], "step": body["step"], "epoch": body["epoch"], "pos": body["pos"],
            "rng": (rng[0], tuple(rng[1]), rng[2]), "gen": tensors["gen"], "vals": body["vals"],
            "scaler": body["scaler"], "optimizer": {"state": opt_state, "param_groups": body["param_groups"]},
            "fingerprint": meta.get("fingerprint"), "vectors": meta.get("vectors")}, "resumed exactly: optimizer moments, data order and noise continue from the saved step"


def mismatch(state: dict[str, Any], fp: str, vectors: dict[str, torch.Tensor], step: int) -> str | None:
    """Why `state` cannot continue this run exactly, or None when it can."""
    if state.get("vectors") != vectors_hash(vectors) or int(state["step"]) != step:
        return "its resume state belongs to other vectors (the file was replaced since)"
    if state.get("fingerprint") != fp:
        return "the data or the batch/optimizer options differ from the run that saved it"
    return None

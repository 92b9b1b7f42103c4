"""Thin functions over the host's embedding database and paths (A1111 v1.10.1, reForge): where
finished embeddings go, the forced reload, and whether the host really loaded a file. Every host
import sits inside a function: `shared.sd_model` is lazy and this only runs inside the host."""

from __future__ import annotations

import os
from typing import Any


class HostError(RuntimeError):
    """The host is in a state we cannot train with; the message says what to change."""


def sd_model() -> Any:
    from modules import shared

    m = shared.sd_model  # a property: loads the selected checkpoint if none is loaded yet
    if m is None:
        raise HostError("no model is loaded; pick a checkpoint at the top of the page")
    return m


def embedding_db() -> Any:
    from modules import sd_hijack

    db = getattr(sd_hijack.model_hijack, "embedding_db", None)
    if db is None:  # Forge: one database per text engine, no sd_hijack db
        raise HostError("this WebUI has no textual-inversion database (sd_hijack.model_hijack.embedding_db); "
                        "training needs A1111 or reForge")
    return db


def embeddings_dir() -> str:
    """The host's top-level embeddings folder (--embeddings-dir), where finished files go."""
    from modules import shared

    return os.path.abspath(shared.cmd_opts.embeddings_dir)


def clear_cond_caches() -> None:
    """Forget cached prompt conditioning. The host keys it on prompt text, not on embedding
    contents, so after an embedding changed the same prompt would reuse stale conditioning.
    (modules/processing.py: StableDiffusionProcessing.close resets them the same way.)"""
    from modules import processing

    processing.StableDiffusionProcessing.cached_c = [None, None]
    processing.StableDiffusionProcessing.cached_uc = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]


def reload_embeddings() -> None:
    """Forced reload of every embedding folder (the mtime check misses files overwritten in place),
    then the cond caches. The caller holds the queue lock (never go through the HTTP route)."""
    if _forge():
        from lib_ti.webui import forge_embeddings

        return forge_embeddings.reload_embeddings()
    embedding_db().load_textual_inversion_embeddings(force_reload=True)
    clear_cond_caches()


def host_load_check(name: str, expected_vectors: int, path: str | None = None) -> tuple[bool, str]:
    """Did the host load `name` as a usable embedding with `expected_vectors` vectors (and, given
    `path`, from that file)? Returns (ok, message for the user)."""
    if _forge():
        from lib_ti.webui import forge_embeddings

        return forge_embeddings.host_load_check(name, expected_vectors, path)
    db = embedding_db()
    emb = db.word_embeddings.get(name)
    if emb is not None:
        where = getattr(emb, "filename", None)
        if path and where and os.path.realpath(where) != os.path.realpath(path):
            return False, (f"'{name}' is loaded from {where}, not from {path}: two files share the name "
                           "and the host keeps one; rename or remove the other")
        if int(getattr(emb, "vectors", -1)) != int(expected_vectors):
            return False, (f"'{name}' is loaded with {emb.vectors} vectors, expected {expected_vectors}: "
                           "another file with this name may have won")
        return True, f"'{name}' loaded by the WebUI: {emb.vectors} vectors, width {emb.shape}"
    return False, not_loaded(db, name, "the WebUI")


def not_loaded(db: Any, name: str, who: str) -> str:
    """Why `name` is missing from an EmbeddingDatabase (A1111's, or one of Forge's engines')."""
    skipped = db.skipped_embeddings.get(name)
    if skipped is not None:
        return (f"{who} skipped '{name}': width {skipped.shape} does not fit the loaded model "
                f"(expects {db.expected_shape}); it loads with a model of its own family")
    dirs = ", ".join(getattr(d, "path", str(d)) for d in db.embedding_dirs.values())
    return f"{who} did not load '{name}' (looked in {dirs}); see the console for a load error"


def _forge() -> bool:
    from lib_ti.webui import forge_embeddings

    return forge_embeddings.is_forge()


def checkpoint_ids() -> tuple[str | None, str | None]:
    """(short hash, name) of the loaded checkpoint, as the host stamps them into embeddings."""
    from modules import shared

    info = getattr(shared.sd_model, "sd_checkpoint_info", None)
    if info is None:
        return None, None
    return getattr(info, "shorthash", None), getattr(info, "model_name", None)

"""Forge's embedding databases and the functions the job needs after a save: which host this is,
the text engines' databases, hot reload, and whether Forge really loaded a file.

Forge (lllyasviel/stable-diffusion-webui-forge) has no `sd_hijack.model_hijack.embedding_db`. Each
text-processing engine of the loaded model keeps its own `EmbeddingDatabase` (SD1/SD2: one engine,
SDXL: clip_l and clip_g engines), loaded once when the model is built; prompts read only these.
Two more databases only list files: the API's (/sdapi/v1/embeddings) and the Extra Networks
cards'. After a save all of them are reloaded and the cond caches cleared, so the next prompt
uses the new file without a refresh. Every host import sits inside a function."""

from __future__ import annotations

import os
import sys
from typing import Any

from lib_ti.webui import host_embeddings
from lib_ti.webui.host_embeddings import HostError

ENGINE_ATTRS = ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g")
_app: dict[str, Any] = {}


def is_forge() -> bool:
    """Forge 2: a `backend` package with the classic text engine and no sd_hijack database."""
    import importlib.util

    try:
        if importlib.util.find_spec("backend.text_processing.classic_engine") is None:
            return False
    except ImportError:
        return False
    from modules import sd_hijack

    return not hasattr(sd_hijack.model_hijack, "embedding_db")


def remember_app(app: Any) -> None:
    """on_app_started: the API object (with its own listing database) is reachable from its routes."""
    _app["app"] = app


def loaded_model(load: bool = True) -> Any:
    """shared.sd_model, built first if Forge has not loaded it yet (a FakeInitialModel stands in
    until the first generation). Forge builds it under the queue lock; if the lock is free we take
    it, else the caller is the run that holds it (or a generation that is loading it anyway)."""
    from modules import shared

    m = shared.sd_model
    if getattr(m, "forge_objects", None) is None and load:
        from modules import call_queue, sd_models

        got = call_queue.queue_lock.acquire(blocking=False)
        try:
            m, _ = sd_models.forge_model_reload()
        except Exception as e:
            raise HostError(f"Forge could not load the selected checkpoint ({type(e).__name__}: {e}); pick a "
                            "checkpoint at the top of the page") from e
        finally:
            if got:
                call_queue.queue_lock.release()
    if getattr(m, "forge_objects", None) is None:
        raise HostError("no model is loaded; pick a checkpoint at the top of the page")
    return m


def engines(m: Any) -> dict[str, Any]:
    """attribute name -> text-processing engine of the loaded model."""
    return {a: getattr(m, a) for a in ENGINE_ATTRS if getattr(m, a, None) is not None}


def clear_cond_caches() -> None:
    """Forget cached prompt conditioning (Forge's caches are 3-element lists: args, cond, infotext)."""
    from modules import processing

    processing.StableDiffusionProcessing.cached_c = [None, None, None]
    processing.StableDiffusionProcessing.cached_uc = [None, None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None, None]


def listing_dbs() -> list[Any]:
    """The A1111-style databases that only list files: the API's and the Extra Networks cards'."""
    dbs = []
    app = _app.get("app")
    for route in getattr(app, "routes", []) if app is not None else []:
        owner = getattr(getattr(route, "endpoint", None), "__self__", None)
        db = getattr(owner, "embedding_db", None)
        if db is not None and all(db is not d for d in dbs):
            dbs.append(db)
    cards = sys.modules.get("modules.ui_extra_networks_textual_inversion")
    if getattr(cards, "embedding_db", None) is not None:
        dbs.append(cards.embedding_db)
    return dbs


def reload_embeddings() -> None:
    """Every engine's database, the API's and the cards' reloaded from disk, then the cond caches.
    The caller holds the queue lock."""
    from modules import shared

    m = shared.sd_model
    for eng in engines(m).values():
        eng.embeddings.load_textual_inversion_embeddings()
    for db in listing_dbs():
        db.load_textual_inversion_embeddings(force_reload=True, sync_with_sd_model=False)
    clear_cond_caches()


def host_load_check(name: str, expected_vectors: int, path: str | None = None) -> tuple[bool, str]:
    """Did every text engine of the loaded model load `name` with `expected_vectors` vectors (and,
    given `path`, from that file)? Returns (ok, message for the user)."""
    from modules import shared

    found = engines(shared.sd_model)
    if not found:
        return False, "Forge has not built the model yet; the file loads with it at the first generation"
    for attr, eng in found.items():
        db = eng.embeddings
        emb = db.word_embeddings.get(name)
        if emb is None:
            return False, host_embeddings.not_loaded(db, name, f"Forge's {attr}")
        where = getattr(emb, "filename", None)
        full = getattr(emb, "filepath", None) or where
        if path and full and os.path.isabs(full) and os.path.realpath(full) != os.path.realpath(path):
            return False, (f"'{name}' is loaded from {full}, not from {path}: two files share the name and "
                           "Forge keeps one; rename or remove the other")
        if int(getattr(emb, "vectors", -1)) != int(expected_vectors):
            return False, (f"'{name}' is loaded with {emb.vectors} vectors, expected {expected_vectors}: "
                           "another file with this name may have won")
    return True, f"'{name}' loaded by Forge ({', '.join(found)}): {expected_vectors} vectors, width {emb.shape}"

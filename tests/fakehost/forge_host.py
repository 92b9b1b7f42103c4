"""A stand-in for Forge 2 (lllyasviel/stable-diffusion-webui-forge, dfdcbab6) for tests that run
without one: the Forge-specific parts of `modules` (tests/fakehost/forge/modules, the rest from the
A1111 stand-in) and a small `backend` (tests/fakehost/forge/backend). Faithful where training
meets Forge: no sd_hijack embedding_db but one EmbeddingDatabase per text engine, a FakeInitialModel
until the model is first built, weights built and re-placed under torch.inference_mode (inference
tensors), BasicTransformerBlock's in-place residual adds, in-place default attention, 3-element
cond caches and the "TI:" infotext.

    import fakehost.forge_host
    modules = fakehost.forge_host.install(data_dir=tmp, family="sd1")   # or "sdxl"; load=False

Tests put it in sys.modules inside one fixture and restore sys.modules and sys.path afterwards
(the names are "modules", "backend", "fakehost")."""

from __future__ import annotations

import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
TOPS = ("modules", "backend", "fakehost")


def install(data_dir: str, family: str = "sd1", seed: int = 0, load: bool = True, **options: Any) -> Any:
    """Start the stand-in Forge with a tiny `family` model selected (built now, or at first use with
    load=False, as Forge does), its data folder under `data_dir`. Returns the `modules` package."""
    for p in (os.path.dirname(HERE), os.path.join(HERE, "forge")):
        if p not in sys.path:
            sys.path.insert(0, p)
    import modules
    from modules import paths_internal, sd_models, shared

    assert os.path.join(HERE, "forge") in os.path.dirname(modules.__file__), "the A1111 stand-in is loaded"
    os.makedirs(data_dir, exist_ok=True)
    paths_internal.data_path = data_dir
    shared.cmd_opts.data_dir = data_dir
    shared.cmd_opts.embeddings_dir = os.path.join(data_dir, "embeddings")
    os.makedirs(shared.cmd_opts.embeddings_dir, exist_ok=True)
    shared.opts.data["persistent_cond_cache"] = True
    sd_models.model_data.forge_loading_parameters = {"family": family, "seed": seed, "options": options}
    shared.sd_model = sd_models.model_data.sd_model
    if load:
        sd_models.forge_model_reload()
    return modules

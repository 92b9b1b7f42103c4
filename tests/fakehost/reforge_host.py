"""A stand-in for reForge (Panchovix/stable-diffusion-webui-reForge, 3b56b268) for tests that run
without one: A1111's `modules` with reForge's changes where the adapter meets them
(tests/fakehost/reforge/modules, the rest from the A1111 stand-in), `modules_forge` (the Forge-1
loader) and a small `ldm_patched` (tests/fakehost/reforge). Faithful where training meets reForge:
the loaded model is the A1111 ldm/sgm shell around an ldm_patched UNet (BasicTransformerBlock with
only `forward` and out-of-place residuals, ResBlock.forward -> _forward(x, emb), no AttentionBlock),
shared with forge_objects.unet; VAE encode/decode and txt2img run under torch.inference_mode;
process_images reads p.scripts.alwayson_scripts unguarded; load_textual_inversion_embeddings takes
only force_reload; the model has no `lowvram` flag and no alphas_cumprod_original.

    import fakehost.reforge_host
    modules = fakehost.reforge_host.install(data_dir=tmp, family="sd1")   # or "sdxl"

Tests put it in sys.modules inside one fixture and restore sys.modules and sys.path afterwards
(the names are in TOPS)."""

from __future__ import annotations

import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
TOPS = ("modules", "modules_forge", "ldm_patched", "ldm", "sgm", "fakehost")


def install(data_dir: str, family: str = "sd1", seed: int = 0) -> Any:
    """Start the stand-in reForge with a tiny `family` model loaded (--always-cpu, full precision),
    its data folder under `data_dir`. Returns the `modules` package."""
    for p in (os.path.dirname(HERE), HERE, os.path.join(HERE, "reforge")):  # the last inserted wins
        if p not in sys.path:
            sys.path.insert(0, p)
    import modules
    import torch
    from modules import devices, paths_internal, sd_hijack, shared
    from modules_forge import forge_loader

    assert os.path.join(HERE, "reforge") in os.path.dirname(modules.__file__), "the A1111 stand-in is loaded"
    os.makedirs(data_dir, exist_ok=True)
    paths_internal.data_path = data_dir
    shared.cmd_opts.data_dir = data_dir
    shared.cmd_opts.embeddings_dir = os.path.join(data_dir, "embeddings")
    os.makedirs(shared.cmd_opts.embeddings_dir, exist_ok=True)
    db = sd_hijack.model_hijack.embedding_db
    db.clear_embedding_dirs()
    db.add_embedding_dir(shared.cmd_opts.embeddings_dir)
    # modules/sd_models.py load_model -> forge_loader.load_model_for_a1111 (which wraps the text
    # encoders itself; reForge never calls model_hijack.hijack), the empty prompt, then the embeddings.
    devices.dtype = devices.dtype_vae = devices.dtype_unet = torch.float32
    m = forge_loader.load_model_for_a1111(family, seed)
    with torch.no_grad():
        m.cond_stage_model_empty_prompt = m.get_learned_conditioning([""])
    shared.sd_model = m
    db.load_textual_inversion_embeddings(force_reload=True)
    return modules

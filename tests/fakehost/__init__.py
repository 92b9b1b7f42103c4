"""A stand-in for the A1111 v1.10.1 WebUI host, for tests that run without one (CI).

It provides the `modules` package the extension imports (plus `ldm`, `sgm` and `launch`), with
exactly the host functions lib_ti/webui calls. Signatures and behaviour follow the real host code
(each function names the file:function it stands in for); the code is written anew, smaller, and
on tiny random models (tests/support/random_models.py): CLIP text encoders with the real CLIP
vocabulary, a diffusers VAE, and a small UNet built from ldm-style blocks.

    sys.path.insert(0, "tests"); import fakehost
    modules = fakehost.install(data_dir=tmp, family="sd1")   # or "sdxl"; medvram=True for --medvram

Tests put it in sys.modules inside one fixture and restore sys.modules and sys.path afterwards
(the names are "modules", "fakehost", "ldm", "sgm", "launch").
"""

from __future__ import annotations

import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def install(data_dir: str, family: str = "sd1", seed: int = 0, medvram: bool = False, lowvram: bool = False,
            no_half: bool = True) -> Any:
    """Load a tiny `family` model into the stand-in host, as webui.py + sd_models.load_model would,
    with its data folder (embeddings/, models/) under `data_dir`. Returns the `modules` package."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import modules
    import torch
    from modules import devices, paths_internal, sd_hijack, shared
    from modules import lowvram as lowvram_mod

    from fakehost import models

    os.makedirs(data_dir, exist_ok=True)
    paths_internal.data_path = data_dir
    shared.cmd_opts.data_dir = data_dir
    shared.cmd_opts.embeddings_dir = os.path.join(data_dir, "embeddings")
    shared.cmd_opts.medvram = medvram and family != "sdxl"
    shared.cmd_opts.medvram_sdxl = medvram and family == "sdxl"
    shared.cmd_opts.lowvram = lowvram
    shared.cmd_opts.no_half = no_half
    os.makedirs(shared.cmd_opts.embeddings_dir, exist_ok=True)
    sd_hijack.model_hijack.embedding_db.clear_embedding_dirs()
    sd_hijack.model_hijack.embedding_db.add_embedding_dir(shared.cmd_opts.embeddings_dir)

    m = models.build(family, seed)
    # modules/sd_models.py: load_model -> load_model_weights (--no-half: float, alphas_cumprod_original),
    # send_model_to_device (lowvram.apply), model_hijack.hijack, get_empty_cond, forced embedding reload.
    m.float()
    m.alphas_cumprod_original = m.alphas_cumprod
    devices.dtype = devices.dtype_vae = devices.dtype_unet = torch.float32
    lowvram_mod.apply(m)
    sd_hijack.model_hijack.hijack(m)
    with torch.no_grad():
        m.cond_stage_model_empty_prompt = m.get_learned_conditioning([""])
    shared.sd_model = m
    sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    return modules

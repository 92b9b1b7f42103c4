"""The tiny models the stand-in host loads: random weights from tests/support/random_models.py
(CLIP text encoders with the real vocabulary, a diffusers VAE) around the ldm/sgm stand-ins."""

import torch
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from sgm.models.diffusion import DiffusionEngine
from sgm.modules.encoders import modules as sgm_enc

SIZE_DIM = 8  # ConcatTimestepEmbedderND outdim (256 in SDXL)


def build(family: str, seed: int = 0):
    from modules import sd_models

    from tests.support.random_models import components

    parts = components("tiny", family, seed=seed)
    te = parts["text_encoder"]
    if family == "sd1":
        torch.manual_seed(seed * 1000 + 20)
        unet = UNetModel(context_dim=te.config.hidden_size)
        m = LatentDiffusion(unet, parts["vae"], FrozenCLIPEmbedder(parts["tokenizer"], te))
        name = "tiny-sd1"
    elif family == "sdxl":
        te2 = parts["text_encoder_2"]
        ctx = te.config.hidden_size + te2.config.hidden_size
        adm = te2.config.projection_dim + 3 * 2 * SIZE_DIM
        torch.manual_seed(seed * 1000 + 20)
        unet = UNetModel(context_dim=ctx, adm_in_channels=adm)
        clip_l = sgm_enc.FrozenCLIPEmbedder(parts["tokenizer"], te, layer="hidden",
                                            layer_idx=te.config.num_hidden_layers - 1)  # penultimate
        conditioner = sgm_enc.GeneralConditioner([
            (clip_l, "txt", False, 0.0),
            (sgm_enc.FrozenOpenCLIPEmbedder2(te2), "txt", False, 0.0),
            (sgm_enc.ConcatTimestepEmbedderND(SIZE_DIM), "original_size_as_tuple", False, 0.0),
            (sgm_enc.ConcatTimestepEmbedderND(SIZE_DIM), "crop_coords_top_left", False, 0.0),
            (sgm_enc.ConcatTimestepEmbedderND(SIZE_DIM), "target_size_as_tuple", False, 0.0),
        ])
        m = DiffusionEngine(unet, parts["vae"], conditioner)
        name = "tiny-sdxl"
    else:
        raise ValueError(f"the stand-in host has sd1 and sdxl models, not '{family}'")
    m.eval()
    sd_models.set_model_type(m)
    m.sd_checkpoint_info = sd_models.CheckpointInfo(f"{name}.safetensors", f"{name}.safetensors [0123456789]",
                                                    name, "0123456789abcdef", "0123456789")
    m.sd_model_hash = "0123456789"
    m.lowvram = False
    return m

"""modules_forge/forge_loader.py: load_model_for_a1111, reForge's Forge-1 hybrid model: the A1111
ldm/sgm shell (the A1111 stand-in's, tests/fakehost/models.py) whose UNet is replaced by an
ldm_patched UNet held in forge_objects.unet, and whose VAE encode/decode are swapped for ones
that run under torch.inference_mode (so encoded latents are inference tensors). The text side
stays the A1111 stand-in's wrapper (reForge's forge_clip subclasses FrozenCLIPEmbedderWithCustomWords
and wraps the token embedding in sd_hijack.EmbeddingsWithFixes the same way)."""

import torch
from ldm_patched.ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm_patched.modules import model_management
from ldm_patched.modules.model_base import BaseModel

from modules_forge.unet_patcher import UnetPatcher


class ForgeSD:
    def __init__(self, unet, clip, vae, clipvision):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeSD(self.unet, self.clip, self.vae, self.clipvision)


@torch.no_grad()
def load_model_for_a1111(family, seed=0):
    from fakehost import models

    sd_model = models.build(family, seed)  # the ldm/sgm shell, as instantiate_from_config builds it
    old = sd_model.model.diffusion_model
    label = getattr(old, "label_emb", None)
    torch.manual_seed(seed * 1000 + 21)
    unet = UNetModel(context_dim=old.transformer.transformer_blocks[0].attn2.to_k.in_features,
                     adm_in_channels=label[0].in_features if label is not None else None)
    unet.eval()
    device = model_management.get_torch_device()
    forge_objects = ForgeSD(UnetPatcher(BaseModel(unet, sd_model.alphas_cumprod), device,
                                        model_management.unet_offload_device()), None, None, None)
    sd_model.model.diffusion_model = forge_objects.unet.model.diffusion_model
    sd_model.forge_objects = forge_objects
    sd_model.forge_objects_original = forge_objects.shallow_copy()
    sd_model.forge_objects_after_applying_lora = forge_objects.shallow_copy()
    del sd_model.lowvram  # reForge's loader never sets it (A1111's send_model_to_device does)
    scale = sd_model.scale_factor
    vae = sd_model.first_stage_model

    @torch.inference_mode()
    def patched_decode_first_stage(x):
        return vae.decode(x / scale).sample.to(x)

    @torch.inference_mode()
    def patched_encode_first_stage(x):
        return (vae.encode(x).latent_dist.sample() * scale).to(x)

    sd_model.get_first_stage_encoding = lambda x: x
    sd_model.decode_first_stage = patched_decode_first_stage
    sd_model.encode_first_stage = patched_encode_first_stage
    sd_model.ztsnr = False
    return sd_model

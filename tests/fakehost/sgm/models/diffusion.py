"""sgm/models/diffusion.py: DiffusionEngine, the SDXL model object, with what
modules/sd_models_xl.py adds to it (extend_sdxl, get_learned_conditioning, apply_model,
get_first_stage_encoding)."""

import torch
from ldm.models.diffusion.ddpm import _sd_alphas_cumprod
from torch import nn


class OpenAIWrapper(nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, c, **kwargs):
        x = torch.cat((x, c.get("concat", torch.Tensor([]).type_as(x))), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn", None), y=c.get("vector", None))


class DiffusionEngine(nn.Module):
    def __init__(self, unet, vae, conditioner, scale_factor=0.13025):
        super().__init__()
        self.model = OpenAIWrapper(unet)
        self.first_stage_model = vae
        for p in vae.parameters():
            p.requires_grad = False
        self.conditioner = conditioner
        self.scale_factor = scale_factor
        # sd_models_xl.extend_sdxl
        self.model.conditioning_key = "crossattn"
        self.cond_stage_key = "txt"
        self.parameterization = "eps"
        self.alphas_cumprod = _sd_alphas_cumprod()  # LegacyDDPMDiscretization: the SD schedule
        self.is_sdxl_inpaint = False

    def encode_first_stage(self, x):
        return self.scale_factor * self.first_stage_model.encode(x).latent_dist.sample()

    def get_first_stage_encoding(self, x):
        return x  # sgm's encode_first_stage already samples and scales

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor).sample

    def get_learned_conditioning(self, batch):
        # sd_models_xl.get_learned_conditioning: ucg off, sizes from the prompt's width/height
        from modules import devices, shared

        for embedder in self.conditioner.embedders:
            embedder.ucg_rate = 0.0
        width = getattr(batch, "width", 1024) or 1024
        height = getattr(batch, "height", 1024) or 1024
        is_negative = getattr(batch, "is_negative_prompt", False)
        score = (shared.opts.sdxl_refiner_low_aesthetic_score if is_negative
                 else shared.opts.sdxl_refiner_high_aesthetic_score)
        args = dict(device=devices.device, dtype=devices.dtype)
        conds = {
            "txt": batch,
            "original_size_as_tuple": torch.tensor([height, width], **args).repeat(len(batch), 1),
            "crop_coords_top_left": torch.tensor([shared.opts.sdxl_crop_top, shared.opts.sdxl_crop_left],
                                                 **args).repeat(len(batch), 1),
            "target_size_as_tuple": torch.tensor([height, width], **args).repeat(len(batch), 1),
            "aesthetic_score": torch.tensor([score], **args).repeat(len(batch), 1),
        }
        zero = is_negative and all(x == "" for x in batch)
        return self.conditioner(conds, force_zero_embeddings=["txt"] if zero else [])

    def apply_model(self, x, t, cond):
        if self.is_sdxl_inpaint:
            x = torch.cat([x, *cond["c_concat"]], dim=1)
        return self.model(x, t, cond)

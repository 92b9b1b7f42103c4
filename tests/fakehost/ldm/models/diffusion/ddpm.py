"""ldm/models/diffusion/ddpm.py: LatentDiffusion, the SD1/SD2 model object (`sd_model`), with
the methods the host and the trainer call. The VAE is a diffusers AutoencoderKL here."""

import torch
from torch import nn


def _sd_alphas_cumprod():
    # ldm register_schedule with linear_start 0.00085, linear_end 0.012 ("linear" = squared linspace)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


class DiffusionWrapper(nn.Module):
    def __init__(self, diffusion_model, conditioning_key="crossattn"):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat=None, c_crossattn=None):
        if self.conditioning_key == "crossattn":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))
        if self.conditioning_key == "hybrid":
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t, context=torch.cat(c_crossattn, 1))
        raise NotImplementedError(self.conditioning_key)


class LatentDiffusion(nn.Module):
    def __init__(self, unet, vae, cond_stage_model, parameterization="eps", scale_factor=0.18215,
                 conditioning_key="crossattn"):
        super().__init__()
        self.model = DiffusionWrapper(unet, conditioning_key)
        self.first_stage_model = vae
        for p in vae.parameters():  # instantiate_first_stage freezes the VAE; the UNet stays trainable
            p.requires_grad = False
        self.cond_stage_model = cond_stage_model
        self.cond_stage_key = "txt"
        self.parameterization = parameterization
        self.scale_factor = scale_factor
        self.register_buffer("alphas_cumprod", _sd_alphas_cumprod())

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            cond = {"c_concat" if self.model.conditioning_key == "concat" else "c_crossattn": cond}
        return self.model(x_noisy, t, **cond)

    def get_learned_conditioning(self, c):
        return self.cond_stage_model(c)

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x).latent_dist  # a DiagonalGaussianDistribution

    def get_first_stage_encoding(self, encoder_posterior):
        z = encoder_posterior.sample() if hasattr(encoder_posterior, "sample") else encoder_posterior
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor).sample

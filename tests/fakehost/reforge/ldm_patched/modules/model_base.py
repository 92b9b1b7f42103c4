"""ldm_patched/modules/model_base.py: BaseModel, what reForge samples through (its
`diffusion_model` is the very UNet object the A1111 shell holds as sd_model.model.diffusion_model),
with the SD noise schedule in model_sampling."""

import torch
from torch import nn


class ModelSamplingDiscrete(nn.Module):
    def __init__(self, alphas_cumprod):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone().float())


class BaseModel(nn.Module):
    def __init__(self, diffusion_model, alphas_cumprod):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.model_sampling = ModelSamplingDiscrete(alphas_cumprod)
        self.device = torch.device("cpu")

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        # eps prediction at DDPM step t (reForge's takes sigmas and rescales; the stand-in samples by steps)
        if c_concat is not None:
            x = torch.cat([x, c_concat], dim=1)
        return self.diffusion_model(x, t.float(), context=c_crossattn, y=kwargs.get("y"), control=control,
                                    transformer_options=transformer_options)

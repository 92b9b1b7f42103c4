"""ldm_patched/ldm/modules/diffusionmodules/util.py: timestep_embedding and checkpoint(func,
inputs, params, flag). reForge builds its UNets with use_checkpoint False, so checkpoint() is a
plain call there; the stand-in has only that branch."""

import math

import torch


def checkpoint(func, inputs, params, flag):
    if flag:
        raise NotImplementedError("the stand-in reForge builds UNets with use_checkpoint=False, as reForge does")
    return func(*inputs)


def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

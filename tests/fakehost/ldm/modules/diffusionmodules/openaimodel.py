"""ldm/modules/diffusionmodules/openaimodel.py: a small UNet built from the blocks the host
checkpoints (ResBlock, AttentionBlock and, in attention.py, BasicTransformerBlock), each with the
ldm `forward -> _forward` split. `y` is SDXL's vector conditioning (sgm's UNet takes it the same way)."""

import math

import torch
from ldm.modules.attention import SpatialTransformer
from torch import nn


def timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(),
                                        nn.Conv2d(channels, channels, 3, padding=1))
        self.use_checkpoint = False

    def forward(self, x, emb):
        return self._forward(x, emb)

    def _forward(self, x, emb):
        return x + self.out_layers(self.in_layers(x) + self.emb_layers(emb)[..., None, None])


class AttentionBlock(nn.Module):
    def __init__(self, channels, num_heads=2):
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        self.num_heads = num_heads

    def forward(self, x):
        return self._forward(x)

    def _forward(self, x):
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        q, k, v = self.qkv(self.norm(flat)).reshape(b * self.num_heads, 3 * c // self.num_heads, -1).chunk(3, dim=1)
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(q.shape[1]), dim=-1)
        h = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
        return (flat + self.proj_out(h)).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    def __init__(self, in_channels=4, model_channels=32, context_dim=32, adm_in_channels=None, num_heads=2):
        super().__init__()
        mc, td = model_channels, model_channels * 4
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, td), nn.SiLU(), nn.Linear(td, td))
        self.label_emb = nn.Sequential(nn.Linear(adm_in_channels, td)) if adm_in_channels else None
        self.conv_in = nn.Conv2d(in_channels, mc, 3, padding=1)
        self.res_in = ResBlock(mc, td)
        self.attn = AttentionBlock(mc, num_heads)
        self.transformer = SpatialTransformer(mc, num_heads, mc // num_heads, context_dim=context_dim)
        self.res_out = ResBlock(mc, td)
        self.out = nn.Sequential(nn.GroupNorm(8, mc), nn.SiLU(), nn.Conv2d(mc, in_channels, 3, padding=1))
        self.dtype = torch.float32

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        h = self.res_in(self.conv_in(x), emb)
        h = self.transformer(self.attn(h), context=context)
        return self.out(self.res_out(h, emb))

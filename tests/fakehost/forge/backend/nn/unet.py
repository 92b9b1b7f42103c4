"""backend/nn/unet.py: Forge's UNet blocks, small. What matters is kept as Forge has it:
BasicTransformerBlock._forward adds residuals in place (`x += n`, `x += x_skip`) after its norms
saved `x`; `checkpoint()` raises when enabled; attention goes through the module-level
`attention_function`; forward(x, timesteps, context, y, control, transformer_options)."""

import math

import torch
from torch import nn

from backend.attention import attention_function


def checkpoint(f, args, parameters, enable=False):
    if enable:
        raise NotImplementedError("Gradient Checkpointing is not implemented.")
    return f(*args)


def timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Timestep(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        return timestep_embedding(t, self.dim)


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=2, dim_head=16):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))

    def forward(self, x, context=None, value=None, mask=None, transformer_options=None):
        context = x if context is None else context
        out = attention_function(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, mask)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, context_dim=None, checkpoint=True):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head)
        self.norm1 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim * 4), nn.GELU(), nn.Linear(dim * 4, dim))
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x, context=None, transformer_options=None):
        return checkpoint(self._forward, (x, context, transformer_options), None, self.checkpoint)

    def _forward(self, x, context=None, transformer_options=None):
        n = self.norm1(x)
        n = self.attn1(n, transformer_options=transformer_options)
        x += n
        n = self.norm2(x)
        n = self.attn2(n, context=context, transformer_options=transformer_options)
        x += n
        x_skip = x
        x = self.ff(self.norm3(x))
        x += x_skip
        return x


class SpatialTransformer(nn.Module):
    def __init__(self, channels, n_heads, d_head, context_dim):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, n_heads * d_head)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(n_heads * d_head, n_heads, d_head,
                                                                       context_dim=context_dim, checkpoint=False)])
        self.proj_out = nn.Linear(n_heads * d_head, channels)

    def forward(self, x, context=None, transformer_options=None):
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c).contiguous()
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context=context, transformer_options=transformer_options)
        x = self.proj_out(x).reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        return x + x_in


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, out_channels=None, use_checkpoint=False):
        super().__init__()
        out = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, out), nn.SiLU(), nn.Conv2d(out, out, 3, padding=1))
        self.skip_connection = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)

    def forward(self, x, emb, transformer_options=None):
        return checkpoint(self._forward, (x, emb, transformer_options), None, self.use_checkpoint)

    def _forward(self, x, emb, transformer_options=None):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[..., None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class IntegratedUNet2DConditionModel(nn.Module):
    def __init__(self, context_dim, channels=32, adm_in_channels=None, heads=2):
        super().__init__()
        self.model_channels = channels
        emb = channels * 4
        self.time_embed = nn.Sequential(nn.Linear(channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.num_classes = "sequential" if adm_in_channels else None
        if adm_in_channels:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, emb), nn.SiLU(),
                                                         nn.Linear(emb, emb)))
        self.conv_in = nn.Conv2d(4, channels, 3, padding=1)
        self.down_res = ResBlock(channels, emb)
        self.down_attn = SpatialTransformer(channels, heads, channels // heads, context_dim)
        self.mid_res = ResBlock(channels, emb)
        self.up_res = ResBlock(2 * channels, emb, channels)
        self.up_attn = SpatialTransformer(channels, heads, channels // heads, context_dim)
        self.out = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, 4, 3, padding=1))

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kwargs):
        assert (y is not None) == (self.num_classes is not None)
        transformer_options = {} if transformer_options is None else transformer_options
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        h = self.conv_in(x)
        h = self.down_attn(self.down_res(h, emb, transformer_options), context, transformer_options)
        skip = h
        h = self.mid_res(h, emb, transformer_options)
        h = self.up_res(torch.cat([h, skip], dim=1), emb, transformer_options)
        h = self.up_attn(h, context, transformer_options)
        return self.out(h)

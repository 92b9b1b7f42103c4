"""ldm_patched/ldm/modules/diffusionmodules/openaimodel.py: reForge's UNet (small, same structure):
input/middle/output blocks of TimestepEmbedSequential run by forward_timestep_embed, ResBlock with
the `forward(x, emb) -> checkpoint(self._forward, ...)` split, and no AttentionBlock (ldm_patched
has none). UNetModel.forward fills the shared `transformer_options` (block, transformer_index)."""

import torch
from torch import nn

from ldm_patched.ldm.modules.attention import SpatialTransformer
from ldm_patched.ldm.modules.diffusionmodules.util import checkpoint, timestep_embedding


class TimestepBlock(nn.Module):
    def forward(self, x, emb):
        raise NotImplementedError


def forward_timestep_embed(ts, x, emb, context=None, transformer_options={}, output_shape=None):  # noqa: B006
    for layer in ts:
        if isinstance(layer, TimestepBlock):
            x = layer(x, emb)
        elif isinstance(layer, SpatialTransformer):
            x = layer(x, context, transformer_options)
            if "transformer_index" in transformer_options:
                transformer_options["transformer_index"] += 1
        else:
            x = layer(x)
    return x


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, *args, **kwargs):
        return forward_timestep_embed(self, *args, **kwargs)


class ResBlock(TimestepBlock):
    def __init__(self, channels, emb_channels, dropout=0.0, out_channels=None, use_checkpoint=False):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, self.out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if self.out_channels == channels
                                else nn.Conv2d(channels, self.out_channels, 1))

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class UNetModel(nn.Module):
    def __init__(self, in_channels=4, model_channels=32, out_channels=4, context_dim=32, adm_in_channels=None,
                 num_heads=2, use_checkpoint=False, dtype=torch.float32):
        super().__init__()
        mc, td = model_channels, model_channels * 4
        self.model_channels, self.in_channels, self.dtype = mc, in_channels, dtype
        self.num_classes = "sequential" if adm_in_channels else None
        self.time_embed = nn.Sequential(nn.Linear(mc, td), nn.SiLU(), nn.Linear(td, td))
        if self.num_classes is not None:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, td), nn.SiLU(), nn.Linear(td, td)))

        def res(ch, out=None):
            return ResBlock(ch, td, out_channels=out, use_checkpoint=use_checkpoint)

        def attn():
            return SpatialTransformer(mc, num_heads, mc // num_heads, context_dim=context_dim,
                                      use_checkpoint=use_checkpoint)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, mc, 3, padding=1)),
                                           TimestepEmbedSequential(res(mc), attn())])
        self.middle_block = TimestepEmbedSequential(res(mc), attn(), res(mc))
        self.output_blocks = nn.ModuleList([TimestepEmbedSequential(res(2 * mc, mc), attn()),
                                            TimestepEmbedSequential(res(2 * mc, mc))])
        self.out = nn.Sequential(nn.GroupNorm(32, mc), nn.SiLU(), nn.Conv2d(mc, out_channels, 3, padding=1))

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        # reForge goes through patcher_extension's WrapperExecutor, which with no wrappers calls _forward
        return self._forward(x, timesteps, context, y, control, transformer_options, **kwargs)

    def _forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        transformer_options["original_shape"] = list(x.shape)
        transformer_options["transformer_index"] = 0
        assert (y is not None) == (self.num_classes is not None), "must specify y if and only if the model is class-conditional"
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for i, module in enumerate(self.input_blocks):
            transformer_options["block"] = ("input", i)
            h = forward_timestep_embed(module, h, emb, context, transformer_options)
            hs.append(h)
        transformer_options["block"] = ("middle", 0)
        h = forward_timestep_embed(self.middle_block, h, emb, context, transformer_options)
        for i, module in enumerate(self.output_blocks):
            transformer_options["block"] = ("output", i)
            h = torch.cat([h, hs.pop()], dim=1)
            h = forward_timestep_embed(module, h, emb, context, transformer_options)
        return self.out(h.type(x.dtype))

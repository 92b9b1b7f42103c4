"""ldm_patched/ldm/modules/attention.py: the UNet's transformer blocks as reForge has them (small,
same structure). What matters for training: BasicTransformerBlock has only `forward` (no
`_forward` split as in ldm/sgm), takes `transformer_options` and adds its residuals out of place
(`x = n + x`); SpatialTransformer writes the block index into the shared transformer_options."""

import torch
from torch import nn


def optimized_attention(q, k, v, heads):
    # attention_pytorch: out of place, (b, n, heads * dim_head) in and out
    b, _, inner = q.shape

    def split(t):
        return t.reshape(b, -1, heads, inner // heads).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, -1, inner)


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=2, dim_head=16):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None, value=None, mask=None):
        q = self.to_q(x)
        context = x if context is None else context
        k = self.to_k(context)
        v = self.to_v(context if value is None else value)
        return self.to_out(optimized_attention(q, k, v, self.heads))


class FeedForward(nn.Module):
    def __init__(self, dim, dim_out=None, mult=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(0.0), nn.Linear(dim * mult, dim_out or dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, context_dim=None, checkpoint=True):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head)  # self-attention
        self.ff = FeedForward(dim, dim_out=dim)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.n_heads, self.d_head = n_heads, d_head
        self.is_res = True  # inner_dim == dim
        # reForge accepts `checkpoint` and never uses it: no checkpoint() call, no _forward

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006 (reForge's signature)
        extra_options = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
        extra_options.update(n_heads=self.n_heads, dim_head=self.d_head)
        patches = transformer_options.get("patches", {})
        n = self.attn1(self.norm1(x))
        for p in patches.get("attn1_output_patch", []):
            n = p(n, extra_options)
        x = n + x
        n = self.attn2(self.norm2(x), context=context)
        for p in patches.get("attn2_output_patch", []):
            n = p(n, extra_options)
        x = n + x
        if self.is_res:
            x_skip = x
        x = self.ff(self.norm3(x))
        if self.is_res:
            x = x_skip + x
        return x


class SpatialTransformer(nn.Module):
    def __init__(self, in_channels, n_heads, d_head, depth=1, context_dim=None, use_linear=True, use_checkpoint=True):
        super().__init__()
        inner = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, n_heads, d_head, context_dim=context_dim, checkpoint=use_checkpoint)
            for _ in range(depth)])
        self.proj_out = nn.Linear(inner, in_channels)

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006
        if not isinstance(context, list):
            context = [context] * len(self.transformer_blocks)
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        x = x.movedim(1, 3).flatten(1, 2).contiguous()
        x = self.proj_in(x)
        for i, block in enumerate(self.transformer_blocks):
            transformer_options["block_index"] = i
            x = block(x, context=context[i], transformer_options=transformer_options)
        x = self.proj_out(x)
        x = x.reshape(b, h, w, x.shape[-1]).movedim(3, 1).contiguous()
        return x + x_in

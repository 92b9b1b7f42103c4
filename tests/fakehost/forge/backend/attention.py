"""backend/attention.py: attention functions; the default on a CPU (sub-quadratic / split) works
in place on tensors autograd saved, attention_pytorch does not."""

import torch


def attention_pytorch(q, k, v, heads, mask=None):
    b, n, d = q.shape
    q, k, v = (t.view(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, d)


def attention_split(q, k, v, heads, mask=None):
    b, n, d = q.shape
    q, k, v = (t.view(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    w = q @ k.transpose(-1, -2) * (d // heads) ** -0.5
    w -= w.amax(dim=-1, keepdim=True)  # in place, as the split / sub-quadratic kernels do
    w.exp_()
    w /= w.sum(dim=-1, keepdim=True)
    return (w @ v).transpose(1, 2).reshape(b, -1, d)


attention_function = attention_split

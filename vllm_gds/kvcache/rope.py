"""Rotary position embedding (neox / rotate-half style, as Llama in vLLM and transformers).

For inv_freq [r/2] (float32; r = 2 * len(inv_freq) <= head size d) and integer position p:

    angle_i = float32(p) * inv_freq[i]            (one float32 multiply, as vLLM's cos_sin_cache)
    out[i]       = x[i] * cos(angle_i) - x[i + r/2] * sin(angle_i)        i < r/2
    out[i + r/2] = x[i + r/2] * cos(angle_i) + x[i] * sin(angle_i)
    out[j]       = x[j]                                                   j >= r

all times ``attention_scaling`` (1.0 for default and llama3 RoPE).
"""

from __future__ import annotations

import torch


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, exact: bool = False):
    """cos and sin of the angles; ``exact``: the angle p * inv_freq[i] in float64 (inv_freq as
    given, float32), cos and sin rounded once to float32 -- what the KV kernels compute for the
    key mean, without the float32 rounding of large angles (4e-3 rad at position 2^17)."""
    dtype = torch.float64 if exact else torch.float32
    angle = positions.to(dtype)[..., None] * inv_freq.to(torch.float32).to(dtype).to(positions.device)
    return angle.cos().float(), angle.sin().float()


def apply_rope(x, positions, inv_freq, attention_scaling: float = 1.0, inverse: bool = False,
               exact: bool = False):
    """RoPE of x [..., T, ..., d] -- positions broadcast against x's leading dims ([T] or [T, 1])."""
    half = inv_freq.shape[-1]
    cos, sin = cos_sin(positions, inv_freq, exact)
    if inverse:
        sin = -sin
    x = x.float()
    a, b, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    out = torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
    if inverse:
        out = out / attention_scaling
    else:
        out = out * attention_scaling
    return torch.cat([out, rest], -1)

"""Attention scores and outputs computed the way the kernels do: in the rotated domain.

``scores(lq, q, enc)`` never unrotates a key: it rotates the (scaled) query once and dots it with
codebook levels times the stored norm; ``output(lq, p, enc)`` sums weighted levels and unrotates
once. Both equal attention over the decoded keys and values (up to float rounding): the tests
check it (test_kv_quantizer.py).
"""

from __future__ import annotations

import torch

from vllm_gds.kvcache.quantizer import Encoded, KVLayerQuantizer


def scores(lq: KVLayerQuantizer, q: torch.Tensor, enc: Encoded, positions: torch.Tensor):
    """q [H, d] (one query per KV head) against keys enc [T, H] at positions [T] -> [H, T],
    the exact q . k^_j: calibrated keys score  q . RoPE_p(key_mean) + norm * <rotate(scale q), c>,
    raw keys (negative norm)  |norm| * <rotate(q), c>."""
    rot = lq.keys.rotation
    levels = lq.keys.levels_of(enc.codes)  # [T, H, d]
    norms = enc.norms.float()  # [T, H]
    q = q.float()
    scale = lq.key_scale if lq.key_scale is not None else torch.ones_like(q)
    q_cal = rot.forward(q * scale)  # [H, d], once per query
    s_cal = norms.abs() * (levels * q_cal).sum(-1)  # [T, H]
    if lq.key_mean is not None:
        # per key: sum over RoPE pairs of A_i cos(p theta_i) + B_i sin(p theta_i); here directly
        s_cal = s_cal + (q * lq.key_mean_at(positions)).sum(-1)
    if not lq.fallback:
        return s_cal.T
    q_raw = rot.forward(q)
    s_raw = norms.abs() * (levels * q_raw).sum(-1)
    return torch.where(norms < 0, s_raw, s_cal).T


def output(lq: KVLayerQuantizer, p: torch.Tensor, enc: Encoded) -> torch.Tensor:
    """Attention weights p [H, T] (rows sum to 1) over values enc [T, H] -> [H, d]."""
    levels = lq.values.levels_of(enc.codes) * enc.norms.float()[..., None]  # [T, H, d]
    acc = torch.einsum("ht,thd->hd", p.float(), levels)
    out = lq.values.rotation.inverse(acc)
    return out if lq.value_mean is None else out + lq.value_mean

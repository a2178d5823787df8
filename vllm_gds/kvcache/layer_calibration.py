"""One layer's calibration, as both the torch reference (quantizer.KVLayerQuantizer) and the
kernels' tables (tables.LayerTables) take it: their constructors' keyword arguments are its fields,
so the two cannot disagree on what a calibration is or on when the raw-key fallback is on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import KVFormat


@dataclass(frozen=True)
class LayerCalibration:
    """Tensors [num_kv_heads, head_size] (or [head_size], the same for every head); None: that
    step is off. ``key_mean`` is a pre-RoPE vector: the key at position p is centred on
    RoPE_p(key_mean) (rope.py, with ``rope_inv_freq`` and ``rope_attention_scaling``).
    ``key_weight`` weighs the channels of the raw-key fallback's error (negatives count as 0;
    fallback_error_weights)."""

    key_mean: torch.Tensor | None = None
    key_scale: torch.Tensor | None = None
    value_mean: torch.Tensor | None = None
    key_weight: torch.Tensor | None = None
    rope_inv_freq: torch.Tensor | None = None
    rope_attention_scaling: float = 1.0

    def __post_init__(self):
        if self.key_mean is not None and self.rope_inv_freq is None:
            raise ValueError("a key mean needs the model's RoPE frequencies (rope_inv_freq)")

    def fallback(self, fmt: KVFormat) -> bool:
        """The raw-key fallback: on where the format has it and there is a calibration to fall
        back from."""
        return bool(fmt.key_raw_fallback) and (
            self.key_mean is not None or self.key_scale is not None)


def fallback_error_weights(key_weight: torch.Tensor | None, key_scale: torch.Tensor | None,
                           head_size: int) -> torch.Tensor:
    """The raw-key fallback's two error weights, [..., 2] float32 (one pair per head where
    key_weight or key_scale is per head): (mean_i w_i, mean_i w_i s_i^2) over the channels i, w
    the key weights (negatives as 0; None: 1) and s the key scale (None: 1).

    The fallback codes a key raw where w_raw |k|^2 < w_cal |x|^2, x = (k - mean) / s the
    calibrated key (formats.py, step 5): the query-weighted errors sum_i w_i (k_i - k^_i)^2
    with diag(w) (for the calibrated coding, diag(w s^2) on (k - k^) / s) replaced by its mean,
    every diagonal entry of R diag(w) R^T for the randomized Hadamard rotation R (its entries
    are +-1/sqrt(d)), and each coding's error by the same share of its input's squared norm."""
    w = torch.ones(head_size) if key_weight is None else key_weight.float().clamp_min(0)
    s = torch.ones(head_size) if key_scale is None else key_scale.float()
    w, s = torch.broadcast_tensors(w.to(s.device), s)
    return torch.stack([w.mean(-1), (w * s * s).mean(-1)], -1)

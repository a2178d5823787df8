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
    ``key_weight`` weighs the channels of the raw-key fallback's error (negatives count as 0)."""

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

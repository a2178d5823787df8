"""The torch reference of the quantized KV cache: encode and decode key and value vectors.

This is the specification the Triton kernels match (see formats.py for the byte layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codebook import codebook
from .formats import KVFormat, VectorCode
from .layer_calibration import LayerCalibration, fallback_error_weights
from .packing import pack, packed_bytes, unpack
from .rope import apply_rope
from .rotation import Rotation, check_head_size

FP16_MAX = 65504.0


@dataclass
class Encoded:
    """Packed codes [..., code_bytes] (uint8) and stored norms [...] (float16) of some vectors."""

    codes: torch.Tensor
    norms: torch.Tensor


class VectorQuantizer:
    """Rotation + Lloyd-Max codes + one float16 norm for vectors of size d (no calibration)."""

    def __init__(self, d: int, code: VectorCode, rotation: Rotation):
        check_head_size(d)
        if not 0 <= code.extra <= d or code.extra % 8:
            raise ValueError(f"extra-bit coordinates must be a multiple of 8 in [0, {d}]")
        self.d, self.code, self.rotation = d, code, rotation
        levels, thresholds = codebook(d, code.bits)
        levels_hi, thresholds_hi = codebook(d, code.bits + 1)
        e = code.extra
        # Per-coordinate codebooks: coordinates [0, e) use bits+1.
        self._levels = [(slice(0, e), levels_hi, thresholds_hi), (slice(e, d), levels, thresholds)]

    def _codes_and_levels(self, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        codes, c = [], torch.empty_like(y)
        for sl, levels, thresholds in self._levels:
            part = torch.bucketize(y[..., sl].contiguous(), thresholds.to(y.device), right=False)
            codes.append(part)
            c[..., sl] = levels.to(y.device)[part]
        return codes, c

    def _stored_norm(self, n: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        rule = self.code.norm
        if rule == "plain":
            norm = n
        elif rule == "unit":
            norm = n / c.norm(dim=-1).clamp_min(1e-30)
        else:  # "ls": the scale that minimises |x - norm * unrotate(c)|
            norm = n * (y * c).sum(-1) / (c * c).sum(-1).clamp_min(1e-30)
        return norm.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)

    def _rotate_unit(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        n = x.norm(dim=-1)
        y = self.rotation.forward(x) / n.clamp_min(1e-30)[..., None]
        return n, y

    def encode(self, x: torch.Tensor) -> Encoded:
        n, y = self._rotate_unit(x)
        codes, c = self._codes_and_levels(y)
        e = self.code.extra
        parts = []
        if e:
            parts.append(pack(codes[0], self.code.bits + 1))
        parts.append(pack(codes[1], self.code.bits))
        return Encoded(torch.cat(parts, -1), self._stored_norm(n, y, c))

    def levels_of(self, packed: torch.Tensor) -> torch.Tensor:
        """Unpack codes and look up their levels: the rotated, unit-scale vectors [..., d]."""
        e, b = self.code.extra, self.code.bits
        split = packed_bytes(e, b + 1)
        out = []
        for (sl, levels, _), chunk, bits, n in (
            (self._levels[0], packed[..., :split], b + 1, e),
            (self._levels[1], packed[..., split:], b, self.d - e),
        ):
            if n:
                out.append(levels.to(packed.device)[unpack(chunk, bits, n)])
        return torch.cat(out, -1)

    def decode(self, enc: Encoded) -> torch.Tensor:
        c = self.levels_of(enc.codes)
        return self.rotation.inverse(c * enc.norms.float()[..., None])

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)) without the packing step (identical values, faster)."""
        n, y = self._rotate_unit(x)
        _, c = self._codes_and_levels(y)
        norm = self._stored_norm(n, y, c).float()
        return self.rotation.inverse(c * norm[..., None])


class KVLayerQuantizer:
    """The keys and values of one attention layer: calibration, rotation, codes.

    Tensors are [..., num_kv_heads, head_size] with token positions [...] (keys only);
    ``calibration``: the fields of layer_calibration.LayerCalibration (key_mean, key_scale,
    value_mean, key_weight, rope_inv_freq, rope_attention_scaling), as keywords.
    """

    def __init__(self, fmt: KVFormat, head_size: int, layer: int, seed: int, **calibration):
        cal = LayerCalibration(**calibration)
        key_mean, key_scale, value_mean = cal.key_mean, cal.key_scale, cal.value_mean
        self.rope_inv_freq, self.rope_attention_scaling = cal.rope_inv_freq, cal.rope_attention_scaling
        self.fmt, self.head_size, self.layer = fmt, head_size, layer
        rotation = Rotation(head_size, layer, seed)
        self.keys = VectorQuantizer(head_size, fmt.key, rotation)
        self.values = VectorQuantizer(head_size, fmt.value, rotation)
        self.key_mean = None if key_mean is None else key_mean.float()
        self.key_scale = None if key_scale is None else key_scale.float()
        self.key_inv_scale = None if key_scale is None else 1.0 / self.key_scale
        self.value_mean = None if value_mean is None else value_mean.float()
        self.fallback = cal.fallback(fmt)
        self.err_weights = fallback_error_weights(cal.key_weight, key_scale, head_size)

    def key_mean_at(self, positions: torch.Tensor) -> torch.Tensor:
        """RoPE_p(key_mean) for each position: [..., H, d] for positions [...]."""
        mean = self.key_mean.to(positions.device)
        mean = mean.expand(*positions.shape, *mean.shape)
        # Exact angles (rope.cos_sin): the kernels compute them so; any centre works as long as
        # store and attention agree, and this one does not drift at long context.
        return apply_rope(mean, positions[..., None], self.rope_inv_freq,
                          self.rope_attention_scaling, exact=True)

    def _calibrate_keys(self, k: torch.Tensor, positions) -> torch.Tensor:
        x = k.float()
        if self.key_mean is not None:
            x = x - self.key_mean_at(positions)
        if self.key_inv_scale is not None:
            x = x * self.key_inv_scale.to(x.device)
        return x

    def _uncalibrate_keys(self, x: torch.Tensor, positions) -> torch.Tensor:
        if self.key_scale is not None:
            x = x * self.key_scale.to(x.device)
        if self.key_mean is not None:
            x = x + self.key_mean_at(positions)
        return x

    def _center_values(self, v: torch.Tensor) -> torch.Tensor:
        return v.float() if self.value_mean is None else v.float() - self.value_mean.to(v.device)

    def _uncenter_values(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.value_mean is None else x + self.value_mean.to(x.device)

    def _choose_raw(self, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Where the raw coding's predicted error is the smaller (ties: calibrated):
        fallback_error_weights times the squared norm of the coding's input, k raw, x (the
        calibrated key) calibrated. A coding's error is about the same share of its input's
        squared norm either way, so the key is coded once."""
        w = self.err_weights.to(k.device)
        k = k.float()
        return w[..., 0] * (k * k).sum(-1) < w[..., 1] * (x * x).sum(-1)

    def _chosen_input(self, k: torch.Tensor, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """(the input each key is coded from: k where raw, else its calibration; the raw rows)"""
        x = self._calibrate_keys(k, positions)
        if not self.fallback:
            return x, torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
        use_raw = self._choose_raw(k, x)
        return torch.where(use_raw[..., None], k.float(), x), use_raw

    def encode_keys(self, k: torch.Tensor, positions: torch.Tensor | None = None) -> Encoded:
        """Keys [..., H, d] at token positions [...] (needed with a key mean)."""
        x, use_raw = self._chosen_input(k, positions)
        enc = self.keys.encode(x)
        if not self.fallback:
            return enc
        return Encoded(enc.codes, torch.where(use_raw, -enc.norms.abs(), enc.norms.abs()))

    def decode_keys(self, enc: Encoded, positions: torch.Tensor | None = None) -> torch.Tensor:
        raw = enc.norms.float() < 0  # -0.0 counts as calibrated: harmless, its vector is zero
        x = self.keys.decode(Encoded(enc.codes, enc.norms.abs()))
        return torch.where(raw[..., None], x, self._uncalibrate_keys(x, positions))

    def roundtrip_keys(self, k: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        x, use_raw = self._chosen_input(k, positions)
        x_hat = self.keys.roundtrip(x)
        return torch.where(use_raw[..., None], x_hat, self._uncalibrate_keys(x_hat, positions))

    def encode_values(self, v: torch.Tensor) -> Encoded:
        return self.values.encode(self._center_values(v))

    def decode_values(self, enc: Encoded) -> torch.Tensor:
        return self._uncenter_values(self.values.decode(enc))

    def roundtrip_values(self, v: torch.Tensor) -> torch.Tensor:
        return self._uncenter_values(self.values.roundtrip(self._center_values(v)))

"""Host-side constants of one layer of a quantized KV format: the tensors the Triton kernels read.

Per layer the kernels read the codebook levels and thresholds of each stream, the +-1 signs,
and the Sylvester Hadamard matrix (entries +-1, exact in bf16; the 1/sqrt(d) goes on separately).
The slot layout (slot_layout.py) says where each stream lies in a slot.
"""

from __future__ import annotations

import torch

from .codebook import codebook
from .formats import KVFormat
from .hopper_tables import attach as attach_hopper
from .layer_calibration import LayerCalibration, fallback_error_weights
from .lut4_ptx import levels4_asm, phase_permutation
from .rotation import hadamard_pm1, signs
from .slot_layout import SlotLayout, Stream, layout_kwargs, next_pow2


def _stream_table(d: int, s: Stream) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels padded to 2^8 entries, thresholds padded likewise) of a stream's codebook."""
    levels = torch.zeros(256)
    thresholds = torch.full((256,), float("inf"))
    if s.n:
        lv, th = codebook(d, s.bits)
        levels[: lv.numel()] = lv
        thresholds[: th.numel()] = th
    return levels, thresholds


class LayerTables:
    """Device tensors one layer's kernels read: codebooks, signs, Hadamard column/row blocks,
    calibration. ``dot_dtype`` is the tensor-core input type (float32 in the CPU interpreter).

    ``calibration``: the fields of layer_calibration.LayerCalibration, as keywords (the same as
    quantizer.KVLayerQuantizer's).

    Codebook table layout (float32 [4, 2, 256]): index 0..3 = KA, KB, VA, VB streams;
    [.., 0, :] levels, [.., 1, :] thresholds (+inf past the last one).
    """

    def __init__(self, fmt: KVFormat, head_size: int, layer: int, seed: int, device,
                 dot_dtype: torch.dtype, num_kv_heads: int = 1, **calibration):
        cal = LayerCalibration(**calibration)
        key_mean, key_scale, value_mean, key_weight = (
            cal.key_mean, cal.key_scale, cal.value_mean, cal.key_weight)
        layout = SlotLayout.of(fmt, head_size)
        self.format_name = fmt.name  # the kernels' log lines
        d = layout.head_size
        self.layout = layout
        # the layout's constexprs; the kernels take each stream's seven as one (kernels/tq_streams.py)
        self.constexprs = layout_kwargs(layout)
        streams = (layout.key.a, layout.key.b, layout.value.a, layout.value.b)
        tabs = [torch.stack(_stream_table(d, s)) for s in streams]
        self.codebooks = torch.stack(tabs).to(device=device, dtype=torch.float32).contiguous()
        self.level_tables = self.codebooks[:, 0].to(dot_dtype).contiguous()
        self.signs = signs(d, layer, seed).to(device)
        h = hadamard_pm1(d)
        # Column blocks (query and store transforms) and row blocks (output transform) of H for
        # streams A and B, zero-padded to the stream tile widths: [D, W] and [W, D].
        self.h_cols = {}
        self.h_rows = {}
        for name, vec in (("k", layout.key), ("v", layout.value)):
            for part, s in (("a", vec.a), ("b", vec.b)):
                start = 0 if part == "a" else vec.a.n
                cols = torch.zeros(d, max(16, s.width))
                cols[:, : s.n] = h[:, start : start + s.n]
                self.h_cols[name + part] = cols.to(device=device, dtype=dot_dtype).contiguous()
                self.h_rows[name + part] = cols.t().to(device=device, dtype=dot_dtype).contiguous()
        # The 4-bit fast path (tq_lut4) scores stream B in four phases (codes 4e + j, read as
        # int16 elements): the same blocks of H with their columns (rows) in phase order. Head
        # size 64 stays on the gather path: its 16-wide phase dots measured slower (RESULTS.md).
        self.lut4_asm = {}
        for name, vec in (("k", layout.key), ("v", layout.value)):
            b = vec.b
            if (b.bits == 4 and b.n == b.width and b.n >= 128 and vec.a.n == 0
                    and b.offset % 2 == 0 and vec.norm_offset % 2 == 0):
                perm = phase_permutation(b.n)
                self.h_cols[name + "b_perm"] = self.h_cols[name + "b"][:, perm].contiguous()
                self.h_rows[name + "b_perm"] = self.h_rows[name + "b"][perm].contiguous()
                self.lut4_asm[name] = levels4_asm(codebook(d, 4)[0])
        heads = num_kv_heads
        self.has_mean = key_mean is not None
        self.rot_half = 0
        self.rope_theta = self.rope_sign = torch.zeros(d, device=device)
        self.rope_partner = torch.zeros(d, dtype=torch.int32, device=device)
        if self.has_mean:
            key_mean = self._rope_tables(key_mean.float().cpu(), cal.rope_inv_freq,
                                         cal.rope_attention_scaling, d, device)
        self.key_mean = self._per_head(key_mean, 0.0, device, heads, d)
        self._mean_pairs(self.key_mean.cpu(), device)
        self.key_scale = self._per_head(key_scale, 1.0, device, heads, d)
        self.key_inv_scale = 1.0 / self.key_scale  # IEEE division, as the reference
        self.value_mean = self._per_head(value_mean, 0.0, device, heads, d)
        # [heads, 2]: the raw-key fallback's error weights (raw, calibrated)
        self.key_err_weights = fallback_error_weights(
            self._per_head(key_weight, 1.0, "cpu", heads, d), self.key_scale.cpu(), d,
        ).to(device).contiguous()
        self.fallback = cal.fallback(fmt)
        # The Hopper decode's lookup PTX (hopper_asm, hopper_lut; None where the format is not
        # single-stream 4-bit): two strings, so every layer's tables carry them.
        attach_hopper(self)

    def _rope_tables(self, key_mean, inv_freq, attention_scaling, d, device):
        """Per-coordinate RoPE constants for RoPE_p(key_mean) (rope.py, neox pairs (i, i + r/2)):
        RoPE_p(mu)[c] = mu[c] cos(p theta[c]) + sign[c] mu[partner[c]] sin(p theta[c]), theta = 0
        past the rotary dims. Returns the mean with attention_scaling on its rotary part."""
        half = inv_freq.shape[-1]
        self.rot_half = half
        c = torch.arange(d)
        theta = torch.zeros(d)
        theta[: 2 * half] = inv_freq.float().cpu().repeat(2)
        partner = torch.where(c < half, c + half, torch.where(c < 2 * half, c - half, c))
        sign = torch.where(c < half, -1.0, torch.where(c < 2 * half, 1.0, 0.0))
        self.rope_theta = theta.to(device)
        self.rope_partner = partner.to(torch.int32).to(device)
        self.rope_sign = sign.to(device)
        mean = key_mean.clone()
        mean[..., : 2 * half] *= attention_scaling
        return mean

    def _mean_pairs(self, key_mean, device):
        """The attention's per-tile key-mean term (tq_attention) runs over the RoPE pairs where a
        head's mean is not zero, RH of them (a power of two >= 16, padded), so a mean kept on a
        few pairs (calibration.sparse_mean) costs a few pairs. Per head: mean_pairs [heads, RH]
        (pair index, -1 pads), mean_theta (their frequencies, 0 pads), mean_mu [heads, RH, 2]
        (the mean at the pair's two channels, 0 pads)."""
        half = self.rot_half
        heads = key_mean.shape[0]
        used = torch.zeros(heads, half, dtype=torch.bool)
        if self.has_mean and half:
            used = (key_mean[:, :half] != 0) | (key_mean[:, half : 2 * half] != 0)
        rh = max(16, next_pow2(int(used.sum(1).max()) if half else 1))
        self.rot_half_pad = rh
        pairs = torch.full((heads, rh), -1, dtype=torch.int32)
        theta = torch.zeros(heads, rh)
        mu = torch.zeros(heads, rh, 2)
        inv_freq = self.rope_theta[:half].cpu()
        for h in range(heads):
            idx = used[h].nonzero().flatten()
            n = idx.numel()
            pairs[h, :n] = idx.to(torch.int32)
            theta[h, :n] = inv_freq[idx]
            mu[h, :n, 0] = key_mean[h, idx]
            mu[h, :n, 1] = key_mean[h, idx + half]
        self.mean_pairs = pairs.to(device).contiguous()
        self.mean_theta = theta.to(device).contiguous()
        self.mean_mu = mu.to(device).contiguous()

    def mean_table(self, block_n: int, dtype: torch.dtype) -> torch.Tensor:
        """[heads, 2, RH, block_n]: cos and sin of j * theta (j < block_n) of each head's mean
        pairs (mean_theta), angles in float64; the attention's per-tile key-mean term."""
        cache = self.__dict__.setdefault("_mean_tables", {})
        if (block_n, dtype) not in cache:
            angle = self.mean_theta.double()[:, :, None] * torch.arange(
                block_n, dtype=torch.float64, device=self.mean_theta.device)
            cache[block_n, dtype] = torch.stack([angle.cos(), angle.sin()], 1).to(dtype).contiguous()
        return cache[block_n, dtype]

    @staticmethod
    def _per_head(t, fill, device, heads, d):
        if t is None:
            return torch.full((heads, d), fill, dtype=torch.float32, device=device)
        if t.dim() == 1:
            t = t.expand(heads, d)
        if t.shape != (heads, d):
            raise ValueError(f"calibration tensor of shape {tuple(t.shape)}, expected {(heads, d)}")
        return t.to(device=device, dtype=torch.float32).contiguous()

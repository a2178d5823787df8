"""The quantized KV cache formats: the one place that defines them (kv-plan and kernels read it).

Per layer, per KV head, per token, a format codes the key vector k and the value vector v
(head size d in {64, 128, 256}; all arithmetic in float32):

Keys, at token position p:
    1. calibrated:  x = (k - RoPE_p(key_mean)) * inv_scale
       key_mean [d] is a pre-RoPE vector from the calibration file (calibration_file.py);
       RoPE_p is the model's rotary embedding (rope.py: neox style) with exact angles (p *
       rope_inv_freq[i] in float64, cos and sin rounded once to float32); inv_scale =
       1 / key_scale, key_scale [d] equal on both channels of each RoPE pair.  Without a calibration file: x = k.
       key_mean is zero outside the format's key_mean_pairs share of RoPE pairs (tq4, tq5:
       half, those of most |mu|^2 / key_scale^2; calibration_file.top_pairs; tq3: all).
    2. n = |x|_2;  y = rotate(x) / n          (rotation.py: seeded randomized Hadamard, per layer)
    3. code[i] = number of thresholds below y[i]   (codebook.py: Lloyd-Max for the exact density of
       a rotated unit vector's coordinate at head size d; coordinates [0, extra) use the
       (bits+1)-bit codebook, the others the bits-bit one)
    4. c[i] = levels[code[i]];  norm = n / |c|   (rule "unit", tq4, tq3, tq5: the decoded vector
       keeps the exact norm; "ls": n * <y, c> / <c, c>, the least-squares scale; "plain": n),
       stored as float16
    5. raw fallback (key_raw_fallback): the key is coded raw (steps 2-4 on x = k) where
       mean_i(w) * |k|^2 < mean_i(w * key_scale^2) * |x|^2 (x of step 1, w = query_ms; ties:
       calibrated; layer_calibration.fallback_error_weights), else calibrated: each coding's
       query-weighted error sum_i w[i] * (k[i] - k^[i])^2, predicted before coding. The rotation
       makes every unit vector's coordinates alike, so a coding's error is about the same share
       of its input's squared norm either way (on SmolLM2 the ratio of the two shares has median
       0.98); with the weights replaced by their mean (every diagonal entry of the rotated
       weights) the errors compare as the weighted squared norms, and a key is coded once. A raw
       key stores -norm: the float16 sign bit is the flag. It keeps outlier keys (the attention
       sink, far from the mean) as accurate as without calibration.
   Decoded:  calibrated  k^ = RoPE_p(key_mean) + key_scale * norm * unrotate(c)
             raw         k^ = |norm| * unrotate(c)
Values: steps 2-4 on x = v (or v - value_mean, rule "mean"); decoded v^ = norm * unrotate(c).

Bytes of one vector, in this order, no padding:
    codes of coordinates [0, extra)  at bits+1 bits, packed (packing.py)   ceil(extra*(bits+1)/8) B
    codes of coordinates [extra, d)  at bits bits, packed                  ceil((d-extra)*bits/8) B
    norm                              float16 (IEEE half, little endian)    2 B
One slot per token per KV head per layer: the key vector's bytes, then the value vector's bytes.
tq4 at d = 128: 64 B of 4-bit key codes, 2 B key norm, 64 B value codes, 2 B value norm = 132 B.

Attention needs no inverse rotation per key (tests/kv_reference.py is the reference). Per query q:
q_cal = rotate(key_scale * q) and q_raw = rotate(q), once. Score of a calibrated key at position
p: q . RoPE_p(key_mean) + norm * <q_cal, c>, where q . RoPE_p(key_mean) = sum over RoPE pairs of
A_i cos(p theta_i) + B_i sin(p theta_i) with A_i, B_i from q and key_mean (once per query);
of a raw key: |norm| * <q_raw, c>. Output: unrotate(sum_j p_j norm_j c_j) (+ value_mean).
"""

from __future__ import annotations

from dataclasses import dataclass

from .packing import packed_bytes

NORM_BYTES = 2  # float16
NORM_RULES = ("plain", "unit", "ls")
KEY_CALIBRATIONS = ("none", "mean", "mean_std", "mean_balanced")
VALUE_CALIBRATIONS = ("none", "mean")


@dataclass(frozen=True)
class VectorCode:
    """How one key or one value vector is coded."""

    bits: int
    extra: int = 0  # rotated coordinates [0, extra) get one more bit
    norm: str = "ls"

    def __post_init__(self):
        if self.norm not in NORM_RULES:
            raise ValueError(f"norm rule {self.norm!r} is not one of {NORM_RULES}")

    def code_bytes(self, d: int) -> int:
        return packed_bytes(self.extra, self.bits + 1) + packed_bytes(d - self.extra, self.bits)

    def vector_bytes(self, d: int) -> int:
        return self.code_bytes(d) + NORM_BYTES

    def label(self) -> str:
        frac = f"+{self.extra}" if self.extra else ""
        return f"{self.bits}{frac}"


@dataclass(frozen=True)
class KVFormat:
    """A quantized KV cache dtype: key code, value code, calibration rules."""

    name: str
    key: VectorCode
    value: VectorCode
    key_calibration: str = "mean_balanced"
    value_calibration: str = "none"
    # Code a key raw (mean 0, scale 1) where that predicts the smaller query-weighted error
    # (step 5 above), else calibrated; a raw key has a negative norm.
    # It keeps outlier keys (the attention sink, far from the calibrated mean) accurate.
    key_raw_fallback: bool = True
    # The pre-RoPE key mean is kept on this share of the RoPE pairs, those of most mean energy
    # in the scaled domain (at least 16, the kernels' least tile), and zero on the rest: the
    # decode kernel's per-key mean term costs in proportion to the pairs kept (RESULTS.md:
    # for 4-bit keys half the pairs at head 64 measured as good as all, and decode 1.3x faster
    # at head 128; 3-bit keys lost 0.2 points of perplexity with half, so tq3 keeps all).
    key_mean_pairs: float = 1.0

    def __post_init__(self):
        if self.key_calibration not in KEY_CALIBRATIONS:
            raise ValueError(f"key calibration {self.key_calibration!r} not in {KEY_CALIBRATIONS}")
        if not 0.0 < self.key_mean_pairs <= 1.0:
            raise ValueError(f"key_mean_pairs {self.key_mean_pairs} not in (0, 1]")
        if self.value_calibration not in VALUE_CALIBRATIONS:
            raise ValueError(
                f"value calibration {self.value_calibration!r} not in {VALUE_CALIBRATIONS}"
            )

    def slot_bytes(self, head_size: int) -> int:
        """Bytes per token per KV head per layer (key and value)."""
        return self.key.vector_bytes(head_size) + self.value.vector_bytes(head_size)

    def bits_per_element(self, head_size: int) -> float:
        return self.slot_bytes(head_size) * 8 / (2 * head_size)


# The dtypes offered to users (--kv-cache-dtype NAME). Chosen from the quality table in
# benchmarks/RESULTS.md ("KV cache quality (issue 4)").
FORMATS: dict[str, KVFormat] = {
    "tq4": KVFormat("tq4", key=VectorCode(4, norm="unit"), value=VectorCode(4, norm="unit"),
                    key_mean_pairs=0.5),
    "tq3": KVFormat("tq3", key=VectorCode(3, norm="unit"), value=VectorCode(3, norm="unit")),
    # 5-bit keys, 4-bit values: the quality option (keys carry most of the error).
    "tq5": KVFormat("tq5", key=VectorCode(5, norm="unit"), value=VectorCode(4, norm="unit"),
                    key_mean_pairs=0.5),
}

# The plain dtypes that kv-plan compares against: bytes per element.
PLAIN_DTYPE_BYTES = {"bf16": 2, "fp8": 1}


def get_format(name: str) -> KVFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown quantized KV cache dtype {name!r}; offered: {', '.join(FORMATS)}"
        ) from None


def kv_bytes_per_token_per_head(dtype: str, head_size: int) -> int:
    """Bytes of one token's key and value for one KV head in one layer, for any offered dtype."""
    if dtype in PLAIN_DTYPE_BYTES:
        return 2 * head_size * PLAIN_DTYPE_BYTES[dtype]
    return get_format(dtype).slot_bytes(head_size)

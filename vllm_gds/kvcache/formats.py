"""The quantized KV cache formats: the one place that defines them (kv-plan and kernels read it).

A format codes each key vector and each value vector of one KV head at one token on its own:

    1. calibration (keys; values optional):  x = (k - mean[layer, kv_head]) * inv_scale[layer, kv_head]
       (float32; mean and inv_scale come from the calibration file, see calibration.py; without
       calibration mean = 0 and inv_scale = 1)
    2. n = |x|_2 (float32); y = rotate(x) / n           (rotation.py: seeded randomized Hadamard)
    3. code[i] = number of thresholds < y[i]            (codebook.py: Lloyd-Max for head size d)
       coordinates 0 .. extra-1 use the (bits+1)-bit codebook, the others the bits-bit codebook
    4. c[i] = levels[code[i]]; the stored norm is  n * <y, c> / <c, c>   ("ls", least squares)
       or n / |c| ("unit") or n ("plain"); stored as float16 (IEEE half, little endian)

and is decoded as  k^ = mean + scale * norm * unrotate(c)  with scale = 1 / inv_scale.

Raw fallback (keys, ``key_raw_fallback``): steps 2-4 also run on x = k itself (no calibration);
with e = k - k^ for each of the two decodings, the key keeps the candidate with the smaller
sum_c query_ms[c] * e[c]^2 (ties: calibrated), and a raw key stores -norm (the float16 sign bit is
the flag; a raw key is decoded as  k^ = |norm| * unrotate(c)).

Bytes of one vector, in this order (no padding between fields):
    codes of coordinates [0, extra)  at bits+1 bits, packed (packing.py), ceil(extra*(bits+1)/8) B
    codes of coordinates [extra, d)  at bits   bits, packed,             ceil((d-extra)*bits/8) B
    norm                              float16,                           2 B
The key vector's bytes are followed by the value vector's bytes: one "slot" per token per KV head.

Attention reads the cache without an inverse rotation per key: with q~ = rotate(scale_k * q),
q . k^ = q . mean_k + norm * sum_i q~[i] c[i], and q . mean_k is the same for every key of a
query, so softmax ignores it; a raw key scores  |norm| * sum_i rotate(q)[i] c[i] - q . mean_k
relative to that (with the fallback on, the kernel keeps both rotated queries). The output is  mean_v + scale_v * unrotate(sum_j p_j norm_j c_j).
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
    # Code each key both calibrated and raw (mean 0, scale 1) and keep the one with the smaller
    # query-weighted error sum_c query_ms[c] * (k[c] - k^[c])^2; a raw key has a negative norm.
    # It keeps outlier keys (the attention sink, far from the calibrated mean) accurate.
    key_raw_fallback: bool = True

    def __post_init__(self):
        if self.key_calibration not in KEY_CALIBRATIONS:
            raise ValueError(f"key calibration {self.key_calibration!r} not in {KEY_CALIBRATIONS}")
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
    "tq4": KVFormat("tq4", key=VectorCode(4), value=VectorCode(4)),
    "tq3": KVFormat("tq3", key=VectorCode(3), value=VectorCode(3)),
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

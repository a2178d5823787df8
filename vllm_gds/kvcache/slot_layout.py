"""Byte layout of a quantized KV slot, arranged for the Triton kernels.

A vector code (formats.VectorCode) is read by the kernels as two *streams* of rotated coordinates:
stream A, the ``extra`` coordinates [0, e) at bits+1 bits, and stream B, the coordinates [e, d) at
``bits`` bits. Each stream is a little-endian bit stream (packing.py); the kernels read it in
*units* of U bytes that hold K whole codes (U = b / gcd(b, 8), K = 8 / gcd(b, 8): b=4 -> one byte
holds two codes, b=3 -> three bytes hold eight), so every unit is loaded once and split with
shifts. A stream of n codes is a tile of width W = next_pow2(n) (Triton tiles are powers of two);
columns >= n are masked to zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .formats import KVFormat, VectorCode
from .packing import packed_bytes
from .rotation import check_head_size

NORM_RULE_IDS = {"plain": 0, "unit": 1, "ls": 2}


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class Stream:
    """One run of equal-width codes inside a vector's bytes."""

    bits: int
    n: int  # codes
    offset: int  # byte offset inside the vector's bytes

    @property
    def unit_bytes(self) -> int:
        return self.bits // math.gcd(self.bits, 8)

    @property
    def unit_codes(self) -> int:
        return 8 // math.gcd(self.bits, 8)

    @property
    def units(self) -> int:
        return self.n // self.unit_codes

    @property
    def width(self) -> int:
        """Tile width: a power of two >= n, and >= 16 (tl.dot's least inner size)."""
        return max(16, next_pow2(self.n)) if self.n else 0

    @property
    def units_pad(self) -> int:
        return self.width // self.unit_codes if self.n else 0


@dataclass(frozen=True)
class VectorLayout:
    """Streams and norm position of one key or value vector (offsets relative to the slot)."""

    a: Stream  # extra-bit coordinates [0, e); n == 0 when the code has none
    b: Stream  # coordinates [e, d)
    norm_offset: int
    norm_rule: int

    @classmethod
    def of(cls, code: VectorCode, d: int, base: int) -> "VectorLayout":
        e = code.extra
        a_bytes = packed_bytes(e, code.bits + 1)
        a = Stream(code.bits + 1, e, base)
        b = Stream(code.bits, d - e, base + a_bytes)
        return cls(a, b, base + code.code_bytes(d), NORM_RULE_IDS[code.norm])


@dataclass(frozen=True)
class SlotLayout:
    """Byte layout of one (token, KV head) slot: key vector, then value vector (formats.py)."""

    head_size: int
    key: VectorLayout
    value: VectorLayout
    slot_bytes: int

    @classmethod
    def of(cls, fmt: KVFormat, d: int) -> "SlotLayout":
        check_head_size(d)
        for code in (fmt.key, fmt.value):
            if code.extra % 8 or not 0 <= code.extra < d or code.bits + (code.extra > 0) > 8:
                raise ValueError(f"{fmt.name}: unsupported vector code {code} for head size {d}")
        key = VectorLayout.of(fmt.key, d, 0)
        value = VectorLayout.of(fmt.value, d, fmt.key.vector_bytes(d))
        return cls(d, key, value, fmt.slot_bytes(d))


def stream_kwargs(prefix: str, s: Stream) -> dict:
    """Constexpr arguments that describe a stream to a kernel (``{prefix}_BITS`` ...)."""
    return {
        f"{prefix}_BITS": s.bits,
        f"{prefix}_N": s.n,
        f"{prefix}_OFF": s.offset,
        f"{prefix}_U": max(1, s.unit_bytes),
        f"{prefix}_K": max(1, s.unit_codes),
        f"{prefix}_NU": max(1, s.units_pad),
        f"{prefix}_W": max(16, s.width),
    }


def layout_kwargs(layout: SlotLayout) -> dict:
    kw = {"D": layout.head_size, "SLOT": layout.slot_bytes}
    for prefix, vec in (("KA", layout.key), ("VA", layout.value)):
        kw |= stream_kwargs(prefix, vec.a)
    for prefix, vec in (("KB", layout.key), ("VB", layout.value)):
        kw |= stream_kwargs(prefix, vec.b)
    kw |= {
        "K_NORM_OFF": layout.key.norm_offset,
        "V_NORM_OFF": layout.value.norm_offset,
        "K_NORM_RULE": layout.key.norm_rule,
        "V_NORM_RULE": layout.value.norm_rule,
    }
    return kw

"""The slot's code streams as the attention and store kernels take them: one constexpr each.

A slot (vllm_gds.kvcache.slot_layout) holds a key and a value vector, each coded in up to two
streams: A (the extra-bit coordinates; n == 0 where there are none) and B (the rest). The host
describes a stream with seven numbers (stream_kwargs: KB_BITS, KB_N, ...); the kernels take the
four streams as KA, KB, VA, VB, each a Stream, and read its fields by name (KB.n, KB.w).
"""

from __future__ import annotations

from typing import NamedTuple

STREAMS = ("KA", "KB", "VA", "VB")


class Stream(NamedTuple):
    """bits per code; n coordinates; off: byte offset in the slot; u, k: bytes and codes per
    packed unit; nu: units (padded to a power of two); w: the width of its tiles (>= 16). A field
    reaches the kernel as a bare int: where Triton wants a constexpr (a shape), wrap it
    (tl.constexpr(VB.w))."""

    bits: int
    n: int
    off: int
    u: int
    k: int
    nu: int
    w: int


def stream_constexprs(kw: dict) -> dict:
    """The layout's constexprs (tables.constexprs: KA_BITS, KA_N, ... per stream) with each
    stream's seven folded into one Stream (KA, KB, VA, VB), as the two kernels take them."""
    out = {k: v for k, v in kw.items() if k.split("_", 1)[0] not in STREAMS}
    for s in STREAMS:
        out[s] = Stream(*(kw[f"{s}_{f.upper()}"] for f in Stream._fields))
    return out

"""Host side of the GPU-only 4-bit fast path (kernels/tq_lut4.py): its PTX and phase order.

``levels4_asm(levels)`` writes the PTX that kernels/tq_lut4.levels4 runs through
tl.inline_asm_elementwise (the codebook's magnitudes as immediates; how it works: tq_lut4's
docstring); ``phase_permutation(n)`` is the coordinate order of the four phases it yields, which
the query's Hadamard columns and the output's rows take on the host (tables.LayerTables).
"""

from __future__ import annotations

import torch


def magnitude_bytes(levels: torch.Tensor) -> tuple[int, int, int, int]:
    """(low bytes 0-3, low bytes 4-7, high bytes 0-3, high bytes 4-7) of the bf16 magnitudes
    levels[8..15] of a symmetric 16-level codebook, as little-endian 32-bit words."""
    lv = levels.to(torch.bfloat16)
    if lv.numel() != 16 or not torch.equal(lv[8:], -lv[:8].flip(0)) or (lv[8:] < 0).any():
        raise ValueError("the 4-bit fast path needs a symmetric codebook of 16 levels")
    bits = [int(b) & 0xFFFF for b in lv[8:].view(torch.int16).tolist()]
    lo = [b & 0xFF for b in bits]
    hi = [b >> 8 for b in bits]

    def word(bs):
        return bs[0] | bs[1] << 8 | bs[2] << 16 | bs[3] << 24

    return word(lo[:4]), word(lo[4:]), word(hi[:4]), word(hi[4:])


# The lookup of eight nibbles in $4 (shared by levels4_asm and hopper_tables.bytes_asm): a nibble
# c maps to the magnitude index (c >= 8 ? c - 8 : 7 - c); la/ha (lb/hb) get the low/high bytes of
# the bf16 levels of the nibbles of $4's low (high) 16 bits, the sign in the high bytes.
LOOKUP_PTX = """shr.b32 f, $4, 3;
and.b32 f, f, 0x11111111;
mul.lo.u32 f, f, 7;
xor.b32 idx, $4, f;
xor.b32 idx, idx, 0x77777777;
and.b32 idx, idx, 0x77777777;
shr.b32 idh, idx, 16;
shl.b32 w4, $4, 4;
prmt.b32 la, tl0, tl1, idx;
prmt.b32 ha, th0, th1, idx;
prmt.b32 f, w4, $4, 0xD9C8;
not.b32 f, f;
and.b32 f, f, 0x80808080;
or.b32 ha, ha, f;
prmt.b32 lb, tl0, tl1, idh;
prmt.b32 hb, th0, th1, idh;
prmt.b32 g, w4, $4, 0xFBEA;
not.b32 g, g;
and.b32 g, g, 0x80808080;
or.b32 hb, hb, g;
"""


def lookup_asm(levels: torch.Tensor, registers: str, outputs: str) -> str:
    """A PTX block: declare `registers`, load the four table words, LOOKUP_PTX, then `outputs`."""
    l0, l1, h0, h1 = magnitude_bytes(levels)
    return (f"{{\n.reg .b32 {registers};\n"
            f"mov.b32 tl0, {l0:#x}; mov.b32 tl1, {l1:#x}; mov.b32 th0, {h0:#x}; mov.b32 th1, {h1:#x};\n"
            + LOOKUP_PTX + outputs + "}")


def levels4_asm(levels: torch.Tensor) -> str:
    """PTX for tl.inline_asm_elementwise(pack=2) on int16: $4 holds two elements (nibbles n0-n3,
    n4-n7); $j (j = 0..3) gets the bf16 levels of (n_j, n_j+4): phase j of both elements."""
    return lookup_asm(levels, "f, g, idx, idh, w4, la, ha, lb, hb, ll, hh, tl0, tl1, th0, th1", """prmt.b32 ll, la, lb, 0x5140;
prmt.b32 hh, ha, hb, 0x5140;
prmt.b32 $0, ll, hh, 0x5140;
prmt.b32 $1, ll, hh, 0x7362;
prmt.b32 ll, la, lb, 0x7362;
prmt.b32 hh, ha, hb, 0x7362;
prmt.b32 $2, ll, hh, 0x5140;
prmt.b32 $3, ll, hh, 0x7362;
""")


def phase_permutation(n: int) -> torch.Tensor:
    """Coordinates in the order the four phases score them: 0, 4, 8, ..., 1, 5, 9, ..."""
    return torch.cat([torch.arange(j, n, 4) for j in range(4)])

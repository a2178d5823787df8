"""The GPU-only 4-bit fast path: codebook levels of packed nibbles in registers, by byte permutes.

A 4-bit stream stores code 2j in the low and code 2j+1 in the high nibble of byte j (packing.py),
so a 16-bit element e holds codes 4e .. 4e+3. ``levels4`` turns a tile of those elements
[rows, n/4] (int16, loaded 32 bits at a time where the slots allow) into four bf16 tiles
[rows, n/4]: phase j holds the levels of codes 4e + j. The kernels score the four phases as four
dots (the query's Hadamard columns, and the output's rows, are permuted to match on the host),
so no interleave or reshape is ever needed.

Per 32-bit register (8 codes) the PTX below costs about 24 instructions: the codebooks are symmetric
(level[15 - c] == -level[c], codebook.py), so a nibble c maps to a magnitude index
(c >= 8 ? c - 8 : 7 - c) and a sign; two ``prmt`` byte permutes look up the low and high bytes of
the bf16 magnitudes of four codes from 8-byte tables held in registers, the sign goes into the
high bytes, and four more permutes interleave the bytes into bf16 pairs. Nothing goes through
memory. The interpreter cannot run inline asm: kernels choose this path with a constexpr and keep
the plain gather path (tq_common.lookup_levels) for the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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


def levels4_asm(levels: torch.Tensor) -> str:
    """PTX for tl.inline_asm_elementwise(pack=2) on int16: $4 holds two elements (nibbles n0-n3,
    n4-n7); $j (j = 0..3) gets the bf16 levels of (n_j, n_j+4): phase j of both elements."""
    l0, l1, h0, h1 = magnitude_bytes(levels)
    return f"""{{
.reg .b32 f, g, idx, idh, w4, la, ha, lb, hb, ll, hh, tl0, tl1, th0, th1;
mov.b32 tl0, {l0:#x}; mov.b32 tl1, {l1:#x}; mov.b32 th0, {h0:#x}; mov.b32 th1, {h1:#x};
shr.b32 f, $4, 3;
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
prmt.b32 ll, la, lb, 0x5140;
prmt.b32 hh, ha, hb, 0x5140;
prmt.b32 $0, ll, hh, 0x5140;
prmt.b32 $1, ll, hh, 0x7362;
prmt.b32 ll, la, lb, 0x7362;
prmt.b32 hh, ha, hb, 0x7362;
prmt.b32 $2, ll, hh, 0x5140;
prmt.b32 $3, ll, hh, 0x7362;
}}"""


@triton.jit
def levels4(codes16, ASM: tl.constexpr):
    """bf16 levels of phases 0..3 (codes 4e + j) of an int16 tile of packed 4-bit codes."""
    return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [codes16],
                                     dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                                     is_pure=True, pack=2)


def phase_permutation(n: int) -> torch.Tensor:
    """Coordinates in the order the four phases score them: 0, 4, 8, ..., 1, 5, 9, ..."""
    return torch.cat([torch.arange(j, n, 4) for j in range(4)])

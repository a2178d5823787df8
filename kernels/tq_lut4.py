"""The GPU-only 4-bit fast path: codebook levels of packed nibbles in registers, by byte permutes.

A 4-bit stream stores code 2j in the low and code 2j+1 in the high nibble of byte j (packing.py).
``levels4`` turns a tile of those bytes [rows, n/2] into two bf16 tiles [rows, n/2]: the levels of
the even codes (low nibbles) and of the odd codes (high nibbles). The kernels score the even and
odd coordinates separately (the query's Hadamard columns are permuted to match, on the host), so
no interleave is ever needed.

Per 32-bit word (8 codes) the PTX below costs about 18 instructions: the codebooks are symmetric
(level[15 - c] == -level[c], codebook.py), so a nibble c maps to a magnitude index
(c >= 8 ? c - 8 : 7 - c) and a sign; two ``prmt`` byte permutes look up the low and high bytes of
the bf16 magnitudes of four codes from 8-byte tables held in registers, the sign goes into the
high bytes, and two more permutes interleave the bytes into bf16 pairs. Nothing goes through
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
    """PTX for tl.inline_asm_elementwise(pack=4): $4 holds 4 code bytes; $0, $1 get the bf16 levels
    of their low nibbles (bytes 0-1, 2-3), $2, $3 those of their high nibbles."""
    l0, l1, h0, h1 = magnitude_bytes(levels)
    return f"""{{
.reg .b32 f, idx, idh, w4, lb, hb, tl0, tl1, th0, th1;
mov.b32 tl0, {l0:#x}; mov.b32 tl1, {l1:#x}; mov.b32 th0, {h0:#x}; mov.b32 th1, {h1:#x};
shr.b32 f, $4, 3;
and.b32 f, f, 0x11111111;
mul.lo.u32 f, f, 7;
xor.b32 idx, $4, f;
xor.b32 idx, idx, 0x77777777;
and.b32 idx, idx, 0x77777777;
shr.b32 idh, idx, 16;
shl.b32 w4, $4, 4;
prmt.b32 f, w4, $4, 0xD9C8;
prmt.b32 lb, tl0, tl1, idx;
prmt.b32 hb, th0, th1, idx;
not.b32 f, f;
and.b32 f, f, 0x80808080;
or.b32 hb, hb, f;
prmt.b32 $0, lb, hb, 0x6240;
prmt.b32 $2, lb, hb, 0x7351;
prmt.b32 f, w4, $4, 0xFBEA;
prmt.b32 lb, tl0, tl1, idh;
prmt.b32 hb, th0, th1, idh;
not.b32 f, f;
and.b32 f, f, 0x80808080;
or.b32 hb, hb, f;
prmt.b32 $1, lb, hb, 0x6240;
prmt.b32 $3, lb, hb, 0x7351;
}}"""


@triton.jit
def levels4(code_bytes, ASM: tl.constexpr):
    """bf16 levels (even codes, odd codes) of a uint8 tile of packed 4-bit codes."""
    return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [code_bytes],
                                     dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)

"""The GPU-only 4-bit fast path: codebook levels of packed nibbles in registers, by byte permutes.

A 4-bit stream stores code 2j in the low and code 2j+1 in the high nibble of byte j (packing.py),
so a 16-bit element e holds codes 4e .. 4e+3. ``levels4`` turns a tile of those elements
[rows, n/4] (int16, loaded 32 bits at a time where the slots allow) into four bf16 tiles
[rows, n/4]: phase j holds the levels of codes 4e + j. The kernels score the four phases as four
dots (the query's Hadamard columns, and the output's rows, are permuted to match on the host),
so no interleave or reshape is ever needed.

Per 32-bit register (8 codes) the PTX (written on the host: vllm_gds/kvcache/lut4_ptx.py) costs about 24 instructions: the codebooks are symmetric
(level[15 - c] == -level[c], codebook.py), so a nibble c maps to a magnitude index
(c >= 8 ? c - 8 : 7 - c) and a sign; two ``prmt`` byte permutes look up the low and high bytes of
the bf16 magnitudes of four codes from 8-byte tables held in registers, the sign goes into the
high bytes, and four more permutes interleave the bytes into bf16 pairs. Nothing goes through
memory. The interpreter cannot run inline asm: kernels choose this path with a constexpr and keep
the plain gather path (tq_common.lookup_levels) for the CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def levels4(codes16, ASM: tl.constexpr):
    """bf16 levels of phases 0..3 (codes 4e + j) of an int16 tile of packed 4-bit codes."""
    return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [codes16],
                                     dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                                     is_pure=True, pack=2)

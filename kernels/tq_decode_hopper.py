"""tq4, tq3 and tq5 decode attention for Hopper (sm_90) in Gluon: 4-bit, 3-bit and 5-bit codes
decoded straight into mma.sync operand registers. The portable kernel (tq_attention.py) stays the
reference; this is the fast path for the served tq4, tq3 and tq5 decode only: 4-bit keys and
values (one stream each, head size 64 or 128), 3-bit ones (head size 128) or 5-bit keys with
4-bit values (tq5, head size 128), the raw-key fallback
FOLDed, the pre-RoPE key mean (stepped from the first tile), paged cache with pages a
multiple of 16 tokens, G <= 8 query heads per KV head (16 without the fallback). It finishes
the output rows itself (the output Hadamard rows permuted to this kernel's order): with one
split directly; with more, each program writes tq_attention's (acc, max, sum) partial rows, the
program that completes a group of MERGE_GROUP splits (a counter) merges them, and the one that
completes the last group merges the groups' and finishes: no reduce launch (its host launch and
its own time cost 5-15 us a call at small batches). Its host side (operand
layouts, the tables it reads, why a call is not its own) is tq_decode_hopper_host.py.

Why: the portable kernel spent ~40% of its 946 SASS instructions per 64-token tile on the nibble
lookup and most of the rest moving decoded values through shared memory into the MMA operand
layouts. Here no decoded value leaves its thread's registers: 594 SASS per 64-token tile at the
Llama-3-8B shape as launched (tq4, PREFETCH, 234 registers; Triton 3.6, tests/hopper_compile.py,
every tensor argument 16-byte divisible as at run time); the loop's only shared memory is the key
mean's operand (below).

Design (one program = one sequence x one KV head x one split; NW = 4 warps, each with its own
16 tokens of every 16 * NW-token tile and its own online softmax; merged once at the end):

* S^T = K Q^T per warp with mma.sync m16n8k16 (a batched 3-D mma_v2; dim 0 is the warp): A = the
  decoded keys [16 tokens, D], B = the transformed query [D, R]. R = 8 score rows where the GQA
  group fits (G <= 4 with the fallback: calibrated query in rows 0..3, uncalibrated in 4..7, as
  FOLD; G <= 8 without), else 16. Then O^T += V^T P^T: A = the decoded values [D, 16 tokens],
  B = P^T. P comes out of S^T's accumulator registers transposed: one movmatrix.trans per 8x8
  block (inline PTX, TRANS_ASM; the kernel relabels the index bits, free) or the compiler's
  conversion. With 8 rows the O accumulator is 32 registers and PV 8 MMAs per warp-tile.
* Coordinates are summed in any order, so the kernel chooses which rotated coordinate sits in
  which MMA k-slot (keys) and m-slot (values): lane c of the key operand holds 32 coordinates
  of a token, its bytes [16c, 16c + 16) (D = 128); lane g of the value operand holds 16 of each
  of its 4 tokens, bytes [8g, 8g + 8). The host permutes the query's Hadamard columns and the
  output's Hadamard rows to match (hadamard_operands). The permutation permutes index *bits*, so
  the kernel writes it as reshape/permute of the lookup's output: register renaming only.
* 3-bit codes (CODES = 3, vllm_gds/kvcache/lut3_ptx.py): a lane's key codes are 3 int32 words
  (its 12 bytes, 32 codes; a fourth element repeats the third), its value codes 3 halfwords of
  each of two tokens (16 codes each); the keys' 24-bit groups are spread into prmt selectors
  (shift-and-select steps), the values' two tokens ride as the 16-bit lanes of one register;
  both are looked up in the 8-level table. geometry() and coordinate() say which code each
  element and phase holds; the host permutations follow them as for 4-bit codes. 493 SASS a
  tile at 70B TP8 (235 registers), 546 at 8B: fewer than tq4's 604 / 594 (Triton 3.6, one tile
  ahead).
* 5-bit keys (tq5: K_CODES = 5, V_CODES = 4; vllm_gds/kvcache/lut5_ptx.py): a lane's key codes
  are 5 int32 words (its 20 bytes), loaded as 8 elements (the last three repeat the fifth: one
  load); the lookup transposes them into byte planes (one 40-bit group of 8 codes a byte), folds
  the sign into a 16-magnitude index and looks it up in two 8-entry prmt tables (eight table words,
  kernel arguments klut0-7) with a select; output p holds codes K5_PAIRS[p] of each group. The
  values are tq4's. 716 SASS per tile at the 8B shape (Triton 3.6), 236 registers.
* Nibble -> bf16: tq_lut4's prmt lookup (lut4_ptx.py: the symmetric codebook's magnitudes in
  8-byte tables, ~20 instructions per 8 codes), its table words passed as operands
  (vllm_gds/kvcache/hopper_tables.py) held in registers. CODES = 4: int16 elements in pairs (the
  values' pairs are the same halfword of tokens 2c and 2c + 1, interleaved by the compiler);
  CODES = 2: bytes in fours (two fewer permutes per 8 codes, more packing).
* Key norms scale S^T per token; value norms scale P per token before the PV MMA.
* Key mean (MEAN): S^T += [cos(j t) | sin(j t)] [A'; B'] per tile: one more fp16 MMA of K = 2 RH
  per warp, its A operand the warp's 16 rows of mean_rows (tables.mean_table(16 NW), positions j
  in the tile) held in registers, its B operand [A'; B'] of the tile's first position, the same
  for all warps: one float32 copy spread over the program's threads (RH * R / 128 elements
  each), exact at the program's first tile and rotated by 16 * NW * theta per tile after, handed
  over as fp16 through shared memory (ldmatrix) with two barriers a tile. The rotation's float32
  drift (at most ~1e-4 relative over 2048 tiles, a split of 128K tokens) stays under the fp16
  rounding of the operand (5e-4), so no re-anchoring. That is MEAN_SMEM, served where the head
  keeps MEAN_SMEM_PAIRS (64: tq3) and the group is over 4 query heads (mean_smem_served); else
  (tq4, tq5: 32 pairs; tq3 at G <= 4) each warp holds and rotates its own copy in registers,
  cheaper there than the barriers (tq3's 64 pairs at 70B TP8: 32 registers and ~80 instructions
  a tile against ~25 shared).
* Addresses: one block-table load per warp-tile (16 tokens, within one page); past the sequence
  the block is 0, so code loads need no masks (scores -inf, weights 0). PREFETCH (served) loads
  the next tile's codes before the current tile is computed; tq3 at G > 4 the next two tiles'
  (prefetch_served).
* SELECT (G 5..8 with the fallback, Llama-3-70B at TP 8): the calibrated and the uncalibrated
  query as two 8-row B operands against the same decoded keys, the raw keys' score selected per
  key: 8 rows of softmax and O instead of FOLD's 16.

The cache format's bytes are unchanged. Its slot (132 B at D = 128: K codes at 0, K norm at 64,
V codes at 66, V norm at 130) leaves the key codes 4-byte aligned (head * 132) and the value codes
2-byte aligned, so the loads are 32-bit (keys) and 16-bit (values) words, not 16-/8-byte
vectors; a stream-contiguous page layout would allow those.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .tq_decode_hopper_host import (  # noqa: F401  (the host side: callers use this module)
    K5_PAIRS, NT, WORD_BYTES, coordinate, finish_rows, geometry, hadamard_operands,
    k_load_layout, k_order, layout_unsupported, lut_args, mean_rows, mean_step, perm_code,
    rows_of, slot_coordinates, slot_maps, stream_codes, table_args, v_load_layout, v_order,
    why_unsupported)

LOG2E = 1.4426950408889634
# A CTA barrier: Triton 3.6's Gluon calls it thread_barrier, 3.9's barrier
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


# ---------------------------------------------------------------------------------------------
# Device helpers


@gluon.jit
def _rope_cos_sin(a):
    """cos and sin (float32) of a float64 angle reduced to [-pi, pi] (tq_common.rope_cos_sin),
    by the approximate MUFU instructions (absolute error about 1e-6 there, far under the fp16
    rounding of the MMA operand they feed): libdevice's cosf/sinf, inlined for every element a
    thread holds, made the prologue thousands of instructions (tq3: 8008 SASS in all, the
    instruction cache missed; ncu stalls "no_instruction")."""
    k = gl.floor(a * 0.15915494309189535 + 0.5)
    r = ((a - k * 6.2831854820251465) + k * 1.7484555314695172e-07) + k * 7.105427357601002e-15
    r = r.to(gl.float32)
    c = gl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=f,f", [r], dtype=gl.float32,
                                  is_pure=True, pack=1)
    s = gl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=f,f", [r], dtype=gl.float32,
                                  is_pure=True, pack=1)
    return c, s


@gluon.jit
def _levels(words, lut, ASM: gl.constexpr, CODES: gl.constexpr, VALUES: gl.constexpr):
    """bf16 levels [..., E, phase bits (LSB first)] of code elements [..., E]: CODES = 4, int16
    elements in pairs (tq_lut4's PTX), phase j = jl + 2 jh in dims [..., jl, jh]; CODES = 2,
    bytes in fours (hopper_tables.bytes_asm: two fewer permutes per 8 codes), phase = the nibble;
    CODES = 3 (lut3_ptx.py): keys int32 words in fours, 8 phases; values int16 halfwords of two
    tokens in eights, 4 phases; CODES = 5 (keys, lut5_ptx.py): int32 words in eights, 4 phases.
    lut: the table words (scalars; eight for CODES = 5, else four), passed as operands
    (hopper_tables.operand_asm)."""
    t = gl.full(words.shape, 0, gl.int32, words.type.layout)
    ops = [words, t + lut[0], t + lut[1], t + lut[2], t + lut[3]]
    if CODES == 5:
        ops = ops + [t + lut[4], t + lut[5], t + lut[6], t + lut[7]]
        k0, k1, k2, k3 = gl.inline_asm_elementwise(
            ASM, "=r," * 16 + "r," * 7 + "r" + ",r" * 64, ops,
            dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16), is_pure=True, pack=8)
        return gl.join(gl.join(k0, k1), gl.join(k2, k3))
    elif CODES == 4:
        p0, p1, p2, p3 = gl.inline_asm_elementwise(
            ASM, "=r,=r,=r,=r,r" + ",r" * 8, ops,
            dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16), is_pure=True, pack=2)
        return gl.join(gl.join(p0, p1), gl.join(p2, p3))
    elif CODES == 2:
        lo, hi = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r" + ",r" * 16, ops,
                                           dtype=(gl.bfloat16, gl.bfloat16), is_pure=True,
                                           pack=4)
        return gl.join(lo, hi)
    elif VALUES:
        v0, v1, v2, v3 = gl.inline_asm_elementwise(
            ASM, "=r," * 16 + "r,r,r,r" + ",r" * 32, ops,
            dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16), is_pure=True, pack=8)
        return gl.join(gl.join(v0, v1), gl.join(v2, v3))
    else:
        k0, k1, k2, k3, k4, k5, k6, k7 = gl.inline_asm_elementwise(
            ASM, "=r," * 16 + "r,r,r,r" + ",r" * 16, ops,
            dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16,
                   gl.bfloat16, gl.bfloat16), is_pure=True, pack=4)
        return gl.join(gl.join(gl.join(k0, k1), gl.join(k2, k3)),
                       gl.join(gl.join(k4, k5), gl.join(k6, k7)))


@gluon.jit
def _tile_base(bt_row, tile, kv_end, head, stride_blk, W: gl.constexpr, NW: gl.constexpr,
               PAGE: gl.constexpr, STRIDE_TOK: gl.constexpr, STRIDE_HEAD: gl.constexpr):
    """Byte offset [NW] (int64, layout W) of the first slot of each warp's 16 tokens of a tile,
    this KV head: one block-table load per warp-tile. Past the sequence the block is 0, so the
    loads that follow need no mask (the scores and weights of those tokens are masked)."""
    tok0 = (tile * NW + gl.arange(0, NW, W)) * 16
    blk = gl.load(bt_row + tok0 // PAGE, mask=tok0 < kv_end, other=0)
    return blk.to(gl.int64) * stride_blk + (head * STRIDE_HEAD + (tok0 % PAGE) * STRIDE_TOK)


@gluon.jit
def _load_words(cache_ptr, base, layout: gl.constexpr, OFF: gl.constexpr, E: gl.constexpr,
                WORD: gl.constexpr, CODES: gl.constexpr, STRIDE_TOK: gl.constexpr):
    """Code elements [NW, NT, E] of WORD bytes (int32, int16 or int8) of one stream of the tile's
    slots (base: _tile_base). CODES 3: element e reads word 3 (e // 4) + e % 4, the fourth of each
    four repeating the third; CODES 5: word 5 (e // 8) + min(e % 8, 4), the last three of each
    eight repeating the fifth (ignored by the lookups; the repeated loads are one)."""
    base = gl.convert_layout(base, gl.SliceLayout(1, gl.SliceLayout(2, layout)))
    t = gl.arange(0, 16, gl.SliceLayout(0, gl.SliceLayout(2, layout)))
    e = gl.arange(0, E, gl.SliceLayout(0, gl.SliceLayout(1, layout)))
    if CODES == 3:
        e = 3 * (e // 4) + gl.minimum(e % 4, 2)
    elif CODES == 5:
        e = 5 * (e // 8) + gl.minimum(e % 8, 4)
    rows = base[:, None] + (t * STRIDE_TOK + OFF)[None, :]
    ptrs = cache_ptr + rows[:, :, None]
    if WORD == 4:
        ptrs = ptrs.to(gl.pointer_type(gl.int32)) + e[None, None, :]
    elif WORD == 2:
        ptrs = ptrs.to(gl.pointer_type(gl.int16)) + e[None, None, :]
    else:
        ptrs = ptrs.to(gl.pointer_type(gl.int8)) + e[None, None, :]
    return gl.load(ptrs)


@gluon.jit
def _tile_codes(cache_ptr, bt_row, tile, kv_end, head, stride_blk, W: gl.constexpr,
                NW: gl.constexpr, PAGE: gl.constexpr, STRIDE_TOK: gl.constexpr,
                STRIDE_HEAD: gl.constexpr, K_LOAD: gl.constexpr, K_OFF: gl.constexpr,
                K_E: gl.constexpr, K_WORD: gl.constexpr, K_CODES: gl.constexpr,
                V_LOAD: gl.constexpr, V_OFF: gl.constexpr, V_E: gl.constexpr,
                V_WORD: gl.constexpr, V_CODES: gl.constexpr):
    """A tile's (base, key code elements, value code elements): _tile_base, then each stream's
    _load_words."""
    base = _tile_base(bt_row, tile, kv_end, head, stride_blk, W, NW, PAGE, STRIDE_TOK,
                      STRIDE_HEAD)
    kw = _load_words(cache_ptr, base, K_LOAD, K_OFF, K_E, K_WORD, K_CODES, STRIDE_TOK)
    vw = _load_words(cache_ptr, base, V_LOAD, V_OFF, V_E, V_WORD, V_CODES, STRIDE_TOK)
    return base, kw, vw


@gluon.jit
def _load_norms(cache_ptr, base, tile, kv_end, pos_layout: gl.constexpr,
                K_NORM_OFF: gl.constexpr, V_NORM_OFF: gl.constexpr, NW: gl.constexpr,
                STRIDE_TOK: gl.constexpr):
    """Key and value norms [NW, NT] (float32, 0 past the sequence) and the tokens' mask."""
    base = gl.convert_layout(base, gl.SliceLayout(1, pos_layout))
    w = gl.arange(0, NW, gl.SliceLayout(1, pos_layout))
    t = gl.arange(0, 16, gl.SliceLayout(0, pos_layout))
    ok = ((tile * NW + w) * 16)[:, None] + t[None, :] < kv_end
    p16 = (cache_ptr + base[:, None] + (t * STRIDE_TOK)[None, :]).to(gl.pointer_type(gl.int16))
    kn = gl.load(p16 + K_NORM_OFF // 2).to(gl.float16, bitcast=True).to(gl.float32)
    vn = gl.load(p16 + V_NORM_OFF // 2).to(gl.float16, bitcast=True).to(gl.float32)
    return gl.where(ok, kn, 0.0), gl.where(ok, vn, 0.0), ok


@gluon.jit
def _to_bits(x, NW: gl.constexpr, D: gl.constexpr):
    """[NW, NT, ...] -> [NW, NT, 2, 2, ...]: one dim per index bit past the token."""
    if D == 128:
        return gl.reshape(x, (NW, 16, 2, 2, 2, 2, 2, 2, 2))
    else:
        return gl.reshape(x, (NW, 16, 2, 2, 2, 2, 2, 2))


@gluon.jit
def _permute_bits(x, P: gl.constexpr, D: gl.constexpr):
    """permute(x, order) for an order packed 4 bits a dim (perm_code): a constexpr int, the same
    under every Triton (a tuple argument is not)."""
    if D == 128:
        return gl.permute(x, (P & 15, (P >> 4) & 15, (P >> 8) & 15, (P >> 12) & 15,
                              (P >> 16) & 15, (P >> 20) & 15, (P >> 24) & 15, (P >> 28) & 15,
                              (P >> 32) & 15))
    else:
        return gl.permute(x, (P & 15, (P >> 4) & 15, (P >> 8) & 15, (P >> 12) & 15,
                              (P >> 16) & 15, (P >> 20) & 15, (P >> 24) & 15, (P >> 28) & 15))


@gluon.jit
def _decode_k(kw, lut, ASM: gl.constexpr, LA: gl.constexpr, NW: gl.constexpr, D: gl.constexpr,
              K_ORDER: gl.constexpr, CODES: gl.constexpr):
    """Key code elements [NW, NT, D/CODES] -> bf16 A operand [NW, NT, D (k-slots)], in
    registers."""
    x = _to_bits(_levels(kw, lut, ASM, CODES, False), NW, D)
    x = _permute_bits(x, K_ORDER, D)
    x = gl.reshape(x, [NW, 16, D])
    return gl.convert_layout(x, LA)


@gluon.jit
def _decode_v(vw, lut, ASM: gl.constexpr, LA: gl.constexpr, PAIR_LAYOUT: gl.constexpr,
              NW: gl.constexpr, D: gl.constexpr, V_ORDER: gl.constexpr, CODES: gl.constexpr):
    """Value code elements [NW, NT, D/CODES] -> bf16 A operand [NW, D (m-slots), NT], in
    registers."""
    vw = gl.convert_layout(vw, PAIR_LAYOUT)  # tokens 2c, 2c+1 of one element side by side
    x = _to_bits(_levels(vw, lut, ASM, CODES, True), NW, D)
    x = _permute_bits(x, V_ORDER, D)
    x = gl.reshape(x, [NW, D, 16])
    return gl.convert_layout(x, LA)


@gluon.jit
def _transpose_p(p, LB: gl.constexpr, NW: gl.constexpr, R: gl.constexpr,
                 TRANS_ASM: gl.constexpr):
    """P [NW, NT, R] bf16 in the accumulator layout (thread (g, c) holds tokens g, g + 8 and
    rows 2c, 2c + 1) -> the B operand [NW, NT (k), R (n)] (tokens 2c, 2c+1, 2c+8, 2c+9, row g).
    TRANS_ASM: one movmatrix.trans per 8x8 block, then the index bits relabelled (free); else
    the compiler's layout conversion."""
    if TRANS_ASM:
        y = gl.inline_asm_elementwise("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", "=r,r",
                                      [p], dtype=gl.bfloat16, is_pure=True, pack=2)
        # y[t, r] (t = t0..t3, r = r0..r2 (r3 for R = 16)) holds P[token r0 + 2 r1 + 4 r2 + 8 t3,
        # row t0 + 2 t1 + 4 t2 + 8 r3]
        if R == 8:
            y = gl.reshape(y, [NW, 2, 2, 2, 2, 2, 2, 2])  # w, t3, t2, t1, t0, r2, r1, r0
            y = gl.permute(y, [0, 1, 5, 6, 7, 2, 3, 4])  # w, t3, r2, r1, r0 | t2, t1, t0
        else:
            y = gl.reshape(y, [NW, 2, 2, 2, 2, 2, 2, 2, 2])  # w, t3..t0, r3, r2, r1, r0
            y = gl.permute(y, [0, 1, 6, 7, 8, 5, 2, 3, 4])  # w, t3, r2, r1, r0 | r3, t2, t1, t0
        y = gl.reshape(y, [NW, 16, R])
        return gl.convert_layout(y, LB)
    else:
        return gl.convert_layout(p, LB)


@gluon.jit
def _mean_ab(m_a, m_b, p0, theta):
    """[A', B'] [NW, RH, R] for warp-tiles starting at positions p0 [NW]."""
    ang = p0.to(gl.float64)[:, None] * theta.to(gl.float64)[None, :]
    c0, s0 = _rope_cos_sin(ang)
    c0 = gl.expand_dims(c0, 2)
    s0 = gl.expand_dims(s0, 2)
    return m_a * c0 + m_b * s0, m_b * c0 - m_a * s0


@gluon.jit
def _stack_ab(a, b, RH: gl.constexpr, R: gl.constexpr):
    """[A'; B'] [2 RH, R] fp16 of A', B' [RH, R] (float32)."""
    ab = gl.permute(gl.join(a.to(gl.float16), b.to(gl.float16)), [2, 0, 1])
    return gl.reshape(ab, [2 * RH, R])


@gluon.jit
def _merge(part_ptr, q_row, head, splits, first, n, stride, G: gl.constexpr, D: gl.constexpr,
           HALF: gl.constexpr, WP: gl.constexpr, V_PART: gl.constexpr, NW: gl.constexpr):
    """(o [HALF, D], l [HALF], m [HALF]): the n partial rows first, first + stride, ... of this
    sequence and KV head merged (tq_attention_parts._tq_reduce_kernel's merge), SC of them a
    step; a partial row itself again (o and l relative to m)."""
    SC: gl.constexpr = 64 // HALF  # 64 float32 registers a thread at D = 128
    M3: gl.constexpr = gl.BlockedLayout([1, 1, D // 32], [1, 1, 32], [1, NW, 1], [2, 1, 0])
    RL: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, M3))
    s = gl.arange(0, SC, gl.SliceLayout(1, gl.SliceLayout(2, M3)))
    r = gl.arange(0, HALF, RL)
    c = gl.arange(0, D, gl.SliceLayout(0, gl.SliceLayout(1, M3)))
    rbase = (q_row.to(gl.int64) * (G * gl.num_programs(1)) + head * G + r) * splits + first
    m_run = gl.full([HALF], -1.0e30, gl.float32, RL)
    l_run = gl.zeros([HALF], gl.float32, RL)
    o_run = gl.zeros([HALF, D], gl.float32, gl.SliceLayout(0, M3))
    for s0 in range(0, n, SC):
        ss = s0 + s
        mask = (ss < n)[:, None] & (r < G)[None, :]
        row = (rbase[None, :] + ss[:, None] * stride) * WP  # [SC, HALF]
        m_s = gl.load(part_ptr + row + V_PART, mask=mask, other=-1.0e30)
        l_s = gl.load(part_ptr + row + V_PART + 1, mask=mask, other=0.0)
        o_s = gl.load(part_ptr + row[:, :, None] + c[None, None, :], mask=mask[:, :, None],
                      other=0.0)
        m_new = gl.maximum(m_run, gl.max(m_s, axis=0))
        alpha = gl.exp2(m_run - m_new)
        beta = gl.exp2(m_s - m_new[None, :])
        l_run = l_run * alpha + gl.sum(l_s * beta, axis=0)
        alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, gl.SliceLayout(0, M3)))
        o_run = o_run * alpha_o[:, None] + gl.sum(o_s * beta[:, :, None], axis=0)
        m_run = m_new
    return o_run, l_run, m_run


@gluon.jit
def _store_merged(part_ptr, o, l, m, q_row, head, splits, slot, G: gl.constexpr,
                  D: gl.constexpr, HALF: gl.constexpr, WP: gl.constexpr, V_PART: gl.constexpr):
    """_merge's result written as partial row `slot` of this sequence and KV head."""
    OL: gl.constexpr = o.type.layout
    r = gl.arange(0, HALF, gl.SliceLayout(1, OL))
    c = gl.arange(0, D, gl.SliceLayout(0, OL))
    row = ((q_row.to(gl.int64) * (G * gl.num_programs(1)) + head * G + r) * splits + slot) * WP
    gl.store(part_ptr + row[:, None] + c[None, :], o, mask=(r < G)[:, None])
    rm = gl.arange(0, HALF, l.type.layout)
    row_m = ((q_row.to(gl.int64) * (G * gl.num_programs(1)) + head * G + rm) * splits
             + slot) * WP
    gl.store(part_ptr + row_m + V_PART, m, mask=rm < G)
    gl.store(part_ptr + row_m + V_PART + 1, l, mask=rm < G)


@gluon.jit
def _h_operand(ptr, LB2: gl.constexpr, D: gl.constexpr, NW: gl.constexpr):
    """A transform's [D, D] 16-bit matrix (H^T in memory: element (k, n) at n D + k) as the B
    operand in LB2: by coalesced 16-byte loads, then through shared memory into the operand's
    layout. Loaded in the operand's layout it took 64 4-byte loads a thread, 8 cache lines a warp
    instruction, ahead of the query's and the merges' own loads in the queue: at 70B TP8 1x32K
    the query arrived 3.8 us after the program's start and H 4.7, with this 2.6 and 3.3
    (H100, 2026-12-07, benchmarks/dev/kv_decode_phases.py: "hk_vec", "h_vec")."""
    HB: gl.constexpr = gl.BlockedLayout([8, 1], [16, 2], [1, NW], [0, 1])
    k = gl.arange(0, D, gl.SliceLayout(1, HB))
    n = gl.arange(0, D, gl.SliceLayout(0, HB))
    return gl.convert_layout(gl.load(ptr + n[None, :] * D + k[:, None]), LB2)


@gluon.jit
def _finish_operands(hvt_ptr, signs_ptr, value_mean_ptr, head, L2: gl.constexpr,
                     D: gl.constexpr):
    """_finish's tables (H_v's rows in m-slot order, transposed, as the B operand; signs /
    sqrt(D); the head's value mean), loaded before the merge so their latency hides under it."""
    h = _h_operand(hvt_ptr, gl.DotOperandLayout(1, L2, 2), D, gl.num_warps()).to(gl.bfloat16)
    c = gl.arange(0, D, gl.SliceLayout(0, L2))
    sg = gl.load(signs_ptr + c) * (1.0 / (D ** 0.5))
    mean = gl.load(value_mean_ptr + head * D + c)
    return h, sg, mean


@gluon.jit
def _finish(o_t, l, q_row, head, out_ptr, stride_ot, stride_oh, h, sg, mean,
            L2: gl.constexpr, G: gl.constexpr, D: gl.constexpr, HALF: gl.constexpr):
    """out rows = value_mean + signs * ((o / l) @ H_v) / sqrt(D) for the HALF rows of o_t [HALF,
    D] (m-slot order; h, sg, mean: _finish_operands), the finish of
    tq_attention_parts._tq_reduce_kernel with its bf16 dot."""
    LA2: gl.constexpr = gl.DotOperandLayout(0, L2, 2)
    l = gl.convert_layout(l, gl.SliceLayout(1, o_t.type.layout))
    x = o_t / gl.maximum(l, 1e-30)[:, None]  # [HALF, D]
    if HALF < 8:  # rows padded to the MMA's 16 with zeros
        x = gl.reshape(gl.permute(gl.join(x, gl.zeros_like(x)), [2, 0, 1]), [2 * HALF, D])
    if HALF < 16:
        x = gl.reshape(gl.permute(gl.join(x, gl.zeros_like(x)), [2, 0, 1]), [16, D])
    a = gl.convert_layout(x.to(gl.bfloat16), LA2)
    acc = mma_v2(a, h, gl.zeros([16, D], gl.float32, L2))
    c = gl.arange(0, D, gl.SliceLayout(0, L2))
    r = gl.arange(0, 16, gl.SliceLayout(1, L2))
    res = acc * sg[None, :] + mean[None, :]
    rows = out_ptr + q_row.to(gl.int64) * stride_ot + (head * G + r) * stride_oh
    ptrs = rows[:, None] + c[None, :]
    gl.store(ptrs, res.to(out_ptr.dtype.element_ty), mask=(r < G)[:, None])


# ---------------------------------------------------------------------------------------------
# The kernel


@gluon.jit
def _tq_decode_hopper_kernel(
    q_ptr, stride_qt, stride_qh,
    cache_ptr, stride_blk, block_table_ptr, stride_bt, seq_lens_ptr, query_start_ptr,
    signs_ptr, key_scale_ptr, key_mean_ptr, mean_pairs_ptr, mean_theta_ptr, mean_step_ptr,
    mean_mu_ptr, mean_table_ptr, hk_ptr, part_ptr, qk_scale,
    lut0, lut1, lut2, lut3, lut_zero, klut0, klut1, klut2, klut3, klut4, klut5, klut6, klut7,
    out_ptr, stride_ot, stride_oh, hvt_ptr, value_mean_ptr, count_ptr,
    G: gl.constexpr, NW: gl.constexpr, D: gl.constexpr,
    FOLD: gl.constexpr, SELECT: gl.constexpr, R: gl.constexpr, HALF: gl.constexpr,
    MEAN: gl.constexpr, ROT_HALF: gl.constexpr, RH: gl.constexpr, MEAN_SMEM: gl.constexpr,
    PREFETCH: gl.constexpr, TRANS_ASM: gl.constexpr,
    FINISH: gl.constexpr, GROUP: gl.constexpr,
    PAGE: gl.constexpr, STRIDE_TOK: gl.constexpr, STRIDE_HEAD: gl.constexpr,
    K_OFF: gl.constexpr, V_OFF: gl.constexpr, K_NORM_OFF: gl.constexpr, V_NORM_OFF: gl.constexpr,
    ASM: gl.constexpr, V_ASM: gl.constexpr, WP: gl.constexpr, V_PART: gl.constexpr,
    K_LOAD: gl.constexpr, V_LOAD: gl.constexpr, V_PAIR: gl.constexpr,
    K_ORDER: gl.constexpr, V_ORDER: gl.constexpr, K_CODES: gl.constexpr, V_CODES: gl.constexpr,
    K_E: gl.constexpr, V_E: gl.constexpr, K_WORD: gl.constexpr, V_WORD: gl.constexpr,
):
    seq = gl.program_id(0)
    head = gl.program_id(1)
    split = gl.program_id(2)

    # Layouts: one batched mma.sync layout (dim 0: the warp) for S^T = K Q^T [NW, NT, R] and
    # O^T = V^T P^T [NW, D, R]; its operands; the query transform's 2-D mma.
    L: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1, 1],
                                                instr_shape=[1, 16, 8])
    LA: gl.constexpr = gl.DotOperandLayout(0, L, 2)
    LB: gl.constexpr = gl.DotOperandLayout(1, L, 2)
    ROWS: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, L))  # [R]
    TOKS: gl.constexpr = gl.SliceLayout(2, L)  # [NW, NT]
    STAT: gl.constexpr = gl.SliceLayout(1, L)  # [NW, R]: per-row softmax state
    L2: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NW],
                                                 instr_shape=[16, 8])
    LA2: gl.constexpr = gl.DotOperandLayout(0, L2, 2)
    LB2: gl.constexpr = gl.DotOperandLayout(1, L2, 2)

    q_row = gl.load(query_start_ptr + seq)
    # The lookup's table words, made per-thread values (+ lane id * 0): ptxas keeps kernel
    # arguments in uniform registers and copied them into a register before every lookup.
    one: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
    lane0 = gl.max(gl.arange(0, 32 * NW, one), axis=0) * lut_zero
    lut = (lut0 + lane0, lut1 + lane0, lut2 + lane0, lut3 + lane0)
    if K_CODES == 5:  # the 5-bit keys' eight table words (the values take lut)
        klut = (klut0 + lane0, klut1 + lane0, klut2 + lane0, klut3 + lane0, klut4 + lane0,
                klut5 + lane0, klut6 + lane0, klut7 + lane0)
    else:
        klut = lut
    kv_end = gl.load(seq_lens_ptr + seq)
    bt_row = block_table_ptr + seq.to(gl.int64) * stride_bt

    # 0. This program's share: tiles of 16 * NW tokens, [tile_lo, tile_hi); warp w takes tokens
    #    [16 w, 16 w + 16) of each. PREFETCH (1 or 2 tiles ahead): the first tile's codes are
    #    loaded before the query is transformed (the loads' latency under the prologue's work).
    num_tiles = gl.cdiv(kv_end, 16 * NW)
    splits = gl.num_programs(2)  # a runtime value: one compile serves every split count
    per_split = gl.cdiv(num_tiles, splits)
    tile_lo = split * per_split
    tile_hi = gl.minimum(tile_lo + per_split, num_tiles)
    W1: gl.constexpr = gl.SliceLayout(1, TOKS)
    if PREFETCH:
        base, kw, vw = _tile_codes(
            cache_ptr, bt_row, tile_lo, kv_end, head, stride_blk, W1, NW, PAGE, STRIDE_TOK,
            STRIDE_HEAD, K_LOAD, K_OFF, K_E, K_WORD, K_CODES, V_LOAD, V_OFF, V_E, V_WORD, V_CODES)
        if PREFETCH == 2:  # the second tile's codes too
            base2, kw2, vw2 = _tile_codes(
                cache_ptr, bt_row, tile_lo + 1, kv_end, head, stride_blk, W1, NW, PAGE,
                STRIDE_TOK, STRIDE_HEAD, K_LOAD, K_OFF, K_E, K_WORD, K_CODES, V_LOAD, V_OFF, V_E,
                V_WORD, V_CODES)

    # 1. The query, transformed once: q~ = (q * scale_k * signs) @ H[:, k_perm] * qk_scale, as
    #    B operands Q^T. Rows [0, XH) calibrated, [XH, 2 XH) uncalibrated (the raw keys' query):
    #    FOLD scores both halves as rows of one operand (R = 2 XH), SELECT as two operands of
    #    R = XH = 8 rows (G 5..8: 8 rows instead of 16 for softmax and O) and keeps per key the
    #    score of its kind.
    XH: gl.constexpr = 8 if SELECT else HALF
    RAWQ: gl.constexpr = FOLD or SELECT
    r2 = gl.arange(0, 16, gl.SliceLayout(1, LA2))
    d2 = gl.arange(0, D, gl.SliceLayout(0, LA2))
    q_mask2 = ((r2 % XH) < G) & (r2 < (2 * XH if RAWQ else R))
    q_ptrs = q_ptr + q_row.to(gl.int64) * stride_qt + (head * G + r2 % XH) * stride_qh
    x = gl.load(q_ptrs[:, None] + d2[None, :], mask=q_mask2[:, None], other=0.0).to(gl.float32)
    sgn = gl.load(signs_ptr + d2)
    ksc = gl.load(key_scale_ptr + head * D + d2)
    if RAWQ:
        x = x * gl.where((r2 >= XH)[:, None], sgn[None, :], (ksc * sgn)[None, :])
    else:
        x = x * (ksc * sgn)[None, :]
    h = _h_operand(hk_ptr, LB2, D, NW)
    qt = mma_v2(x.to(gl.bfloat16), h, gl.zeros([16, D], gl.float32, L2))
    qt = gl.permute((qt * qk_scale).to(gl.bfloat16), [1, 0])  # [D, 16]
    if R == 8:
        qt = gl.reshape(qt, [D, 2, 8])
        qt, qt_raw = gl.split(gl.permute(qt, [0, 2, 1]))
        if SELECT:
            qb_raw = gl.convert_layout(qt_raw, gl.SliceLayout(0, LB))
            qb_raw = gl.expand_dims(qb_raw, 0).broadcast_to([NW, D, R])
    qb = gl.convert_layout(qt, gl.SliceLayout(0, LB))
    qb = gl.expand_dims(qb, 0).broadcast_to([NW, D, R])

    r = gl.arange(0, R, ROWS)
    raw_row = r >= HALF

    # 2. The key mean's per-row constants (zero in raw rows): q . RoPE_p(mu) = sum over pairs of
    #    A_i cos(p t_i) + B_i sin(p t_i) + m_c.
    if MEAN:
        qs = qk_scale * (D ** 0.5)
        # m_c: the channels past the rotary ones
        dc = gl.arange(0, D, gl.SliceLayout(0, LA2))
        mu = gl.load(key_mean_ptr + head * D + dc)
        xq = gl.load(q_ptrs[:, None] + dc[None, :],
                     mask=(q_mask2 & (r2 < XH))[:, None], other=0.0).to(gl.float32)
        m_c = gl.sum(gl.where(dc[None, :] >= 2 * ROT_HALF, xq * mu[None, :], 0.0), axis=1) * qs
        if R == 8:
            m_c, _unused2 = gl.split(gl.permute(gl.reshape(m_c, [2, 8]), [1, 0]))
        m_c = gl.convert_layout(m_c, ROWS)
    if MEAN and MEAN_SMEM:
        # [A', B'] [RH, R] of the tile's first position, one copy per program spread over its
        # threads (MR: SPT elements each), rotated by one tile per tile and handed to the warps
        # through shared memory as the fp16 B operand [2 RH (k), R] (ab_s). Each warp's A
        # operand [cos | sin] holds its own 16 of the tile's 16 NW positions
        # (mean_rows), so all warps take the same B operand. The 2-D mma layout
        # LM splits the tile's tokens across the warps as L does.
        SPT: gl.constexpr = RH * R // (32 * NW) if RH * R >= 32 * NW else 1
        MR: gl.constexpr = gl.BlockedLayout([1, SPT], [32 * SPT // R, R // SPT], [NW, 1], [1, 0])
        LM: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1],
                                                     instr_shape=[16, 8])
        LMA: gl.constexpr = gl.DotOperandLayout(0, LM, 2)
        LMB: gl.constexpr = gl.DotOperandLayout(1, LM, 2)
        rb = gl.arange(0, R, gl.SliceLayout(0, MR))
        jj = head * RH + gl.arange(0, RH, gl.SliceLayout(1, MR))
        pi = gl.load(mean_pairs_ptr + jj)
        mrow = ((rb % XH) < G) & (rb < XH)
        i_mask = (pi >= 0)[:, None] & mrow[None, :]
        q2 = q_ptr + q_row.to(gl.int64) * stride_qt + (head * G + rb % XH) * stride_qh
        q_a = gl.load(q2[None, :] + pi[:, None], mask=i_mask, other=0.0).to(gl.float32)
        q_b = gl.load(q2[None, :] + ROT_HALF + pi[:, None], mask=i_mask, other=0.0).to(gl.float32)
        mu_a = gl.load(mean_mu_ptr + 2 * jj)[:, None]
        mu_b = gl.load(mean_mu_ptr + 2 * jj + 1)[:, None]
        m_a = (q_a * mu_a + q_b * mu_b) * qs
        m_b = (q_b * mu_a - q_a * mu_b) * qs
        # the per-tile rotation, exact from the host (mean_step): its error would accumulate
        c_step = gl.load(mean_step_ptr + jj)[:, None]
        s_step = gl.load(mean_step_ptr + gl.num_programs(1) * RH + jj)[:, None]
        theta = gl.load(mean_theta_ptr + jj)
        c0, s0 = _rope_cos_sin((tile_lo * (16 * NW)).to(gl.float64) * theta.to(gl.float64))
        a_m = m_a * c0[:, None] + m_b * s0[:, None]  # exact at the first tile
        b_m = m_b * c0[:, None] - m_a * s0[:, None]
        # [cos | sin] (j t) [16 NW (m), 2 RH (k)] (mean_rows)
        tn = gl.arange(0, 16 * NW, gl.SliceLayout(1, LMA))
        tk = gl.arange(0, 2 * RH, gl.SliceLayout(0, LMA))
        t_cs = gl.load(mean_table_ptr + (head * (16 * NW) + tn[:, None]) * (2 * RH) + tk[None, :])
        ab_s = gl.allocate_shared_memory(gl.float16, [2 * RH, R],
                                         gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
        ab_s.store(_stack_ab(a_m, b_m, RH, R))
        _cta_barrier()
    elif MEAN:  # each warp its own [A', B'] as B operands [NW, RH (k), R (n)], in registers
        RB: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, LB))  # rows (n) of the B operand
        PB: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, LB))  # pairs (k) of the B operand
        TP: gl.constexpr = gl.SliceLayout(2, LB)  # [NW, RH] angles
        rb = gl.arange(0, R, RB)
        jj = head * RH + gl.arange(0, RH, PB)
        pi = gl.load(mean_pairs_ptr + jj)
        mrow = ((rb % XH) < G) & (rb < XH)
        i_mask = (pi >= 0)[None, :, None] & mrow[None, None, :]
        q3 = (q_ptr + q_row.to(gl.int64) * stride_qt + (head * G + rb % XH) * stride_qh)
        q3 = q3[None, None, :] + gl.zeros([NW, 1, 1], gl.int32, LB)
        q_a = gl.load(q3 + pi[None, :, None], mask=i_mask, other=0.0).to(gl.float32)
        q_b = gl.load(q3 + ROT_HALF + pi[None, :, None], mask=i_mask, other=0.0).to(gl.float32)
        mu_a = gl.load(mean_mu_ptr + 2 * jj)[None, :, None]
        mu_b = gl.load(mean_mu_ptr + 2 * jj + 1)[None, :, None]
        m_a = (q_a * mu_a + q_b * mu_b) * qs
        m_b = (q_b * mu_a - q_a * mu_b) * qs
        theta = gl.load(mean_theta_ptr + jj)
        # the per-tile rotation, exact from the host (mean_step): its error would accumulate
        c_step = gl.load(mean_step_ptr + jj)
        s_step = gl.load(mean_step_ptr + gl.num_programs(1) * RH + jj)
        c_step = gl.expand_dims(gl.expand_dims(c_step, 0), 2)
        s_step = gl.expand_dims(gl.expand_dims(s_step, 0), 2)
        # cos / sin (j t) of the head's pairs as A operands [NT (m), RH (k)], fp16, in registers
        # (the table's first 16 of its 16 * NW positions)
        tn = gl.arange(0, 16, gl.SliceLayout(1, gl.SliceLayout(0, LA)))
        tj = gl.arange(0, RH, gl.SliceLayout(0, gl.SliceLayout(0, LA)))
        t_off = (head * (16 * NW) + tn[:, None]) * (2 * RH) + tj[None, :]
        t_cos = gl.load(mean_table_ptr + t_off)
        t_sin = gl.load(mean_table_ptr + RH + t_off)
        t_cos = gl.expand_dims(t_cos, 0).broadcast_to([NW, 16, RH])
        t_sin = gl.expand_dims(t_sin, 0).broadcast_to([NW, 16, RH])
        wv = gl.arange(0, NW, gl.SliceLayout(1, TP))

    m_i = gl.full([NW, R], -1.0e30, gl.float32, STAT)
    l_t = gl.zeros([NW, 16, R], gl.float32, L)  # per-thread sums of p: summed once at the end
    o = gl.zeros([NW, D, R], gl.float32, L)
    if MEAN and not MEAN_SMEM:  # exact at the first tile, then rotated in float32 (the drift
        # over 2048 tiles, ~1e-4, stays under the fp16 rounding of the MMA operand, 5e-4)
        a_t, b_t = _mean_ab(m_a, m_b, (tile_lo * NW + wv) * 16, theta)
    for tile in range(tile_lo, tile_hi):
        if PREFETCH:
            kw_now = kw
            vw_now = vw
            base_now = base
            if PREFETCH == 2:  # tile + 1's codes are in flight already: load tile + 2's
                kw = kw2
                vw = vw2
                base = base2
                base2, kw2, vw2 = _tile_codes(
                    cache_ptr, bt_row, tile + 2, kv_end, head, stride_blk, W1, NW, PAGE,
                    STRIDE_TOK, STRIDE_HEAD, K_LOAD, K_OFF, K_E, K_WORD, K_CODES, V_LOAD, V_OFF,
                    V_E, V_WORD, V_CODES)
            else:
                base, kw, vw = _tile_codes(
                    cache_ptr, bt_row, tile + 1, kv_end, head, stride_blk, W1, NW, PAGE,
                    STRIDE_TOK, STRIDE_HEAD, K_LOAD, K_OFF, K_E, K_WORD, K_CODES, V_LOAD, V_OFF,
                    V_E, V_WORD, V_CODES)
        else:
            base_now, kw_now, vw_now = _tile_codes(
                cache_ptr, bt_row, tile, kv_end, head, stride_blk, W1, NW, PAGE, STRIDE_TOK,
                STRIDE_HEAD, K_LOAD, K_OFF, K_E, K_WORD, K_CODES, V_LOAD, V_OFF, V_E, V_WORD,
                V_CODES)
        if MEAN and MEAN_SMEM:  # independent of the codes: issued before they are decoded
            s_mean = mma_v2(t_cs, ab_s.load(LMB), gl.zeros([16 * NW, R], gl.float32, LM))
            s_mean = gl.convert_layout(gl.reshape(s_mean, [NW, 16, R]), L)
            a_m, b_m = a_m * c_step + b_m * s_step, b_m * c_step - a_m * s_step
        elif MEAN:
            s_mean = mma_v2(t_cos, a_t.to(gl.float16), gl.zeros([NW, 16, R], gl.float32, L))
            s_mean = mma_v2(t_sin, b_t.to(gl.float16), s_mean)
            a_t, b_t = a_t * c_step + b_t * s_step, b_t * c_step - a_t * s_step
        kn, vn, ok = _load_norms(cache_ptr, base_now, tile, kv_end, TOKS, K_NORM_OFF,
                                 V_NORM_OFF, NW, STRIDE_TOK)
        ka = _decode_k(kw_now, klut, ASM, LA, NW, D, K_ORDER, K_CODES)
        s = mma_v2(ka, qb, gl.zeros([NW, 16, R], gl.float32, L))  # S^T [NW, NT, R]
        s = s * gl.expand_dims(gl.abs(kn), 2)
        if SELECT:
            s_raw = mma_v2(ka, qb_raw, gl.zeros([NW, 16, R], gl.float32, L))
            s_raw = s_raw * gl.expand_dims(gl.abs(kn), 2)
        if MEAN:
            s = s + (s_mean + gl.expand_dims(gl.expand_dims(m_c, 0), 1))
        if SELECT:
            s = gl.where(gl.expand_dims(kn < 0, 2), s_raw, s)
        visible = gl.expand_dims(ok, 2)
        if FOLD:
            is_raw = gl.expand_dims(kn < 0, 2)
            visible = visible & (is_raw == gl.expand_dims(gl.expand_dims(raw_row, 0), 1))
        s = gl.where(visible, s, float("-inf"))

        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        l_t = l_t * gl.expand_dims(alpha, 1) + p
        m_i = m_new
        pv = (p * gl.expand_dims(vn, 2)).to(gl.bfloat16)
        pb = _transpose_p(pv, LB, NW, R, TRANS_ASM)
        va = _decode_v(vw_now, lut, V_ASM, LA, V_PAIR, NW, D, V_ORDER, V_CODES)
        o = mma_v2(va, pb, o * gl.expand_dims(alpha, 1))
        if MEAN and MEAN_SMEM:  # the next tile's [A', B'] written once every warp read this one's,
            # read once all of it is written (the compiler would add these barriers itself)
            _cta_barrier()
            ab_s.store(_stack_ab(a_m, b_m, RH, R))
            _cta_barrier()

    # 4. Merge the warps (and FOLD's two halves: rows h and HALF + h) once, write partial rows.
    #    O, m and l are converted once to a layout with the warps and halves in each thread's
    #    registers, so the weights and sums are in-thread: 70B TP8 1x32K, tile loop end -> counter
    #    597 -> 248 SASS and 12 -> 7 CTA barriers, that phase 2.80 -> 1.15 us, the call 16.2 ->
    #    14.9 us graph (H100, 2026-12-07, benchmarks/dev/kv_decode_phases.py: "warp_reduce" there
    #    is the earlier cross-warp reduction).
    l_i = gl.sum(l_t, axis=1)
    R2: gl.constexpr = R // HALF
    m4 = gl.reshape(m_i, [NW, R2, HALF])
    l4 = gl.reshape(l_i, [NW, R2, HALF])
    o4 = gl.reshape(o, [NW, D, R2, HALF])
    OW: gl.constexpr = gl.BlockedLayout([NW, 4, R2, 1], [1, 8, 1, 4], [1, NW, 1, 1],
                                        [1, 0, 2, 3])
    MW: gl.constexpr = gl.SliceLayout(1, OW)
    mw = gl.convert_layout(m4, MW)
    lw = gl.convert_layout(l4, MW)
    ow = gl.convert_layout(o4, OW)
    m_all = gl.max(gl.max(mw, axis=1), axis=0)
    w = gl.exp2(mw - gl.expand_dims(gl.expand_dims(m_all, 0), 1))
    l_all = gl.sum(gl.sum(lw * w, axis=1), axis=0)
    o_all = gl.sum(gl.sum(ow * gl.expand_dims(w, 1), axis=2), axis=0)  # [D, HALF]
    OL: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, OW))
    co = gl.arange(0, D, gl.SliceLayout(1, OL))
    ro = gl.arange(0, HALF, gl.SliceLayout(0, OL))
    rows_head = head * G + ro
    if FINISH == 1:  # one split: the rows finished here, as _tq_reduce_kernel would
        h_v, sg_v, mean_v = _finish_operands(hvt_ptr, signs_ptr, value_mean_ptr, head, L2, D)
        _finish(gl.permute(o_all, [1, 0]), l_all, q_row, head, out_ptr, stride_ot, stride_oh,
                h_v, sg_v, mean_v, L2, G, D, HALF)
    else:
        row_base = ((q_row.to(gl.int64) * (G * gl.num_programs(1)) + rows_head) * splits
                    + split) * WP
        gl.store(part_ptr + row_base[None, :] + co[:, None], o_all, mask=(ro < G)[None, :])
        ML: gl.constexpr = gl.SliceLayout(0, OL)
        gl.store(part_ptr + row_base + V_PART, gl.convert_layout(m_all, ML), mask=ro < G)
        gl.store(part_ptr + row_base + V_PART + 1, gl.convert_layout(l_all, ML), mask=ro < G)
        if FINISH == 2:  # the programs that complete a group, then all groups, merge them
            _cta_barrier()  # every thread's partial stored before the release below
            groups = gl.cdiv(splits, GROUP)
            group = split // GROUP
            in_group = gl.minimum(GROUP, splits - group * GROUP)
            counts = count_ptr + (seq * gl.num_programs(1) + head) * (groups + 1)
            done = gl.atomic_add(counts + group, 1, sem="acq_rel", scope="gpu")
            if done == in_group - 1:
                gl.store(counts + group, 0)  # zero again for the next launch (graph replays)
                h_v, sg_v, mean_v = _finish_operands(hvt_ptr, signs_ptr, value_mean_ptr, head,
                                                     L2, D)
                o_t, l_m, m_m = _merge(part_ptr, q_row, head, splits, group * GROUP, in_group,
                                       1, G, D, HALF, WP, V_PART, NW)
                last = groups == 1
                if groups > 1:  # the group's merge replaces its first partial; the last group
                    _cta_barrier()  # (every thread's reads of that partial done) merges them
                    _store_merged(part_ptr, o_t, l_m, m_m, q_row, head, splits, group * GROUP,
                                  G, D, HALF, WP, V_PART)
                    _cta_barrier()
                    top = gl.atomic_add(counts + groups, 1, sem="acq_rel", scope="gpu")
                    last = top == groups - 1
                    if last:
                        gl.store(counts + groups, 0)
                        o_t, l_m, m_m = _merge(part_ptr, q_row, head, splits, 0, groups, GROUP,
                                               G, D, HALF, WP, V_PART, NW)
                if last:
                    _finish(o_t, l_m, q_row, head, out_ptr, stride_ot, stride_oh, h_v, sg_v,
                            mean_v, L2, G, D, HALF)


# ---------------------------------------------------------------------------------------------
# Launcher


def kernel_constexprs(tables, G: int, page: int, stride_tok: int, stride_head: int,
                      nw: int = 4, prefetch: int = 0, trans_asm: bool = True,
                      codes: int | None = None, finish: int = 0,
                      mean_smem: bool | None = None) -> dict:
    """The kernel's constexpr arguments for a layer (tables: LayerTables with hopper_asm, see
    vllm_gds/kvcache/hopper_tables.attach). codes: 3 (3-bit codes), 4 (4-bit codes in int16
    elements) or 2 (4-bit codes, bytes into the lookup) or 5 (tq5: 5-bit keys, 4-bit values);
    None: tables.hopper_codes. finish (finish_mode): 1 one split, the output rows written by the
    kernel itself; 2 partials, merged and finished by the programs that complete them (merge
    groups of MERGE_GROUP, then the groups); 0 partials only (the loop measured alone:
    tests/hopper_compile.py). mean_smem: the key mean's B operands shared by the warps through
    shared memory (else each warp rotates its own in registers); None: mean_smem_served."""
    codes = codes or tables.hopper_codes
    kc, vc = stream_codes(codes)
    layout = tables.layout
    d = layout.head_size
    kw = tables.constexprs
    fold, select, rows, half = rows_of(G, bool(tables.fallback))
    return dict(
        G=G, NW=nw, D=d, FOLD=fold, SELECT=select, R=rows, HALF=half,
        MEAN=bool(tables.has_mean), ROT_HALF=tables.rot_half, RH=tables.rot_half_pad,
        MEAN_SMEM=mean_smem_served(tables.rot_half_pad, G) if mean_smem is None else mean_smem,
        PREFETCH=int(prefetch), TRANS_ASM=trans_asm, FINISH=finish, GROUP=MERGE_GROUP,
        PAGE=page, STRIDE_TOK=stride_tok, STRIDE_HEAD=stride_head,
        K_OFF=kw["KB_OFF"], V_OFF=kw["VB_OFF"], K_NORM_OFF=kw["K_NORM_OFF"],
        V_NORM_OFF=kw["V_NORM_OFF"], ASM=tables.hopper_asm[codes, "k"],
        V_ASM=tables.hopper_asm[codes, "v"],
        WP=kw["VA_W"] + kw["VB_W"] + 4,  # o, m, l and two words: rows 16-byte aligned
        V_PART=kw["VA_W"] + kw["VB_W"],
        K_LOAD=k_load_layout(d, nw, kc), V_LOAD=v_load_layout(d, nw, vc, False),
        V_PAIR=v_load_layout(d, nw, vc, True), K_ORDER=perm_code(k_order(d, kc)),
        V_ORDER=perm_code(v_order(d, vc)), K_CODES=kc, V_CODES=vc,
        K_E=geometry(d, kc, "k")[0], V_E=geometry(d, vc, "v")[0],
        K_WORD=WORD_BYTES[kc, "k"], V_WORD=WORD_BYTES[vc, "v"],
    )


# The launch's register limit: the most a thread can have, given so that ptxas schedules for
# registers rather than for occupancy. Without one (Triton 3.6's ptxas) it gave the 8B tq4
# kernel 168 registers (three programs an SM) and moved the next tile's code loads from the
# middle of the tile loop to its end, where their latency shows: 0.378 -> 0.422 ms at 8B 64x8K,
# 0.112 -> 0.123 at 32x4K (H100, 2026-12-06); with any limit it keeps them in the middle.
MAXNREG = 255
# The key mean's B operand shared by the warps through shared memory (MEAN_SMEM) where a head keeps
# at least this many RoPE pairs: tq3's 64 (its tile loop 623 -> 492 SASS; graph 57.5 -> 51.9 us
# at 70B TP8 64x8K, 103 -> 92 at 8x128K), not tq4's or tq5's 32, where each warp's own copy in
# registers is cheaper than the two barriers a tile (with them tq4 took 8B 32x4K 92.9 -> 100.6
# us, 8x128K 687 -> 690 graph / 647 -> 691 do_bench; H100, 2026-12-06).
MEAN_SMEM_PAIRS = 64
# ... and where the GQA group is over 4 query heads (SELECT, R = 16: the 70B TP8 shapes, where the
# register copy costs most). At G = 4 (8B) tq3's register copy is 531 SASS a tile at 244 registers
# against MEAN_SMEM's 481 at 204, both two programs an SM and no spills, and MEAN_SMEM's two
# barriers a tile made tq3 0.5-2% slower than tq4 at 8B 8x32K and 8x128K (H100, 2026-12-06); per
# warp there tq3/tq4 is 0.94 / 0.93 (H100, 2026-12-07, 163.7 against 174.5 us graph at 8x32K).
MEAN_SMEM_MIN_G = 5


def mean_smem_served(rot_half_pad: int, G: int) -> bool:
    """Whether the served launch shares the key mean's operand through shared memory."""
    return rot_half_pad >= MEAN_SMEM_PAIRS and G >= MEAN_SMEM_MIN_G

# How many tiles ahead the served launch loads the codes (the kernel's PREFETCH: 0, 1 or 2). Loading
# the next tile's norms too and the block table two tiles ahead measured no faster (graph times
# equal at 70B TP8 1x32K and 32x4K and 8B 1x32K, 2% slower at 8B 64x8K; H100, 2026-12-06,
# kv_hopper_check variants). Two tiles' codes: slower for tq4 at every shape timed (its registers
# are full), for tq3 faster at all five 70B TP8 shapes (G = 8; cold device time 15.9 -> 15.1 us
# at 1x32K, 21.6 -> 19.5 at 32x4K, 54.2 -> 48.9 at 64x8K, 35.0 -> 31.9 at 8x32K, 91.5 -> 85.5 at
# 8x128K) and slower at the 8B ones (G = 4; 34.6 -> 36.6 at 1x32K, 87.2 -> 88.7 at 32x4K,
# 157.3 -> 168.8 at 8x32K): H100, 2026-12-07, benchmarks/dev/kv_decode_phases.py.
PREFETCH = 1
PREFETCH_DEEP = 2
PREFETCH_DEEP_CODES = 3  # tq3
PREFETCH_DEEP_MIN_G = 5  # as MEAN_SMEM: the 70B TP8 shapes' groups of 8, not 8B's of 4


def prefetch_served(codes: int, G: int) -> int:
    """The tiles ahead whose codes the served launch loads (the kernel's PREFETCH)."""
    deep = codes == PREFETCH_DEEP_CODES and G >= PREFETCH_DEEP_MIN_G
    return PREFETCH_DEEP if deep else PREFETCH


def decode_launch(query, kv_cache, block_table, seq_lens, query_start_loc, tables,
                  softmax_scale: float, splits: int, out, *, num_warps: int = 4,
                  prefetch: int | None = None, trans_asm: bool = True,
                  codes: int | None = None, maxnreg: int | None = None, counts=None,
                  mean_smem: bool | None = None):
    """(grid, args, keyword args) of the decode kernel's launch writing `out` (no checks, no
    launch: tq_decode_hopper launches it; tests/hopper_compile.py binds and compiles it without a
    GPU). prefetch: the tiles ahead whose codes are loaded (0, 1, 2); None: prefetch_served. maxnreg
    None: MAXNREG (0: no limit). From the launch sweep on an H100, 2026-12-06
    (benchmarks/RESULTS.md, History: the first Hopper pass): 4 warps, prefetch, the served split
    count were the fastest of 24 launches at 8B 64x8K and 1x32K and at 70B TP8 1x32K and 32x4K
    (the 168-register limit: 0.417 against 0.382 ms at 8B 64x8K). counts: the completion
    counters (int32 zeros, counter_count of them, left zero), made here if None.
    mean_smem: the key mean's operand shared through shared memory or per warp in registers
    (kernel_constexprs; None: the served choice, by MEAN_SMEM_PAIRS)."""
    T, Hq, D = query.shape
    H = kv_cache.shape[2]
    finish = finish_mode(splits)
    cx = launch_constexprs(tables, Hq // H, kv_cache, num_warps, prefetch, trans_asm, codes,
                           maxnreg, finish, mean_smem)
    part = out
    if finish == 2:
        part = partials(T * Hq, splits, cx["WP"], query.device)
        if counts is None:
            counts = torch.zeros(counter_count(seq_lens.shape[0], H, splits), dtype=torch.int32,
                                 device=query.device)
    args = (query, query.stride(0), query.stride(1),
            kv_cache, kv_cache.stride(0), block_table, block_table.stride(0), seq_lens,
            query_start_loc, *table_args(tables, codes, num_warps),
            part, softmax_scale * LOG2E / D**0.5, *lut_args(tables),
            *finish_args(out, tables, codes), seq_lens if counts is None else counts)
    return (seq_lens.shape[0], H, splits), args, cx


def launch_constexprs(tables, G: int, kv_cache, num_warps: int = 4, prefetch: int | None = None,
                      trans_asm: bool = True, codes: int | None = None,
                      maxnreg: int | None = None, finish: int = 0,
                      mean_smem: bool | None = None) -> dict:
    """decode_launch's keyword arguments (constexprs, warps, register limit), made once per layer
    and launch shape (the layouts and PTX: the host launch counts)."""
    codes = codes or tables.hopper_codes
    maxnreg = MAXNREG if maxnreg is None else maxnreg
    key = (G, kv_cache.shape[1], kv_cache.stride(1), kv_cache.stride(2), num_warps, prefetch,
           trans_asm, codes, maxnreg, finish, mean_smem)
    cache = tables.__dict__.setdefault("_hopper_launch", {})
    cx = cache.get(key)
    if cx is None:
        served = prefetch_served(codes, G) if prefetch is None else prefetch
        cx = kernel_constexprs(tables, *key[:5], served, trans_asm, codes, finish, mean_smem)
        if maxnreg:
            cx["maxnreg"] = maxnreg
        cx = cache[key] = dict(num_warps=num_warps, **cx)
    return cx


# Splits per merge group (FINISH 2): the program that completes a group merges its partials (one
# step of _merge's 8 at 8 rows), the one that completes the last group merges the groups' and
# finishes; one group where splits <= MERGE_GROUP. Two short merges instead of one of every split
# (a program merging 64 splits took 15 us in the reduce launch, ncu, H100) or a second launch.
MERGE_GROUP = 8


def finish_mode(splits: int) -> int:
    """The kernel's FINISH for a launch that writes the output: 1 (one split: no partials), else 2
    (the programs that complete a merge group, then the groups, merge them: no reduce launch)."""
    return 1 if splits == 1 else 2


def counter_count(num_seqs: int, kv_heads: int, splits: int) -> int:
    """int32 completion counters FINISH 2 needs: one per merge group and one for the groups, per
    sequence and KV head."""
    return num_seqs * kv_heads * (-(-splits // MERGE_GROUP) + 1)


def partials(rows: int, splits: int, width: int, device) -> torch.Tensor:
    """The partial rows FINISH 2 writes and merges: `splits` of `width` float32 words (o, m, l
    and two unused, so that rows start 16-byte aligned) per query row and head."""
    return torch.empty(rows * splits * width, dtype=torch.float32, device=device)


def finish_tables(tables, codes: int | None = None) -> tuple:
    """The finish's tables among the kernel's arguments (hvt_ptr, value_mean_ptr)."""
    return finish_rows(tables, codes), tables.value_mean


def finish_args(out, tables, codes: int | None = None) -> tuple:
    """The kernel's arguments after the table words, out_ptr .. value_mean_ptr (read where
    FINISH)."""
    return (out, out.stride(0), out.stride(1), *finish_tables(tables, codes))


def tq_decode_hopper(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, query_start_loc: torch.Tensor, tables,
                     softmax_scale: float, out: torch.Tensor | None = None, *,
                     splits: int | None = None, **launch) -> torch.Tensor:
    """Decode (one query token per sequence) over the quantized paged cache: tq_attention's decode
    launch, same inputs and result. tables must carry hopper tables (hopper_tables.attach).
    launch: decode_launch's keywords (num_warps, prefetch, trans_asm, codes, maxnreg,
    mean_smem), for measuring."""
    from .tq_attention import default_splits

    if out is None:
        out = torch.empty_like(query)
    if query.shape[0] == 0:
        return out
    reason = why_unsupported(query, kv_cache, tables)
    if reason:
        raise ValueError(f"tq_decode_hopper: {reason}; use kernels.tq_attention.tq_attention")
    H = kv_cache.shape[2]
    if splits is None:
        splits = default_splits(seq_lens.shape[0], H, query.device, hopper=True)
    grid, args, kw = decode_launch(query, kv_cache, block_table, seq_lens, query_start_loc,
                                   tables, softmax_scale, splits, out, **launch)
    _tq_decode_hopper_kernel[grid](*args, **kw)
    return out

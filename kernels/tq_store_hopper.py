"""The served store (calibrated keys with the raw-key fallback, values) for Hopper (sm_90) in
Gluon: one warp codes 16 tokens of a head entirely in registers. The portable kernel
(tq_store_chunked.py, the CHUNK path of tq_store_kernel.py) stays the reference; this is the fast
path for the formats of one full-width stream per vector (tq4, tq3, tq5) at head size 128, 16-bit
inputs, calibrated tables with the raw-key fallback, the key mean NEOX-paired (or constant).
Over 400 lines: the kernel and its launch belong together; the host tables are in
tq_store_hopper_host.py.

Why: the portable kernel's 4 warps split each 16-token tile's columns, so every row sum and
every MMA operand went through shared memory (95 barriers and 3171 sm_90 SASS instructions per
head and tile; 0.492 ms for 32K tokens on an H100, 11% of the copy bandwidth; benchmarks/
RESULTS.md "Store kernel, fifth pass"), and its code search took ~15 instructions a coordinate.

Design (one program = 16 * NW tokens x HEADS heads; warp w owns tokens [16 w, 16 w + 16)):

* Layouts: mma.sync m16n8k16 (mma_v2) with warps along the rows, so a row's sums are in-thread
  adds and two quad shuffles; no shared memory in the head loop except the rotation blocks, the
  key mean's cos/sin and the heads' per-column vectors (key mean, inv scale, value mean and
  its rotation: VSMEM), all written once per program. VSMEM (2026-12-06, no GPU run
  yet): read per head and chunk from shared memory instead of global memory, those 96 loads a
  head are no longer hoisted into registers at the top of the head loop (sm_90 SASS, Triton
  3.6: 5841 instructions and 56 spill accesses a head against 5878 and 88; at maxnreg 200,
  181 against 236). ASYNC (served where a program has more than one head): the keys and values
  by cp.async into shared memory one head ahead and read by ldmatrix (two CTA barriers a head,
  100 KB of shared memory a program): with SLUT 0.230 against 0.262 ms for 32K tokens (H100,
  2026-12-07, benchmarks/dev/kv_store_hopper_variants.py). REMAT (served 2026-12-07 to 12-08):
  what ptxas spilled and reloaded every head, SLUT's table bases, the copies' row pointers and
  the slots' cache addresses, worked out per head from values live anyway (ncu: the reloads,
  issued behind the head's 16 copies, waited on a long scoreboard for about 5% of the store's
  stall samples); Triton 3.6: no stack (24 bytes before), 0.223-0.225 against 0.227-0.231 ms
  (H100, 2026-12-07). Off since the key is coded once: nothing spills without it.
* Rotation: H_D = H_4 (x) H_C (C = D / 4), as tq_store_chunked.py: values by one 16-bit MMA per
  column chunk with diag(s_a) H_C, then the 4-point transform across chunks (float32 adds,
  elementwise: every chunk's accumulator has the same layout); the key, calibrated or raw
  (float32, the signs on it), by the transform first, then two float16 MMAs per chunk (22 bits;
  |x| <= 2^6).
* Column order: the B operands' columns are permuted (PERM) so that lane q of a quad holds the 8
  consecutive rotated coordinates [8 q, 8 q + 8) of each chunk and row: one code word of
  8 * BITS bits per thread, packed by in-thread shifts and adds, stored 32-bit (16-bit where the
  stream is 2 bytes off a word; bytes for 3- and 5-bit codes).
* Code search: one 16-byte table lookup per coordinate, each entry of a bucket holding at most
  one threshold (that threshold or +inf, the level below and above it, the code below it);
  code = code_lo + (y > thr): bucketize's rule (thresholds strictly below y), signs included,
  ~9 SASS a coordinate with its packing (the portable search ~15, without). Served (SLUT, where
  its static tables fit the launch: _slut_fits): 2^m + 1 uniform buckets (ubucket_table: two
  FMAs, 33 entries for tq4) in a shared table declared in PTX, 8 replicas so that a quarter
  warp's 16-byte loads hit distinct banks (4 wavefronts a lookup); else bucket_table's
  float-bit buckets (2048 entries for tq4) through L1, whose random 16-byte lookups cost many
  L1 wavefronts: 0.308 -> 0.262 ms for 32K tokens with SLUT (H100, 2026-12-07; bytes identical).
  sm_90, Triton 3.6: SLUT 5736 loop instructions and 14 spill accesses a head, the L1 table
  5772 and 52 (benchmarks/RESULTS.md, store eighth pass).
* Coordinates, levels and residuals are scaled by 256 (the tables are): powers of two commute
  with rounding, so the same floats, and no multiply before the residuals' float16 split.
* The raw-key fallback (formats.py, step 5) picks a key's coding before coding it, from the
  weighted squared norms of its two inputs (the key, its calibration): each row's input is
  selected in registers and coded once. Until 2026-12-08 every key was coded both ways and the
  residuals' errors compared (until 2026-12-07 rotated back to the original coordinates
  first): sm_90 SASS of the head loop (Triton 3.6, REMAT on) 5725 -> 4741 -> 3476 instructions
  (tq3 5811 -> 4807 -> 3538, no stack; tq5 6500 -> 5533 -> 4052, 152 bytes of stack), 192 ->
  128 lookups and 128 -> 96 MMAs a head.
* Per head: the values first (the key's loads in flight meanwhile), then the key. sm_90 SASS of
  the head loop (tests/store_hopper_compile.py, Triton 3.6, as served): 3395 warp instructions
  per 16 tokens and head (tq3 3472, tq5 3976) against the portable kernel's 4 x 3171.

Gluon APIs used (all in Triton 3.6, 3.8 and 3.9; compiled under each): NVMMADistributedLayout,
DotOperandLayout, SliceLayout, BlockedLayout, SwizzledSharedLayout, allocate_shared_memory and
its load, index and _reinterpret (3.9: reinterpret), nvidia.ampere.async_copy (ASYNC only:
async_copy_global_to_shared, in 3.8 and 3.9 async_load; commit_group, wait_group),
nvidia.ampere.mma_v2, inline_asm_elementwise, reshape / permute / split, convert_layout, sum,
div_rn / sqrt_rn, and the CTA barrier (3.6: thread_barrier; 3.8, 3.9: barrier).

Bytes equal the portable kernel's except threshold ties (another summation order, as every
earlier pass: benchmarks/RESULTS.md); benchmarks/dev/kv_store_hopper_check.py checks them on the
GPU against the portable kernel and the torch reference.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as _acp
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .tq_decode_hopper import _rope_cos_sin
from .tq_store_hopper_host import (  # noqa: F401  (the host side, re-exported for tq_store)
    _slut_fits, _ubucket, bucket_table, constants, kperm, kv16_layout, kvptx as kvptx_asm, perm,
    ptx_static, slut_asm, slut_ptx, table_args, ubucket_table, why_unsupported)

NT = gl.constexpr(16)  # tokens per warp
VSMEM = True  # the heads' per-column vectors staged in shared memory (store_launch's vsmem)
ASYNC = True  # keys and values by cp.async one head ahead (store_launch's async_kv; heads > 1)
KV16 = False  # keys and values loaded 4 bytes a thread and instruction (store_launch's kv16)
SLUT = True  # the code search by uniform buckets in shared memory (store_launch's slut)
FASTDIV = False  # norms' sqrt and divisions as sqrt_rn / div_rn (store_launch's fastdiv)
# ASYNC's buffers in PTX, no CTA barriers (store_launch's kvptx; measurement); 16-byte copies of
# whole rows, so tq_store asks for it only where its plan's key and value rows are 16-byte aligned
KVPTX = False
# SLUT's bases, ASYNC's row pointers, the slots' addresses per head (store_launch's remat): off
# since a key is coded once, when the loop stopped spilling them (Triton 3.6: 3395 instructions a
# head without, 3476 with, no stack either way; tq3 3472 / 3538; tq5 fewer local accesses)
REMAT = False
# cp.async into shared memory: Triton 3.8 and 3.9 call it async_load (3.9 removed the old name)
_async_load = getattr(_acp, "async_load", None) or _acp.async_copy_global_to_shared
# A CTA barrier: Triton 3.6's Gluon calls it thread_barrier, 3.9's barrier
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


# ---------------------------------------------------------------------------------------------
# Device side


@gluon.jit
def _wht4(x0, x1, x2, x3):
    s01 = x0 + x1
    d01 = x0 - x1
    s23 = x2 + x3
    d23 = x2 - x3
    return s01 + s23, d01 + d23, s01 - s23, d01 - d23


@gluon.jit
def _lookup(y, tab, SHIFT: gl.constexpr, ASM: gl.constexpr):
    """(code, signed level) of y by one 16-byte lookup: bucket_table's in global memory (tab:
    the table's address in every element, one register; the address one mad.wide: Triton's own
    pointer arithmetic took four instructions), or SLUT's in shared memory (ASM: slut_asm; tab:
    the shared address of the lane's replica, slut_ptx)."""
    if ASM == "":
        b = (y.to(gl.uint32, bitcast=True) >> SHIFT).to(gl.int32)
        thr, lo, hi, code = gl.inline_asm_elementwise(
            "{ .reg .b64 a; mad.wide.u32 a, $4, 16, $5; "
            "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [a]; }",
            "=r,=r,=r,=r,r,l", [b, tab],
            dtype=(gl.float32, gl.float32, gl.float32, gl.int32), is_pure=True, pack=1)
    else:
        thr, lo, hi, code = gl.inline_asm_elementwise(
            ASM, "=r,=r,=r,=r,f,r", [y, tab],
            dtype=(gl.float32, gl.float32, gl.float32, gl.int32), is_pure=True, pack=1)
    up = y > thr
    return code + up.to(gl.int32), gl.where(up, hi, lo)


@gluon.jit
def _slut_fill(tab_ptr, DECL: gl.constexpr, FILL: gl.constexpr, ROWS: gl.constexpr,
               NW: gl.constexpr):
    """SLUT: declare a shared table (slut_ptx's DECL, ROWS x 16 bytes, in PTX outside Triton's
    allocation) and copy it from global memory (FILL; the CTA barrier after the prologue orders
    it)."""
    L1: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
    one = gl.arange(0, 32 * NW, L1)  # one element a thread: the declaration emitted once
    gl.inline_asm_elementwise(DECL, "=r,r", [one], dtype=gl.int32, is_pure=False, pack=1)
    TL: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [NW, 1], [1, 0])
    r = gl.arange(0, ROWS, gl.SliceLayout(1, TL))[:, None] * 4
    w = gl.arange(0, 4, gl.SliceLayout(0, TL))[None, :]
    v = gl.load(tab_ptr + r + w)
    gl.inline_asm_elementwise(FILL, "=r,r,r", [(r + w) * 4, v], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _slut_base(BASE: gl.constexpr, z):
    """SLUT's tab operand (z: zeros in the coordinates' layout; slut_ptx's BASE)."""
    return gl.inline_asm_elementwise(BASE, "=r,r", [z], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _opaque_zero(i, z):
    """0 in z's layout, from the head index i (0 <= i < 2^31) so that neither LLVM nor ptxas can
    hoist what is computed from it out of the head loop (REMAT)."""
    return gl.inline_asm_elementwise("shr.u32 $0, $1, 31;", "=r,r", [z + i], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def _mapped(slot_mapping_ptr, t, num_tokens):
    """Whether tokens t are stored: inside the call and with a slot (slot_mapping >= 0)."""
    inside = t < num_tokens
    return inside & (gl.load(slot_mapping_ptr + t, mask=inside, other=-1) >= 0)


@gluon.jit
def _kv_copy(COPY: gl.constexpr, g0, g1, n0, n1, soff):
    """KVPTX: one thread's share of a head's keys or values into the PTX buffers (kvptx)."""
    gl.inline_asm_elementwise(COPY, "=r,l,l,r,r,r", [g0, g1, n0, n1, soff], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _kv_copy_head(COPY_K: gl.constexpr, COPY_V: gl.constexpr, key_ptr, value_ptr, stride_kt,
                  stride_vt, k_off, v_off, idx, t0, okb, C: gl.constexpr):
    """KVPTX: a head's keys and values (k_off, v_off: its element offsets) into the buffers;
    thread idx (w, l) copies piece l % 4 of rows 16 w + l // 4 and + 8 (okb bits 0, 1: in the
    mapping; 0 bytes, zeros, for rows outside it)."""
    row0 = (idx // 32) * 16 + (idx % 32) // 4
    piece = idx % 4
    soff = row0 * (2 * C) + (piece ^ ((row0 // 2) % 4)) * 16
    ok0 = (okb & 1) != 0
    ok1 = (okb & 2) != 0
    n0 = gl.where(ok0, 16, 0)
    n1 = gl.where(ok1, 16, 0)
    r0 = gl.where(ok0, t0 + row0, 0).to(gl.int64)
    r1 = gl.where(ok1, t0 + row0 + 8, 0).to(gl.int64)
    _kv_copy(COPY_K, key_ptr + r0 * stride_kt + k_off + piece * 8,
             key_ptr + r1 * stride_kt + k_off + piece * 8, n0, n1, soff)
    _kv_copy(COPY_V, value_ptr + r0 * stride_vt + v_off + piece * 8,
             value_ptr + r1 * stride_vt + v_off + piece * 8, n0, n1, soff)


@gluon.jit
def _ldm_offset(z, M: gl.constexpr, C: gl.constexpr, COLA: gl.constexpr):
    """KVPTX: ldmatrix's lane offsets in a chunk buffer, [M, C] in the A operand's layout (z:
    zeros there, opaque, so that this is worked out per head, not kept). The thread's lane reads
    row lane % 16 of its warp's 16, 16-byte piece 2 (c // 16) + lane // 16 (c: the k-block's
    columns), swizzled as stored (kvptx); the lane and warp from PTX, so that every element of a
    k-block shares one value."""
    lane, warp = gl.inline_asm_elementwise(
        "{ mov.u32 $0, %laneid; mov.u32 $1, %tid.x; shr.u32 $1, $1, 5; add.u32 $0, $0, $2; }",
        "=r,=r,r", [z], dtype=(gl.int32, gl.int32), is_pure=True, pack=1)
    kb = (gl.arange(0, C, COLA) // 16)[None, :]
    lr = lane % 16
    return (warp * 16 + lr) * (2 * C) + ((2 * kb + lane // 16) ^ ((lr // 2) % 4)) * 16


@gluon.jit
def _kv_ldm(LDM: gl.constexpr, off, like):
    """KVPTX: a chunk buffer as the A operand [M, C] (off: ldm_offset's lane offsets, LA), as
    the 16-bit type `like` points to."""
    x = gl.inline_asm_elementwise(LDM, "=r,=r,=r,=r" + ",r" * 8, [off], dtype=gl.int16,
                                  is_pure=False, pack=8)
    return x.to(like.dtype.element_ty, bitcast=True)


@gluon.jit
def _pack(code, BITS: gl.constexpr, M: gl.constexpr):
    """Codes [M, 32] (PERM's columns) -> words [M, 4]: lane q's 8 consecutive codes, coordinate
    8 q + 2 nt + e at bits BITS (2 nt + e), combined by splits (constant shifts, no movement)."""
    if BITS * 8 > 32:
        code = code.to(gl.int64)
    w = gl.permute(gl.reshape(code, [M, 2, 2, 4, 2]), [0, 3, 1, 2, 4])  # row, q, nt1, nt0, e
    e0, e1 = gl.split(w)  # adds, not ors (no bits overlap): one LEA each
    n0, n1 = gl.split(e0 + (e1 << BITS))
    h0, h1 = gl.split(n0 + (n1 << (2 * BITS)))
    return h0 + (h1 << (4 * BITS))


@gluon.jit
def _code(y0, y1, y2, y3, tab, SHIFT: gl.constexpr, ASM: gl.constexpr, BITS: gl.constexpr,
          RULE: gl.constexpr, M: gl.constexpr):
    """Words of the four chunks, their levels, sum c^2 and sum y c (RULE 2, else sum c^2)."""
    k0, c0 = _lookup(y0, tab, SHIFT, ASM)
    k1, c1 = _lookup(y1, tab, SHIFT, ASM)
    k2, c2 = _lookup(y2, tab, SHIFT, ASM)
    k3, c3 = _lookup(y3, tab, SHIFT, ASM)
    cc = gl.sum(c0 * c0 + c1 * c1 + c2 * c2 + c3 * c3, axis=1)
    yc = cc
    if RULE == 2:
        yc = gl.sum(y0 * c0 + y1 * c1 + y2 * c2 + y3 * c3, axis=1)
    return (_pack(k0, BITS, M), _pack(k1, BITS, M), _pack(k2, BITS, M), _pack(k3, BITS, M),
            c0, c1, c2, c3, cc, yc)


@gluon.jit
def _sqrt(x, FAST: gl.constexpr):
    """sqrt_rn(x) of x >= 0 (a sum of squares). FAST: without the branch to the slow path
    (ptxas's sqrt.rn: the same MUFU.RSQ and Newton step, which it takes for x in [2^-101,
    FLT_MAX]); x under 2^-100 scaled by 2^126 and its root by 2^-63 (exact), 0 -> 0 (the
    step's NaN, by max). Differs from sqrt_rn only at x = inf or NaN."""
    if FAST:
        t = x < 7.888609052210118e-31  # 2^-100
        xs = x * gl.where(t, 8.507059173023462e37, 1.0)  # 2^126
        r = gl.inline_asm_elementwise(
            "{ .reg .f32 r, s, h, e; rsqrt.approx.ftz.f32 r, $1; mul.rn.ftz.f32 s, $1, r; "
            "mul.rn.ftz.f32 h, r, 0f3F000000; neg.f32 e, s; fma.rn.f32 e, e, s, $1; "
            "fma.rn.f32 $0, e, h, s; }", "=f,f", [xs], dtype=gl.float32, is_pure=True, pack=1)
        res = gl.maximum(r * gl.where(t, 1.0842021724855044e-19, 1.0), 0.0)  # 2^-63
    else:
        res = gl.sqrt_rn(x)
    return res


@gluon.jit
def _div(a, b, FAST: gl.constexpr):
    """div_rn(a, b). FAST: without FCHK's branch to the slow path (ptxas's div.rn fast path:
    MUFU.RCP, a Newton step, the quotient and one correction), exact where FCHK passes: here
    b in [2^-100, 2^64] (norms of finite 16-bit vectors clamped at 1e-30 and at most
    sqrt(FLT_MAX); sqrt(cc) of levels), a in [0, 2^80]."""
    if FAST:
        res = gl.inline_asm_elementwise(
            "{ .reg .f32 r, e, q; rcp.approx.ftz.f32 r, $2; neg.f32 e, $2; fma.rn.f32 e, e, r, "
            "0f3F800000; fma.rn.f32 r, r, e, r; mul.rn.f32 q, $1, r; neg.f32 e, $2; "
            "fma.rn.f32 e, e, q, $1; fma.rn.f32 $0, r, e, q; }", "=f,f,f", [a, b],
            dtype=gl.float32, is_pure=True, pack=1)
    else:
        res = gl.div_rn(a, b)
    return res


@gluon.jit
def _rcp(b, FAST: gl.constexpr):
    """div_rn(1, b) (_div's fast path with a = 1: the quotient is the refined reciprocal)."""
    if FAST:
        res = gl.inline_asm_elementwise(
            "{ .reg .f32 r, e; rcp.approx.ftz.f32 r, $1; neg.f32 e, $1; fma.rn.f32 e, e, r, "
            "0f3F800000; fma.rn.f32 r, r, e, r; neg.f32 e, $1; fma.rn.f32 e, e, r, 0f3F800000; "
            "fma.rn.f32 $0, r, e, r; }", "=f,f", [b], dtype=gl.float32, is_pure=True, pack=1)
    else:
        res = gl.div_rn(1.0, b)
    return res


@gluon.jit
def _norm_of(n, yc, cc, RULE: gl.constexpr, FAST: gl.constexpr):
    """The norm rule of coordinates and levels scaled by 256 (yc and cc by 2^16): the same
    floats as unscaled (powers of two commute with rounding; sqrt(2^16 x) = 2^8 sqrt(x))."""
    if RULE == 0:
        norm = n
    elif RULE == 1:
        norm = _div(n * 256.0, gl.maximum(_sqrt(cc, FAST), 256.0e-30), FAST)
    else:
        norm = _div(n * yc, gl.maximum(cc, 65536.0e-30), FAST)
    return norm


_S1 = gl.SwizzledSharedLayout(1, 1, 1, [0])
if hasattr(gl.shared_memory_descriptor, "reinterpret"):  # Triton 3.9
    @gluon.jit
    def _rows(smem):
        """smem [R, C] (unswizzled, row-major) as R rows to index (a rank-1 layout)."""
        return smem.reinterpret(smem.dtype, smem.shape, _S1)
else:  # Triton 3.6, 3.8
    @gluon.jit
    def _rows(smem):
        """smem [R, C] (unswizzled, row-major) as R rows to index (a rank-1 layout)."""
        return smem._reinterpret(smem.dtype, smem.shape, _S1)


@gluon.jit
def _vec(ptr, smem, i, hd, a: gl.constexpr, C: gl.constexpr, LAYOUT: gl.constexpr,
         VSMEM: gl.constexpr):
    """Chunk a of head i's (of the program's; hd = its global head x D) per-column vector: from
    shared memory (VSMEM: staged once per program) or global memory."""
    if VSMEM:
        v = smem.index(i * 4 + a).load(LAYOUT)
    else:
        v = gl.load(ptr + hd + a * C + gl.arange(0, C, LAYOUT))
    return v


@gluon.jit
def _copy_head(b0, b1, b2, b3, rows, mask, C: gl.constexpr):
    """One head's 16-bit rows (rows: the head's pointers, [M, C] in the copy layout) into the
    four chunk buffers, asynchronously (cp.async; masked rows read as zeros)."""
    _async_load(b0, rows, mask=mask)
    _async_load(b1, rows + C, mask=mask)
    _async_load(b2, rows + 2 * C, mask=mask)
    _async_load(b3, rows + 3 * C, mask=mask)


@gluon.jit
def _ld_chunk(rows, a: gl.constexpr, cols, mask, C: gl.constexpr, M: gl.constexpr,
              LA: gl.constexpr):
    """KV16: chunk a of a head's 16-bit rows (rows: their pointers, cols: 0 .. C - 1, both in
    kv16_layout) by 16-byte loads, as the A operand in kperm's column order (a renaming of
    registers: the load layout holds what the operand layout holds, in input order)."""
    x = gl.load(rows[:, None] + (a * C + cols)[None, :], mask=mask, other=0.0)
    x = gl.reshape(gl.permute(gl.reshape(x, [M, 4, 2, 2, 2]), [0, 2, 3, 1, 4]), [M, C])
    return gl.convert_layout(x, LA)


@gluon.jit
def _f32(x):
    """16-bit x as float32; bfloat16 pairs by a shift and a mask (Triton's conversion took a
    PRMT and a shift for the high half)."""
    if x.dtype == gl.bfloat16:
        res = gl.inline_asm_elementwise(  # pack 2: $0, $1 the pair's floats, $2 the pair
            "{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [x],
            dtype=gl.float32, is_pure=True, pack=2)
    else:
        res = x.to(gl.float32)
    return res


@gluon.jit
def _fp16_round(x):
    return gl.minimum(gl.maximum(x, -65504.0), 65504.0).to(gl.float16).to(gl.float32)


@gluon.jit
def _dsplit(x, h, LA: gl.constexpr, L: gl.constexpr):
    """x (float32, |x| <= 2^16) @ h (float16 B operand) in two float16 passes."""
    hi = x.to(gl.float16)
    lo = (x - hi.to(gl.float32)).to(gl.float16)
    acc = gl.zeros([x.shape[0], h.shape[1]], gl.float32, L)
    acc = mma_v2(gl.convert_layout(lo, LA), h, acc)
    return mma_v2(gl.convert_layout(hi, LA), h, acc)


@gluon.jit
def _store_words(base, mask, w, OFF: gl.constexpr, a: gl.constexpr, BITS: gl.constexpr,
                 ALIGN: gl.constexpr):
    """Words [M, 4] of chunk a: group 4 a + q of 8 codes at byte OFF + BITS (4 a + q)."""
    WL: gl.constexpr = w.type.layout
    q = gl.arange(0, 4, gl.SliceLayout(0, WL))
    b = gl.convert_layout(base, gl.SliceLayout(1, WL))
    m = gl.convert_layout(mask, gl.SliceLayout(1, WL))[:, None] & (q < 4)[None, :]
    ptrs = b[:, None] + (OFF + (a * 4 + q) * BITS)[None, :]
    if (BITS == 4) & (ALIGN >= 4) & (OFF % 4 == 0):
        gl.store(ptrs.to(gl.pointer_type(gl.int32)), w, mask=m)
    elif (BITS == 4) & (ALIGN >= 2) & (OFF % 2 == 0):
        p16 = ptrs.to(gl.pointer_type(gl.int16))
        gl.store(p16, w.to(gl.int16), mask=m)
        gl.store(p16 + 1, (w >> 16).to(gl.int16), mask=m)
    else:
        for j in gl.static_range(BITS):
            gl.store(ptrs + j, ((w >> (8 * j)) & 255).to(gl.uint8), mask=m)


@gluon.jit
def _store_norm(base, mask, norm, OFF: gl.constexpr):
    n16 = gl.minimum(gl.maximum(norm, -65504.0), 65504.0).to(gl.float16)
    gl.store((base + OFF).to(gl.pointer_type(gl.int16)), n16.to(gl.int16, bitcast=True),
             mask=mask)


@gluon.jit
def _signed(f, g):
    """f with g's sign bit added: f * sign(g), exact."""
    return gl.inline_asm_elementwise(
        "{ .reg .b32 t; and.b32 t, $2, 0x80000000; xor.b32 $0, $1, t; }", "=r,r,r", [f, g],
        dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _key_coded(f0, f1, f2, f3, rsq, ew_raw, ew_cal, key_mean_ptr, key_isg_ptr, km_s, isg_s, i,
               hd, cos0_s, sin0_s, cos1_s, sin1_s, hcp_s, ktab,
               MEAN: gl.constexpr, K_SHIFT: gl.constexpr, K_ASM: gl.constexpr,
               K_BITS: gl.constexpr, K_RULE: gl.constexpr, C: gl.constexpr, M: gl.constexpr,
               SCALE: gl.constexpr, LA: gl.constexpr, LB: gl.constexpr, L: gl.constexpr,
               ROW: gl.constexpr, COLA: gl.constexpr, VSMEM: gl.constexpr, FAST: gl.constexpr):
    """The key's one coding (f: its chunks as float32, rsq: its squared norm): raw where
    ew_raw |k|^2 < ew_cal |x|^2 (formats.py, step 5; x the calibrated key), else calibrated;
    either input by the transform first, then two float16 passes per chunk. Its words, float16
    norm and the raw rows."""
    u0 = _vec(key_mean_ptr, km_s, i, hd, 0, C, COLA, VSMEM)[None, :]
    u1 = _vec(key_mean_ptr, km_s, i, hd, 1, C, COLA, VSMEM)[None, :]
    u2 = _vec(key_mean_ptr, km_s, i, hd, 2, C, COLA, VSMEM)[None, :]
    u3 = _vec(key_mean_ptr, km_s, i, hd, 3, C, COLA, VSMEM)[None, :]
    if MEAN:
        cs0 = cos0_s.load(LA)
        sn0 = sin0_s.load(LA)
        cs1 = cos1_s.load(LA)
        sn1 = sin1_s.load(LA)
        mu0 = u0 * cs0 - u2 * sn0
        mu2 = u2 * cs0 + u0 * sn0
        mu1 = u1 * cs1 - u3 * sn1
        mu3 = u3 * cs1 + u1 * sn1
    else:
        mu0 = u0
        mu1 = u1
        mu2 = u2
        mu3 = u3
    g0 = _vec(key_isg_ptr, isg_s, i, hd, 0, C, COLA, VSMEM)[None, :]
    g1 = _vec(key_isg_ptr, isg_s, i, hd, 1, C, COLA, VSMEM)[None, :]
    g2 = _vec(key_isg_ptr, isg_s, i, hd, 2, C, COLA, VSMEM)[None, :]
    g3 = _vec(key_isg_ptr, isg_s, i, hd, 3, C, COLA, VSMEM)[None, :]
    # (rows outside the mapping are coded too, never stored: no masking needed)
    x0 = (f0 - mu0) * g0
    x1 = (f1 - mu1) * g1
    x2 = (f2 - mu2) * g2
    x3 = (f3 - mu3) * g3
    nsq = gl.sum(x0 * x0 + x1 * x1 + x2 * x2 + x3 * x3, axis=1)
    raw = ew_raw * rsq < ew_cal * nsq  # ties: calibrated
    rr = raw[:, None]
    # a raw row's input: the key with the rotation's signs, which isg carries (1 / scale > 0)
    x0 = gl.where(rr, _signed(f0, g0), x0)
    x1 = gl.where(rr, _signed(f1, g1), x1)
    x2 = gl.where(rr, _signed(f2, g2), x2)
    x3 = gl.where(rr, _signed(f3, g3), x3)
    n_a = _sqrt(gl.where(raw, rsq, nsq), FAST)
    inv_na = _rcp(gl.maximum(n_a, 1e-30), FAST)
    xs = (inv_na * (256.0 * SCALE))[:, None]  # the split's input |z * xs| <= 2^6
    z0, z1, z2, z3 = _wht4(x0, x1, x2, x3)
    hcp = hcp_s.load(LB)
    y0 = _dsplit(z0 * xs, hcp, LA, L)
    y1 = _dsplit(z1 * xs, hcp, LA, L)
    y2 = _dsplit(z2 * xs, hcp, LA, L)
    y3 = _dsplit(z3 * xs, hcp, LA, L)
    w0, w1, w2, w3, c0, c1, c2, c3, cc, yc = _code(y0, y1, y2, y3, ktab, K_SHIFT, K_ASM, K_BITS,
                                                  K_RULE, M)
    norm16 = _fp16_round(_norm_of(gl.convert_layout(n_a, ROW), yc, cc, K_RULE, FAST))
    return w0, w1, w2, w3, norm16, gl.convert_layout(raw, ROW)


@gluon.jit
def _tq_store_hopper_kernel(
    key_ptr, stride_kt, stride_kh, value_ptr, stride_vt, stride_vh,
    cache_ptr, stride_blk, slot_mapping_ptr, num_tokens, positions_ptr,
    rope_theta_ptr, key_mean_ptr, key_isg_ptr, key_errw_ptr,
    value_mean_ptr, rot_vm_ptr, hs_ptr, hcp_ptr, ktab_ptr, vtab_ptr,
    PAGE: gl.constexpr, STRIDE_TOK: gl.constexpr, STRIDE_HEAD: gl.constexpr,
    NW: gl.constexpr, HEADS: gl.constexpr, D: gl.constexpr, MEAN: gl.constexpr,
    VMEAN: gl.constexpr, K_BITS: gl.constexpr, V_BITS: gl.constexpr, K_OFF: gl.constexpr,
    V_OFF: gl.constexpr, K_NORM_OFF: gl.constexpr, V_NORM_OFF: gl.constexpr,
    K_RULE: gl.constexpr, V_RULE: gl.constexpr, K_SHIFT: gl.constexpr, V_SHIFT: gl.constexpr,
    SLUT: gl.constexpr, K_ASM: gl.constexpr, V_ASM: gl.constexpr, K_DECL: gl.constexpr,
    K_FILL: gl.constexpr, K_BASE: gl.constexpr, V_DECL: gl.constexpr, V_FILL: gl.constexpr,
    V_BASE: gl.constexpr, K_ROWS: gl.constexpr, V_ROWS: gl.constexpr, FAST: gl.constexpr,
    ALIGN: gl.constexpr, VSMEM: gl.constexpr, ASYNC: gl.constexpr,
    KV16: gl.constexpr, LK: gl.constexpr, REMAT: gl.constexpr, KVPTX: gl.constexpr,
    KV_DECL: gl.constexpr, KV_COPY_K: gl.constexpr, KV_COPY_V: gl.constexpr,
    KV_WAIT: gl.constexpr, KV_LDM0: gl.constexpr, KV_LDM1: gl.constexpr, KV_LDM2: gl.constexpr,
    KV_LDM3: gl.constexpr, KV_LDM4: gl.constexpr, KV_LDM5: gl.constexpr, KV_LDM6: gl.constexpr,
    KV_LDM7: gl.constexpr,
):
    C: gl.constexpr = D // 4
    M: gl.constexpr = NT * NW
    SCALE: gl.constexpr = 1.0 / (D ** 0.5)
    L: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1],
                                                instr_shape=[16, 8])
    LA: gl.constexpr = gl.DotOperandLayout(0, L, 2)
    LB: gl.constexpr = gl.DotOperandLayout(1, L, 2)
    ROW: gl.constexpr = gl.SliceLayout(1, L)
    COL: gl.constexpr = gl.SliceLayout(0, L)
    ROWA: gl.constexpr = gl.SliceLayout(1, LA)
    COLA: gl.constexpr = gl.SliceLayout(0, LA)
    BL: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [NW, 1], [1, 0])
    SH: gl.constexpr = gl.SwizzledSharedLayout(8, 2, 4, [1, 0])
    SF: gl.constexpr = gl.SwizzledSharedLayout(2, 1, 8, [1, 0])

    # The rotation blocks, once per program into shared memory (read per head as B operands).
    rb = gl.arange(0, C, gl.SliceLayout(1, BL))
    cb = gl.arange(0, C, gl.SliceLayout(0, BL))
    boff = rb[:, None] * C + cb[None, :]
    hs0_s = gl.allocate_shared_memory(hs_ptr.dtype.element_ty, [C, C], SH, gl.load(hs_ptr + boff))
    hs1_s = gl.allocate_shared_memory(hs_ptr.dtype.element_ty, [C, C], SH,
                                      gl.load(hs_ptr + C * C + boff))
    hs2_s = gl.allocate_shared_memory(hs_ptr.dtype.element_ty, [C, C], SH,
                                      gl.load(hs_ptr + 2 * C * C + boff))
    hs3_s = gl.allocate_shared_memory(hs_ptr.dtype.element_ty, [C, C], SH,
                                      gl.load(hs_ptr + 3 * C * C + boff))
    hcp_s = gl.allocate_shared_memory(gl.float16, [C, C], SH, gl.load(hcp_ptr + boff))

    t0 = gl.program_id(0) * M
    head0 = gl.program_id(1) * HEADS
    # rows as the operands (A) and as the accumulators (L) hold them
    ta = t0 + gl.arange(0, M, ROWA)
    in_a = ta < num_tokens
    mask_a = in_a & (gl.load(slot_mapping_ptr + ta, mask=in_a, other=-1) >= 0)
    tl_ = t0 + gl.arange(0, M, ROW)
    in_l = tl_ < num_tokens
    slot = gl.load(slot_mapping_ptr + tl_, mask=in_l, other=-1).to(gl.int64)
    mask_l = in_l & (slot >= 0)
    slot32 = slot.to(gl.int32)  # REMAT (2^31 slots of 8+ bytes would exceed any GPU memory)
    slot = gl.maximum(slot, 0)
    base0 = cache_ptr + ((slot // PAGE) * stride_blk + (slot % PAGE) * STRIDE_TOK)
    cola = gl.arange(0, C, COLA)
    if SLUT:  # the code-search tables into shared memory (declared in PTX)
        _slut_fill(ktab_ptr, K_DECL, K_FILL, K_ROWS, NW)
        _slut_fill(vtab_ptr, V_DECL, V_FILL, V_ROWS, NW)
        ktab = _slut_base(K_BASE, gl.zeros([M, C], gl.int32, L))
        vtab = _slut_base(V_BASE, gl.zeros([M, C], gl.int32, L))
    else:
        ktab = ktab_ptr + gl.zeros([M, C], gl.int32, L)
        vtab = vtab_ptr + gl.zeros([M, C], gl.int32, L)
    if MEAN:  # RoPE_p(key_mean)'s cos / sin per row (NEOX: chunk a's partner is a + 2)
        pos = gl.load(positions_ptr + ta, mask=in_a, other=0).to(gl.float64)
        th0 = gl.load(rope_theta_ptr + cola).to(gl.float64)
        th1 = gl.load(rope_theta_ptr + C + cola).to(gl.float64)
        cos0, sin0 = _rope_cos_sin(pos[:, None] * th0[None, :])
        cos1, sin1 = _rope_cos_sin(pos[:, None] * th1[None, :])
        cos0_s = gl.allocate_shared_memory(gl.float32, [M, C], SF, cos0)
        sin0_s = gl.allocate_shared_memory(gl.float32, [M, C], SF, sin0)
        cos1_s = gl.allocate_shared_memory(gl.float32, [M, C], SF, cos1)
        sin1_s = gl.allocate_shared_memory(gl.float32, [M, C], SF, sin1)
    else:  # not read (_key_coded without MEAN)
        cos0_s = hcp_s
        sin0_s = hcp_s
        cos1_s = hcp_s
        sin1_s = hcp_s
    if VSMEM:  # the heads' per-column vectors, once per program (read per head and chunk)
        S2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        VL: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [NW, 1], [1, 0])
        rv = gl.arange(0, HEADS * 4, gl.SliceLayout(1, VL))
        voff = head0 * D + rv[:, None] * C + gl.arange(0, C, gl.SliceLayout(0, VL))[None, :]
        km_s = _rows(gl.allocate_shared_memory(gl.float32, [HEADS * 4, C], S2,
                                               gl.load(key_mean_ptr + voff)))
        isg_s = _rows(gl.allocate_shared_memory(gl.float32, [HEADS * 4, C], S2,
                                                gl.load(key_isg_ptr + voff)))
        vm_s = _rows(gl.allocate_shared_memory(gl.float32, [HEADS * 4, C], S2,
                                               gl.load(value_mean_ptr + voff)))
        rvm_s = _rows(gl.allocate_shared_memory(gl.float32, [HEADS * 4, C], S2,
                                                gl.load(rot_vm_ptr + voff)))
    else:  # not read
        km_s = hcp_s
        isg_s = hcp_s
        vm_s = hcp_s
        rvm_s = hcp_s
    kp = key_ptr + ta.to(gl.int64) * stride_kt
    vp = value_ptr + ta.to(gl.int64) * stride_vt
    ma = mask_a[:, None]
    zero = gl.zeros([M, C], gl.float32, L)
    if KV16:  # rows and columns as kv16_layout holds them
        tk = t0 + gl.arange(0, M, gl.SliceLayout(1, LK))
        mk = _mapped(slot_mapping_ptr, tk, num_tokens)[:, None]
        ck = gl.arange(0, C, gl.SliceLayout(0, LK))
        kpk = key_ptr + tk.to(gl.int64) * stride_kt
        vpk = value_ptr + tk.to(gl.int64) * stride_vt
    if KVPTX:  # ASYNC through kvptx's buffers: thread (w, l) copies rows 16 w + l // 4 (+ 8),
        # piece l % 4; reads by ldmatrix with lane offsets (ldm_offset); no CTA barrier
        L1K: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
        onek = gl.arange(0, 32 * NW, L1K)
        gl.inline_asm_elementwise(KV_DECL, "=r,r", [onek], dtype=gl.int32, is_pure=False,
                                  pack=1)
        tk0 = t0 + (onek // 32) * 16 + (onek % 32) // 4
        tk1 = tk0 + 8
        okb = (_mapped(slot_mapping_ptr, tk0, num_tokens).to(gl.int32)
               + 2 * _mapped(slot_mapping_ptr, tk1, num_tokens).to(gl.int32))
        _kv_copy_head(KV_COPY_K, KV_COPY_V, key_ptr, value_ptr, stride_kt, stride_vt,
                      head0 * stride_kh, head0 * stride_vh, onek, t0, okb, C)
    elif ASYNC:  # the head's keys and values by cp.async into shared memory, one head ahead
        # (2 rows x 16 bytes a thread: warp w copies the rows it reads, 16 w .. 16 w + 15)
        BK: gl.constexpr = gl.BlockedLayout([2, 8], [8, 4], [NW, 1], [1, 0])
        tb = t0 + gl.arange(0, M, gl.SliceLayout(1, BK))
        mask_b = _mapped(slot_mapping_ptr, tb, num_tokens)[:, None]
        cb_ = gl.arange(0, C, gl.SliceLayout(0, BK))[None, :]
        kpb = key_ptr + tb.to(gl.int64)[:, None] * stride_kt + cb_
        vpb = value_ptr + tb.to(gl.int64)[:, None] * stride_vt + cb_
        zb = gl.zeros([M], gl.int32, gl.SliceLayout(1, BK))
        ks0 = gl.allocate_shared_memory(key_ptr.dtype.element_ty, [M, C], SH)
        ks1 = gl.allocate_shared_memory(key_ptr.dtype.element_ty, [M, C], SH)
        ks2 = gl.allocate_shared_memory(key_ptr.dtype.element_ty, [M, C], SH)
        ks3 = gl.allocate_shared_memory(key_ptr.dtype.element_ty, [M, C], SH)
        vs0 = gl.allocate_shared_memory(value_ptr.dtype.element_ty, [M, C], SH)
        vs1 = gl.allocate_shared_memory(value_ptr.dtype.element_ty, [M, C], SH)
        vs2 = gl.allocate_shared_memory(value_ptr.dtype.element_ty, [M, C], SH)
        vs3 = gl.allocate_shared_memory(value_ptr.dtype.element_ty, [M, C], SH)
        _copy_head(ks0, ks1, ks2, ks3, kpb + head0 * stride_kh, mask_b, C)
        _copy_head(vs0, vs1, vs2, vs3, vpb + head0 * stride_vh, mask_b, C)
        _acp.commit_group()
    _cta_barrier()  # the shared tables written

    for i in range(HEADS):
        head = head0 + i
        hd = head * D
        if REMAT:  # the slots' addresses from the slots here, not kept (ptxas spilled them)
            zr = _opaque_zero(i, gl.zeros([M], gl.int32, ROW))
            if KVPTX:  # the stores' mask too (KVPTX's copies keep more registers live)
                mask_l = ((t0 + gl.arange(0, M, ROW) + zr) < num_tokens) & (slot32 + zr >= 0)
            sr = gl.maximum(slot32 + zr, 0)
            base = cache_ptr + (((sr // PAGE).to(gl.int64) * stride_blk
                                 + (sr % PAGE) * STRIDE_TOK) + head * STRIDE_HEAD)
        else:
            base = base0 + head * STRIDE_HEAD
        if KVPTX:
            gl.inline_asm_elementwise(KV_WAIT, "=r,r", [onek], dtype=gl.int32, is_pure=False,
                                      pack=1)
            lo = _ldm_offset(_opaque_zero(i, gl.zeros([M, C], gl.int32, LA)), M, C, COLA)
            k0 = _kv_ldm(KV_LDM0, lo, key_ptr)
            k1 = _kv_ldm(KV_LDM1, lo, key_ptr)
            k2 = _kv_ldm(KV_LDM2, lo, key_ptr)
            k3 = _kv_ldm(KV_LDM3, lo, key_ptr)
            v0 = _kv_ldm(KV_LDM4, lo, value_ptr)
            v1 = _kv_ldm(KV_LDM5, lo, value_ptr)
            v2 = _kv_ldm(KV_LDM6, lo, value_ptr)
            v3 = _kv_ldm(KV_LDM7, lo, value_ptr)
            if i + 1 < HEADS:  # the next head's copies (COPY's warp barrier: the reads done)
                z1 = _opaque_zero(i, gl.zeros([32 * NW], gl.int32, L1K))
                _kv_copy_head(KV_COPY_K, KV_COPY_V, key_ptr, value_ptr, stride_kt, stride_vt,
                              (head + 1) * stride_kh, (head + 1) * stride_vh, onek + z1, t0,
                              okb, C)
        elif ASYNC:
            _acp.wait_group(0)
            _cta_barrier()
            k0 = ks0.load(LA)
            k1 = ks1.load(LA)
            k2 = ks2.load(LA)
            k3 = ks3.load(LA)
            v0 = vs0.load(LA)
            v1 = vs1.load(LA)
            v2 = vs2.load(LA)
            v3 = vs3.load(LA)
            _cta_barrier()  # every warp has read the buffers: the next head's copies
            if i + 1 < HEADS:
                if REMAT:  # the row pointers from the rows here, not kept (ptxas spilled them)
                    tr = (tb + _opaque_zero(i, zb)).to(gl.int64)[:, None]
                    _copy_head(ks0, ks1, ks2, ks3,
                               key_ptr + tr * stride_kt + cb_ + (head + 1) * stride_kh, mask_b, C)
                    _copy_head(vs0, vs1, vs2, vs3,
                               value_ptr + tr * stride_vt + cb_ + (head + 1) * stride_vh, mask_b, C)
                else:
                    _copy_head(ks0, ks1, ks2, ks3, kpb + (head + 1) * stride_kh, mask_b, C)
                    _copy_head(vs0, vs1, vs2, vs3, vpb + (head + 1) * stride_vh, mask_b, C)
            _acp.commit_group()
        elif KV16:
            kh = kpk + head * stride_kh
            k0 = _ld_chunk(kh, 0, ck, mk, C, M, LA)
            k1 = _ld_chunk(kh, 1, ck, mk, C, M, LA)
            k2 = _ld_chunk(kh, 2, ck, mk, C, M, LA)
            k3 = _ld_chunk(kh, 3, ck, mk, C, M, LA)
            vh = vpk + head * stride_vh
            v0 = _ld_chunk(vh, 0, ck, mk, C, M, LA)
            v1 = _ld_chunk(vh, 1, ck, mk, C, M, LA)
            v2 = _ld_chunk(vh, 2, ck, mk, C, M, LA)
            v3 = _ld_chunk(vh, 3, ck, mk, C, M, LA)
        else:
            # the key's loads first: in flight while the head's values are coded
            kh = kp + head * stride_kh
            k0 = gl.load(kh[:, None] + cola[None, :], mask=ma, other=0.0)
            k1 = gl.load(kh[:, None] + (C + cola)[None, :], mask=ma, other=0.0)
            k2 = gl.load(kh[:, None] + (2 * C + cola)[None, :], mask=ma, other=0.0)
            k3 = gl.load(kh[:, None] + (3 * C + cola)[None, :], mask=ma, other=0.0)

            # values: 16-bit dots, the value mean's rotation taken off after
            vh = vp + head * stride_vh
            v0 = gl.load(vh[:, None] + cola[None, :], mask=ma, other=0.0)
            v1 = gl.load(vh[:, None] + (C + cola)[None, :], mask=ma, other=0.0)
            v2 = gl.load(vh[:, None] + (2 * C + cola)[None, :], mask=ma, other=0.0)
            v3 = gl.load(vh[:, None] + (3 * C + cola)[None, :], mask=ma, other=0.0)
        if SLUT and REMAT:  # the lanes' table addresses here, not kept (ptxas spilled them)
            zt = _opaque_zero(i, gl.zeros([M, C], gl.int32, L))
            ktab = _slut_base(K_BASE, zt)
            vtab = _slut_base(V_BASE, zt)
        g0 = _f32(v0)
        g1 = _f32(v1)
        g2 = _f32(v2)
        g3 = _f32(v3)
        if VMEAN:
            g0 = g0 - _vec(value_mean_ptr, vm_s, i, hd, 0, C, COLA, VSMEM)[None, :]
            g1 = g1 - _vec(value_mean_ptr, vm_s, i, hd, 1, C, COLA, VSMEM)[None, :]
            g2 = g2 - _vec(value_mean_ptr, vm_s, i, hd, 2, C, COLA, VSMEM)[None, :]
            g3 = g3 - _vec(value_mean_ptr, vm_s, i, hd, 3, C, COLA, VSMEM)[None, :]
        vn = gl.convert_layout(_sqrt(gl.sum(g0 * g0 + g1 * g1 + g2 * g2 + g3 * g3, axis=1), FAST),
                               ROW)
        inv_vn = _rcp(gl.maximum(vn, 1e-30), FAST)
        hs0 = hs0_s.load(LB)
        hs1 = hs1_s.load(LB)
        hs2 = hs2_s.load(LB)
        hs3 = hs3_s.load(LB)
        z0, z1, z2, z3 = _wht4(mma_v2(v0, hs0, zero), mma_v2(v1, hs1, zero),
                               mma_v2(v2, hs2, zero), mma_v2(v3, hs3, zero))
        if VMEAN:  # rotate(v - mean) = rotate(v) - rotate(mean)
            # permuted like the columns (constants())
            z0 -= _vec(rot_vm_ptr, rvm_s, i, hd, 0, C, COL, VSMEM)[None, :]
            z1 -= _vec(rot_vm_ptr, rvm_s, i, hd, 1, C, COL, VSMEM)[None, :]
            z2 -= _vec(rot_vm_ptr, rvm_s, i, hd, 2, C, COL, VSMEM)[None, :]
            z3 -= _vec(rot_vm_ptr, rvm_s, i, hd, 3, C, COL, VSMEM)[None, :]
        s = (inv_vn * (SCALE * 256.0))[:, None]
        y0 = z0 * s
        y1 = z1 * s
        y2 = z2 * s
        y3 = z3 * s
        vw0, vw1, vw2, vw3, c0, c1, c2, c3, cc, yc = _code(y0, y1, y2, y3, vtab, V_SHIFT, V_ASM,
                                                          V_BITS, V_RULE, M)
        _store_words(base, mask_l, vw0, V_OFF, 0, V_BITS, ALIGN)
        _store_words(base, mask_l, vw1, V_OFF, 1, V_BITS, ALIGN)
        _store_words(base, mask_l, vw2, V_OFF, 2, V_BITS, ALIGN)
        _store_words(base, mask_l, vw3, V_OFF, 3, V_BITS, ALIGN)
        _store_norm(base, mask_l, _norm_of(vn, yc, cc, V_RULE, FAST), V_NORM_OFF)

        f0 = _f32(k0)
        f1 = _f32(k1)
        f2 = _f32(k2)
        f3 = _f32(k3)
        rsq = gl.sum(f0 * f0 + f1 * f1 + f2 * f2 + f3 * f3, axis=1)
        ew_raw = gl.load(key_errw_ptr + head * 2)  # the head's error weights (raw, calibrated)
        ew_cal = gl.load(key_errw_ptr + head * 2 + 1)
        kw0, kw1, kw2, kw3, knorm16, raw = _key_coded(
            f0, f1, f2, f3, rsq, ew_raw, ew_cal, key_mean_ptr, key_isg_ptr, km_s, isg_s, i, hd,
            cos0_s, sin0_s, cos1_s, sin1_s, hcp_s, ktab, MEAN, K_SHIFT, K_ASM, K_BITS, K_RULE, C,
            M, SCALE, LA, LB, L, ROW, COLA, VSMEM, FAST)
        _store_words(base, mask_l, kw0, K_OFF, 0, K_BITS, ALIGN)
        _store_words(base, mask_l, kw1, K_OFF, 1, K_BITS, ALIGN)
        _store_words(base, mask_l, kw2, K_OFF, 2, K_BITS, ALIGN)
        _store_words(base, mask_l, kw3, K_OFF, 3, K_BITS, ALIGN)
        _store_norm(base, mask_l, gl.where(raw, -gl.abs(knorm16), gl.abs(knorm16)), K_NORM_OFF)


def store_launch(key, value, kv_cache, slot_mapping, tables, positions, c: dict, hop: dict,
                 align: int, *, num_warps: int = 4, heads: int | None = None,
                 maxnreg: int | None = None,
                 vsmem: bool = VSMEM, async_kv: bool = ASYNC, kv16: bool = KV16,
                 slut: bool = SLUT, fastdiv: bool = FASTDIV, remat: bool = REMAT,
                 kvptx: bool = KVPTX):
    """(grid, args, constexprs) of the kernel's launch (no checks, no launch: tq_store
    launches it; tests/store_hopper_compile.py compiles it without a GPU). heads: per program
    (default: all with a key mean, sharing the cos/sin; else 1). kvptx: only where every key and
    value row starts 16-byte aligned (unchecked here; tq_store's plan key carries it)."""
    T, H, D = key.shape
    lay = tables.layout
    heads = heads or (H if tables.has_mean else 1)
    # VSMEM, ASYNC and SLUT as measured: programs of several heads (one head: a table fill, the
    # vectors' staging or a head ahead for 16-64 tokens' work, not timed with them)
    vsmem, async_kv, slut = (x and heads > 1 for x in (vsmem, async_kv, slut))
    cs = kv_cache.stride()
    cx = dict(PAGE=kv_cache.shape[1], STRIDE_TOK=cs[1], STRIDE_HEAD=cs[2], NW=num_warps,
              HEADS=heads, D=D, MEAN=bool(tables.has_mean), VMEAN=c["vmean"],
              K_BITS=lay.key.b.bits, V_BITS=lay.value.b.bits, K_OFF=lay.key.b.offset,
              V_OFF=lay.value.b.offset, K_NORM_OFF=lay.key.norm_offset,
              V_NORM_OFF=lay.value.norm_offset, K_RULE=tables.constexprs["K_NORM_RULE"],
              V_RULE=tables.constexprs["V_NORM_RULE"], K_SHIFT=hop["k_shift"],
              V_SHIFT=hop["v_shift"], ALIGN=align,
              VSMEM=bool(vsmem), ASYNC=bool(async_kv), KV16=bool(kv16 and not async_kv),
              LK=kv16_layout(num_warps, D // 4), SLUT=False,
              K_ASM="", V_ASM="", K_DECL="", K_FILL="", K_BASE="", V_DECL="", V_FILL="",
              V_BASE="", K_ROWS=0, V_ROWS=0, FAST=fastdiv, REMAT=bool(remat),
              KVPTX=bool(kvptx and async_kv and D == 128),
              num_warps=num_warps)
    cx["SLUT"] = bool(slut and "k_utab" in hop and "v_utab" in hop and _slut_fits(cx, hop))
    # PTX's static shared memory stops at 48 KB (tq5's tables are 20 KB: no KVPTX with them)
    cx["KVPTX"] = cx["KVPTX"] and not (cx["SLUT"] and ptx_static(cx, hop) > 48 * 1024)
    kp = kvptx_asm(16 * num_warps, D // 4) if cx["KVPTX"] else None
    cx.update(KV_DECL=kp["DECL"] if kp else "", KV_COPY_K=kp["COPY_K"] if kp else "",
              KV_COPY_V=kp["COPY_V"] if kp else "", KV_WAIT=kp["WAIT"] if kp else "",
              **{f"KV_LDM{b}": kp["LDM"][b] if kp else "" for b in range(8)})
    if cx["SLUT"]:
        cx.update(K_ASM=slut_asm(*hop["k_ukm"][:2]), V_ASM=slut_asm(*hop["v_ukm"][:2]),
                  K_ROWS=hop["k_utab"].shape[0], V_ROWS=hop["v_utab"].shape[0])
        for x, name in (("K", "tq_store_ktab"), ("V", "tq_store_vtab")):
            cx.update(zip((x + "_DECL", x + "_FILL", x + "_BASE"),
                          slut_ptx(name, hop[x.lower() + "_ukm"][2])))
    if maxnreg:
        cx["maxnreg"] = maxnreg
    args = (key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1),
            kv_cache, cs[0], slot_mapping, T, slot_mapping if positions is None else positions,
            *table_args(tables, hop, cx))
    grid = (-(-T // (16 * num_warps)), H // heads)
    return grid, args, cx

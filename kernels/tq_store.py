"""Fused calibrate-rotate-quantize-store of new keys and values into the paged quantized cache.

One program codes BLOCK_T tokens of HEADS KV heads (a loop over the heads, so the key mean's
per-token cos/sin is computed once for all of them), keys and values, and writes their slots
through vLLM's slot mapping (negative slots, vLLM's padding, are skipped). Per vector, as
formats.py specifies: calibrate, take the norm, rotate, count the thresholds below each
coordinate, pack, and store the norm under the format's rule.

The rotation is one tl.dot of the [BLOCK_T, D] tile with the signed Hadamard columns of a stream
(diag(signs) H, entries +-1). On the GPU (SPLIT=1) it keeps float32 accuracy with few tensor-core
passes: a bf16 input (a raw key, an uncalibrated key, a value) is exact in bf16, so one bf16 dot
with float32 accumulation is exact up to the summation order; a value mean is subtracted after the
rotation (its rotation is a per-head constant); a calibrated key (float32) is scaled to
|x| <= 256 and split into two float16 parts (22 significant bits) for two dots. The decodings the
raw-key fallback compares are rotated back the same way (levels * 256 in two float16 parts).
Under the CPU interpreter (SPLIT=0) every dot is float32.

Codes: the codebooks are symmetric (codebook.py), so a code is the sign plus the number of
positive thresholds below |y| (half the compares of a plain count); torch.bucketize's tie rule
(thresholds strictly below y) is kept by comparing |y| of a non-positive y as the next float up.

The rotation columns are loaded once per program (the head loop reuses them from shared memory;
the unrotation is the transposed dot of the same columns). With the raw-key fallback both codings
of a key are packed, the better one is chosen per row in registers and stored once, as 32-bit
words where the slot is 4-byte aligned (16-bit where a stream starts 2 bytes off, e.g. the value
codes after the key norm) and the norms as 16-bit stores.

The raw-key fallback's weighted errors (ERR=1) come from residuals in rotated unit coordinates:
k - k^ = key_scale * n * U(y - g c) for the calibrated coding (g = norm16 / n) and rn * U(ry - rg rc)
for the raw one, one unrotation each (the decoded keys and the key mean are never formed; the
float32 difference is at least as accurate as the reference's k - k^). Where a vector is one
full-width stream (tq4, tq3, tq5: SYM) the float32 rotations and unrotations use H itself (the
signs go on the input; H is symmetric, so the unrotation needs no transposed copy), the code search
compiles the stream's codebook in as immediates, and the key norms reach the MMA layout through a
small scratch store/load (SCR) so that Triton does not recompute the calibrated key in a second
layout. CHUNK (the default there) splits each rotation into two Walsh-Hadamard butterfly levels on
four column chunks (float32, elementwise) and one [C, C] dot per chunk (C = D / 4): a quarter of
the tensor-core work, a 2 KB matrix instead of 64 KB of columns; launched with maxnreg 128 (four
4-warp programs per SM; measured, benchmarks/RESULTS.md "Store kernel, fourth pass").
"""

import torch
import triton
import triton.language as tl

from .tq_common import cache_slot_ptrs, rope_cos_sin, store_norm, store_stream_codes


@triton.jit
def _load_mat(ptr, R: tl.constexpr, C: tl.constexpr):
    return tl.load(ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :])


@triton.jit
def _dot_split(x, h16):
    """x (float32, |x| <= 2^16) @ h16 (float16, exact) in two float16 passes (22 bits of x)."""
    hi = x.to(tl.float16)
    lo = (x - hi.to(tl.float32)).to(tl.float16)
    return tl.dot(hi, h16, tl.dot(lo, h16))


@triton.jit
def _codes(y, cb_ptr, BITS: tl.constexpr, N: tl.constexpr, W: tl.constexpr,
           CODES: tl.constexpr, CB: tl.constexpr):
    """Codes (torch.bucketize, right=False, of a symmetric codebook) and levels of y [rows, W];
    levels are 0 in padding columns. A code is the sign plus the number m of positive thresholds
    below |y|. CODES 0: a compare and two selects per threshold; 1: no predicates: each
    threshold t below |y| is the sign bit s of t - |y| (exact: a float difference is 0 only for
    equal operands), m adds the s and the level's float bits add s * (the step between the bits
    of consecutive positive levels), exact integer arithmetic; 2: m as in 1, the level a lookup.
    CB (CODES 0): the positive levels then the positive thresholds as constants (compiled in as
    immediates: no loads, no registers), else () and the table at cb_ptr."""
    HALF: tl.constexpr = 1 << (BITS - 1)
    pos = y > 0
    a = tl.abs(y)
    # #{t <= |y|} = #{t < next float above |y|} for the non-positive side
    a = tl.where(pos, a, (a.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True))
    if (CODES == 0) and (len(CB) > 0):
        m = tl.zeros(y.shape, dtype=tl.int32)
        c = tl.zeros(y.shape, dtype=tl.float32) + CB[0]
        for j in tl.static_range(HALF - 1):
            above = a > CB[HALF + j]
            m = tl.where(above, j + 1, m)  # thresholds ascend: the last one below wins
            c = tl.where(above, CB[1 + j], c)
        code = tl.where(pos, HALF + m, HALF - 1 - m)
    elif CODES == 0:
        m = tl.zeros(y.shape, dtype=tl.int32)
        c = tl.zeros(y.shape, dtype=tl.float32) + tl.load(cb_ptr + HALF)
        for j in tl.static_range(HALF - 1):
            above = a > tl.load(cb_ptr + 256 + HALF + j)
            m = tl.where(above, j + 1, m)  # thresholds ascend: the last one below wins
            c = tl.where(above, tl.load(cb_ptr + HALF + 1 + j), c)
        code = tl.where(pos, HALF + m, HALF - 1 - m)
    else:
        mu = tl.zeros(y.shape, dtype=tl.uint32)
        lv = tl.load(cb_ptr + HALF).to(tl.uint32, bitcast=True)
        cb = tl.zeros(y.shape, dtype=tl.uint32) + lv
        for j in tl.static_range(HALF - 1):
            s = (tl.load(cb_ptr + 256 + HALF + j) - a).to(tl.uint32, bitcast=True) >> 31
            mu += s
            if CODES == 1:
                nxt = tl.load(cb_ptr + HALF + 1 + j).to(tl.uint32, bitcast=True)
                cb += s * (nxt - lv)
                lv = nxt
        m = mu.to(tl.int32, bitcast=True)
        code = tl.where(pos, HALF + m, HALF - 1 - m)
        if CODES == 1:
            c = cb.to(tl.float32, bitcast=True)
        else:
            c = tl.load(cb_ptr + HALF + m)
    c = tl.where(pos, c, -c)
    if N < W:
        c = tl.where(tl.arange(0, W)[None, :] < N, c, 0.0)
    return code, c


@triton.jit
def _mats(p32, p16, px, D: tl.constexpr, W: tl.constexpr, SPLIT: tl.constexpr):
    """A stream's rotation columns [D, W]: (float32 or float16 per SPLIT, the 16-bit input's
    dtype); loaded once per program where the loop reuses them (kept in shared memory)."""
    if SPLIT == 0:
        hf = _load_mat(p32, D, W)
        hx = hf
    else:
        hf = _load_mat(p16, D, W)
        hx = _load_mat(px, D, W)
    return hf, hx


@triton.jit
def _stream(x, xb, inv_n, hf, hx, rot_mean_ptr, cb_ptr, D: tl.constexpr,
            BITS: tl.constexpr, N: tl.constexpr, W: tl.constexpr, SPLIT: tl.constexpr,
            INPUT: tl.constexpr, CODES: tl.constexpr, CB: tl.constexpr):
    """Codes, levels, sum y*c and sum c*c of one stream of x [rows, D] (unit-scaled by inv_n).
    INPUT (GPU only): 0 float32 x; 1 16-bit xb == x; 2 16-bit xb, x = xb - mean (rot_mean
    given). hf: the columns in float32 (SPLIT 0) or float16; hx: in xb's dtype."""
    SCALE: tl.constexpr = 1.0 / (D ** 0.5)
    if SPLIT == 0:
        y = tl.dot(x, hf, input_precision="ieee") * SCALE * inv_n[:, None]
    elif INPUT == 0:
        xs = x * (inv_n * 256.0)[:, None]
        y = _dot_split(xs, hf) * (SCALE / 256.0)
    else:
        y = tl.dot(xb, hx)
        if INPUT == 2:
            y -= tl.load(rot_mean_ptr + tl.arange(0, W))[None, :]
        y = y * SCALE * inv_n[:, None]
    code, c = _codes(y, cb_ptr, BITS, N, W, CODES, CB)
    return code, c, tl.sum(y * c, axis=1), tl.sum(c * c, axis=1), y


@triton.jit
def _via_memory(v, scr_ptrs, mask, SCR: tl.constexpr):
    """v [rows] unchanged; with SCR (the GPU) stored and loaded back behind a barrier, so that
    Triton moves this row vector into another layout by a load instead of recomputing there
    everything it depends on (the calibrated key tile and its key mean)."""
    if SCR:
        tl.store(scr_ptrs, v, mask=mask)
        tl.debug_barrier()
        v = tl.load(scr_ptrs, mask=mask, other=0.0)
    return v


@triton.jit
def _norm_of(n, yc, cc, NORM_RULE: tl.constexpr):
    if NORM_RULE == 0:  # plain
        norm = n
    elif NORM_RULE == 1:  # unit
        norm = tl.div_rn(n, tl.maximum(tl.sqrt_rn(cc), 1e-30))
    else:  # ls
        norm = tl.div_rn(n * yc, tl.maximum(cc, 1e-30))
    return norm


@triton.jit
def _code_key_sym(x, xb, n, hf, hx, rot_mean_ptr, cb_ptr, D: tl.constexpr, BITS: tl.constexpr,
                  N: tl.constexpr, W: tl.constexpr, SPLIT: tl.constexpr, INPUT: tl.constexpr,
                  CODES: tl.constexpr, CB: tl.constexpr, WIDE: tl.constexpr,
                  NORM_RULE: tl.constexpr):
    """One coding of a full-width key stream (SYM) of x [rows, D] (signs applied) of norm n: the
    packed codes, the norm as stored (float16-rounded), and the residual k - k^ unrotated in
    unit coordinates (y - g c, g = stored norm / n) that the fallback's error weighs."""
    inv_n = tl.div_rn(1.0, tl.maximum(n, 1e-30))
    code, c, yc, cc, y = _stream(x, xb, inv_n, hf, hx, rot_mean_ptr, cb_ptr, D, BITS, N, W, SPLIT,
                                 INPUT, CODES, CB)
    # packed before the norm: the other order compiled to 4801 loop instructions, not 3692 (sm_90)
    packed = _pack(code, BITS, N, W, WIDE)
    norm16 = _fp16_round(_norm_of(n, yc, cc, NORM_RULE))
    e = _unrotate_unit(y - (norm16 * inv_n)[:, None] * c, hf, D, W, SPLIT, True)
    return packed, norm16, e


@triton.jit
def _key_mean_at(mean_ptr, d, partner, rope_sign, cos, sin, MEAN: tl.constexpr):
    """[rows, D] key mean as the keys carry it: RoPE'd to each row's position (MEAN, cos and
    sin per row), else the constant mean [1, D]."""
    if MEAN:
        mu = tl.load(mean_ptr + d)
        return mu[None, :] * cos + (rope_sign * tl.load(mean_ptr + partner))[None, :] * sin
    else:
        return tl.load(mean_ptr + d)[None, :]


@triton.jit
def _fp16_round(x):
    return tl.minimum(tl.maximum(x, -65504.0), 65504.0).to(tl.float16).to(tl.float32)


@triton.jit
def _unrotate(c, norm16, hf, D: tl.constexpr, W: tl.constexpr, SPLIT: tl.constexpr):
    """norm * unrotate(c) of one stream's levels c [rows, W] -> [rows, D] (signs included);
    hf: the stream's columns [D, W] as _mats gives them (their transpose is the inverse)."""
    SCALE: tl.constexpr = 1.0 / (D ** 0.5)
    if SPLIT == 0:
        return tl.dot(c * norm16[:, None], tl.trans(hf), input_precision="ieee") * SCALE
    else:
        out = _dot_split(c * 256.0, tl.trans(hf))
        return out * (norm16 * (SCALE / 256.0))[:, None]


@triton.jit
def _unrotate_unit(r, hf, D: tl.constexpr, W: tl.constexpr, SPLIT: tl.constexpr,
                   SYM: tl.constexpr):
    """unrotate(r) of one stream's rotated coordinates r [rows, W] (|r| <= 2^8) -> [rows, D],
    without the signs where SYM (hf is H itself: symmetric, its own transpose)."""
    SCALE: tl.constexpr = 1.0 / (D ** 0.5)
    if SYM:
        ht = hf
    else:
        ht = tl.trans(hf)
    if SPLIT == 0:
        return tl.dot(r, ht, input_precision="ieee") * SCALE
    else:
        return _dot_split(r * 256.0, ht) * (SCALE / 256.0)



@triton.jit
def _pack(code, BITS: tl.constexpr, N: tl.constexpr, W: tl.constexpr, WIDE: tl.constexpr):
    """Codes [rows, W] as the stream's 32-bit words [rows, W * BITS // 32] (little-endian bit
    order, as packing.py) where whole words hold whole codes; else the codes unchanged."""
    WORDS: tl.constexpr = WIDE & (32 % BITS == 0) & ((N * BITS) % 32 == 0)
    if WORDS:
        ROWS: tl.constexpr = code.shape[0]
        CPW: tl.constexpr = 32 // BITS
        c3 = tl.reshape(code, [ROWS, W // CPW, CPW])
        shifts = tl.arange(0, CPW) * BITS
        return tl.sum(c3 << shifts[None, None, :], axis=2)  # no bits overlap: sum == or
    else:
        return code


@triton.jit
def _store_stream(slot_ptrs, row_mask, packed, OFF: tl.constexpr, BITS: tl.constexpr,
                  N: tl.constexpr, U: tl.constexpr, K: tl.constexpr, NU: tl.constexpr,
                  ALIGN: tl.constexpr, WIDE: tl.constexpr):
    """Store _pack's output: 32-bit stores (16-bit where the stream starts 2 bytes off a word,
    e.g. a value stream after a 2-byte key norm), else store_stream_codes' bytes."""
    WORDS: tl.constexpr = WIDE & (32 % BITS == 0) & ((N * BITS) % 32 == 0)
    if WORDS:
        NW: tl.constexpr = N * BITS // 32
        WP: tl.constexpr = packed.shape[1]
        u = tl.arange(0, WP)
        mask = row_mask[:, None] & (u[None, :] < NW)
        if (ALIGN >= 4) & (OFF % 4 == 0):
            p = (slot_ptrs + OFF).to(tl.pointer_type(tl.int32))
            tl.store(p[:, None] + u[None, :], packed, mask=mask)
        elif (ALIGN >= 2) & (OFF % 2 == 0):
            p = (slot_ptrs + OFF).to(tl.pointer_type(tl.int16))
            tl.store(p[:, None] + 2 * u[None, :], packed.to(tl.int16), mask=mask)
            tl.store(p[:, None] + (2 * u[None, :] + 1), (packed >> 16).to(tl.int16), mask=mask)
        else:
            base = slot_ptrs[:, None] + (OFF + 4 * u[None, :])
            for j in tl.static_range(4):
                tl.store(base + j, ((packed >> (8 * j)) & 255).to(tl.uint8), mask=mask)
    else:
        store_stream_codes(slot_ptrs, row_mask, packed, OFF, BITS, N, U, K, NU)


@triton.jit
def _store_norm16(slot_ptrs, row_mask, norm, OFF: tl.constexpr, ALIGN: tl.constexpr,
                  WIDE: tl.constexpr):
    """store_norm, in one 16-bit store where the slot allows (WIDE)."""
    if WIDE & (ALIGN >= 2) & (OFF % 2 == 0):
        n16 = tl.minimum(tl.maximum(norm, -65504.0), 65504.0).to(tl.float16)
        p = (slot_ptrs + OFF).to(tl.pointer_type(tl.int16))
        tl.store(p, n16.to(tl.int16, bitcast=True), mask=row_mask)
    else:
        store_norm(slot_ptrs, row_mask, norm, OFF)


# ------------------------------------------------------------------------------------------------
# CHUNK: the rotation of one full-width stream as two Walsh-Hadamard butterfly levels on four
# column chunks (float32, elementwise) and one small dot per chunk with H_C (C = D / 4). Sylvester's
# H_D[(a, i), (b, j)] = H_4[a, b] H_C[i, j] for chunk indices a, b (the two top bits of a column),
# so x H_D = [z_0 H_C, ..., z_3 H_C] with z = the 4-point transform of x's chunks. A quarter of
# the tensor-core work of a full dot, a 2 KB matrix, and small operands (fewer registers).


@triton.jit
def _wht4(x0, x1, x2, x3):
    """The 4-point Walsh-Hadamard transform of four chunks: z_b = sum_a (-1)^popcount(a & b) x_a."""
    s01 = x0 + x1
    d01 = x0 - x1
    s23 = x2 + x3
    d23 = x2 - x3
    return s01 + s23, d01 + d23, s01 - s23, d01 - d23


@triton.jit
def _cdot(z, scale_row, hc, SCALE: tl.constexpr, SPLIT: tl.constexpr):
    """(z * scale_row[:, None]) @ H_C * SCALE, float32 accurate (two float16 passes on the GPU;
    |z * scale_row| <= 2^8)."""
    if SPLIT == 0:
        return tl.dot(z * scale_row[:, None], hc, input_precision="ieee") * SCALE
    else:
        return _dot_split(z * (scale_row * 256.0)[:, None], hc) * (SCALE / 256.0)


@triton.jit
def _crot(x0, x1, x2, x3, scale_row, hc, SCALE: tl.constexpr, SPLIT: tl.constexpr):
    z0, z1, z2, z3 = _wht4(x0, x1, x2, x3)
    return (_cdot(z0, scale_row, hc, SCALE, SPLIT), _cdot(z1, scale_row, hc, SCALE, SPLIT),
            _cdot(z2, scale_row, hc, SCALE, SPLIT), _cdot(z3, scale_row, hc, SCALE, SPLIT))


@triton.jit
def _cload(ptrs, row_mask, a: tl.constexpr, C: tl.constexpr):
    """Chunk a [rows, C] (float32) of the rows at ptrs [rows] (16-bit or float32 elements)."""
    return tl.load(ptrs[:, None] + (a * C + tl.arange(0, C))[None, :], mask=row_mask[:, None],
                   other=0.0).to(tl.float32)


@triton.jit
def _cvec(ptr, a: tl.constexpr, C: tl.constexpr):
    return tl.load(ptr + a * C + tl.arange(0, C))


@triton.jit
def _cmean_rope(mean_ptr, sign_ptr, partner_ptr, a: tl.constexpr, C: tl.constexpr, cos, sin):
    """Chunk a of the key mean RoPE'd to each row's position (rotary partners from the tables,
    for layouts other than NEOX's half split)."""
    partner = tl.load(mean_ptr + _cvec(partner_ptr, a, C))
    return _cvec(mean_ptr, a, C)[None, :] * cos + (_cvec(sign_ptr, a, C) * partner)[None, :] * sin


@triton.jit
def _ccode(y, cb_ptr, BITS: tl.constexpr, C: tl.constexpr, CODES: tl.constexpr,
           CB: tl.constexpr, WIDE: tl.constexpr):
    """Packed codes and levels of one chunk."""
    code, c = _codes(y, cb_ptr, BITS, C, C, CODES, CB)
    return _pack(code, BITS, C, C, WIDE), c


@triton.jit
def _cstore(slot_ptrs, row_mask, pk, a: tl.constexpr, OFF: tl.constexpr, BITS: tl.constexpr,
            C: tl.constexpr, U: tl.constexpr, K: tl.constexpr, ALIGN: tl.constexpr,
            WIDE: tl.constexpr):
    _store_stream(slot_ptrs, row_mask, pk, OFF + a * (C * BITS // 8), BITS, C, U, K, C // K,
                  ALIGN, WIDE)


@triton.jit
def _cerr(r0, r1, r2, r3, wt_ptr, hc, C: tl.constexpr, SCALE: tl.constexpr,
          SPLIT: tl.constexpr, WSQ: tl.constexpr, ws_ptr):
    """sum_i w_i (r H_D)_i^2 * SCALE^2 for residual chunks r (unit-scale rotated coordinates):
    w = wt (times ws^2 where WSQ)."""
    one = tl.full([r0.shape[0]], 1.0, tl.float32)
    e0, e1, e2, e3 = _crot(r0, r1, r2, r3, one, hc, SCALE, SPLIT)
    w0 = _cvec(wt_ptr, 0, C)
    w1 = _cvec(wt_ptr, 1, C)
    w2 = _cvec(wt_ptr, 2, C)
    w3 = _cvec(wt_ptr, 3, C)
    if WSQ:
        w0 = w0 * _cvec(ws_ptr, 0, C) * _cvec(ws_ptr, 0, C)
        w1 = w1 * _cvec(ws_ptr, 1, C) * _cvec(ws_ptr, 1, C)
        w2 = w2 * _cvec(ws_ptr, 2, C) * _cvec(ws_ptr, 2, C)
        w3 = w3 * _cvec(ws_ptr, 3, C) * _cvec(ws_ptr, 3, C)
    return tl.sum(w0[None, :] * e0 * e0 + w1[None, :] * e1 * e1 + w2[None, :] * e2 * e2
                  + w3[None, :] * e3 * e3, axis=1)


@triton.jit
def _ccode_key(x0, x1, x2, x3, n, hc, cb_ptr, BITS: tl.constexpr, C: tl.constexpr,
               CODES: tl.constexpr, CB: tl.constexpr, WIDE: tl.constexpr,
               NORM_RULE: tl.constexpr, SCALE: tl.constexpr, SPLIT: tl.constexpr):
    """One coding of a key given as four chunks x (signs applied) of norm n: the packed codes
    of the chunks, the norm as stored (float16-rounded), and the residual chunks y - g c in
    unit rotated coordinates (g = stored norm / n) that _cerr weighs."""
    inv_n = tl.div_rn(1.0, tl.maximum(n, 1e-30))
    y0, y1, y2, y3 = _crot(x0, x1, x2, x3, inv_n, hc, SCALE, SPLIT)
    p0, c0 = _ccode(y0, cb_ptr, BITS, C, CODES, CB, WIDE)
    p1, c1 = _ccode(y1, cb_ptr, BITS, C, CODES, CB, WIDE)
    p2, c2 = _ccode(y2, cb_ptr, BITS, C, CODES, CB, WIDE)
    p3, c3 = _ccode(y3, cb_ptr, BITS, C, CODES, CB, WIDE)
    cc = tl.sum(c0 * c0 + c1 * c1 + c2 * c2 + c3 * c3, axis=1)
    yc = cc
    if NORM_RULE == 2:
        yc = tl.sum(y0 * c0 + y1 * c1 + y2 * c2 + y3 * c3, axis=1)
    norm16 = _fp16_round(_norm_of(n, yc, cc, NORM_RULE))
    g = (norm16 * inv_n)[:, None]
    return p0, p1, p2, p3, norm16, y0 - g * c0, y1 - g * c1, y2 - g * c2, y3 - g * c3


@triton.jit
def _chunked_head(kptr, vptr, slot_ptrs, row_mask, scr, head, hc, sg_ptr, cos0, cos1, cos2,
                  cos3, sin0, sin1, sin2, sin3, rope_sign_ptr, rope_partner_ptr,
                  key_mean_ptr, key_inv_scale_ptr, key_scale_ptr, key_weight_ptr,
                  value_mean_ptr, codebooks_ptr,
                  D: tl.constexpr, SPLIT: tl.constexpr, MEAN: tl.constexpr,
                  VMEAN: tl.constexpr, CODES: tl.constexpr, SCR: tl.constexpr,
                  KB_BITS: tl.constexpr, KB_OFF: tl.constexpr, KB_U: tl.constexpr,
                  KB_K: tl.constexpr, VB_BITS: tl.constexpr, VB_OFF: tl.constexpr,
                  VB_U: tl.constexpr, VB_K: tl.constexpr, K_NORM_OFF: tl.constexpr,
                  V_NORM_OFF: tl.constexpr, K_NORM_RULE: tl.constexpr,
                  V_NORM_RULE: tl.constexpr, ALIGN: tl.constexpr, WIDE: tl.constexpr,
                  KB_CB: tl.constexpr, VB_CB: tl.constexpr, NEOX: tl.constexpr):
    """Keys (raw-key fallback, calibrated) and values of one head, in four column chunks."""
    C: tl.constexpr = D // 4
    SCALE: tl.constexpr = 1.0 / (D ** 0.5)
    kcb = codebooks_ptr + 512
    k0 = _cload(kptr, row_mask, 0, C)
    k1 = _cload(kptr, row_mask, 1, C)
    k2 = _cload(kptr, row_mask, 2, C)
    k3 = _cload(kptr, row_mask, 3, C)
    sg0 = _cvec(sg_ptr, 0, C)[None, :]
    sg1 = _cvec(sg_ptr, 1, C)[None, :]
    sg2 = _cvec(sg_ptr, 2, C)[None, :]
    sg3 = _cvec(sg_ptr, 3, C)[None, :]
    hd = head * D

    # the raw coding
    rn = tl.sqrt_rn(tl.sum(k0 * k0 + k1 * k1 + k2 * k2 + k3 * k3, axis=1))
    rn = _via_memory(rn, scr, row_mask, SCR)
    rp0, rp1, rp2, rp3, rnorm16, r0, r1, r2, r3 = _ccode_key(
        k0 * sg0, k1 * sg1, k2 * sg2, k3 * sg3, rn, hc, kcb, KB_BITS, C, CODES, KB_CB, WIDE,
        K_NORM_RULE, SCALE, SPLIT)
    rerr = _cerr(r0, r1, r2, r3, key_weight_ptr + hd, hc, C, SCALE, SPLIT, False,
                 key_scale_ptr) * (rn * rn)

    # the calibrated coding
    if MEAN and NEOX:  # rotary pairs (c, c + D/2): chunk a's partner is chunk a + 2
        u0 = _cvec(key_mean_ptr + hd, 0, C)[None, :]
        u1 = _cvec(key_mean_ptr + hd, 1, C)[None, :]
        u2 = _cvec(key_mean_ptr + hd, 2, C)[None, :]
        u3 = _cvec(key_mean_ptr + hd, 3, C)[None, :]
        mu0 = u0 * cos0 - u2 * sin0
        mu2 = u2 * cos0 + u0 * sin0
        mu1 = u1 * cos1 - u3 * sin1
        mu3 = u3 * cos1 + u1 * sin1
    elif MEAN:
        mu0 = _cmean_rope(key_mean_ptr + hd, rope_sign_ptr, rope_partner_ptr, 0, C, cos0, sin0)
        mu1 = _cmean_rope(key_mean_ptr + hd, rope_sign_ptr, rope_partner_ptr, 1, C, cos1, sin1)
        mu2 = _cmean_rope(key_mean_ptr + hd, rope_sign_ptr, rope_partner_ptr, 2, C, cos2, sin2)
        mu3 = _cmean_rope(key_mean_ptr + hd, rope_sign_ptr, rope_partner_ptr, 3, C, cos3, sin3)
    else:
        mu0 = _cvec(key_mean_ptr + hd, 0, C)[None, :]
        mu1 = _cvec(key_mean_ptr + hd, 1, C)[None, :]
        mu2 = _cvec(key_mean_ptr + hd, 2, C)[None, :]
        mu3 = _cvec(key_mean_ptr + hd, 3, C)[None, :]
    m = row_mask[:, None]
    x0 = tl.where(m, (k0 - mu0) * (_cvec(key_inv_scale_ptr + hd, 0, C)[None, :] * sg0), 0.0)
    x1 = tl.where(m, (k1 - mu1) * (_cvec(key_inv_scale_ptr + hd, 1, C)[None, :] * sg1), 0.0)
    x2 = tl.where(m, (k2 - mu2) * (_cvec(key_inv_scale_ptr + hd, 2, C)[None, :] * sg2), 0.0)
    x3 = tl.where(m, (k3 - mu3) * (_cvec(key_inv_scale_ptr + hd, 3, C)[None, :] * sg3), 0.0)
    n = tl.sqrt_rn(tl.sum(x0 * x0 + x1 * x1 + x2 * x2 + x3 * x3, axis=1))
    n = _via_memory(n, scr + 1, row_mask, SCR)
    p0, p1, p2, p3, norm16, r0, r1, r2, r3 = _ccode_key(
        x0, x1, x2, x3, n, hc, kcb, KB_BITS, C, CODES, KB_CB, WIDE, K_NORM_RULE, SCALE, SPLIT)
    err = _cerr(r0, r1, r2, r3, key_weight_ptr + hd, hc, C, SCALE, SPLIT, True,
                key_scale_ptr + hd) * (n * n)
    raw = rerr < err
    rw = raw[:, None]
    _cstore(slot_ptrs, row_mask, tl.where(rw, rp0, p0), 0, KB_OFF, KB_BITS, C, KB_U, KB_K, ALIGN, WIDE)
    _cstore(slot_ptrs, row_mask, tl.where(rw, rp1, p1), 1, KB_OFF, KB_BITS, C, KB_U, KB_K, ALIGN, WIDE)
    _cstore(slot_ptrs, row_mask, tl.where(rw, rp2, p2), 2, KB_OFF, KB_BITS, C, KB_U, KB_K, ALIGN, WIDE)
    _cstore(slot_ptrs, row_mask, tl.where(rw, rp3, p3), 3, KB_OFF, KB_BITS, C, KB_U, KB_K, ALIGN, WIDE)
    _store_norm16(slot_ptrs, row_mask, tl.where(raw, -tl.abs(rnorm16), tl.abs(norm16)),
                  K_NORM_OFF, ALIGN, WIDE)

    # values
    v0 = _cload(vptr, row_mask, 0, C)
    v1 = _cload(vptr, row_mask, 1, C)
    v2 = _cload(vptr, row_mask, 2, C)
    v3 = _cload(vptr, row_mask, 3, C)
    if VMEAN:
        v0 = tl.where(m, v0 - _cvec(value_mean_ptr + hd, 0, C)[None, :], 0.0)
        v1 = tl.where(m, v1 - _cvec(value_mean_ptr + hd, 1, C)[None, :], 0.0)
        v2 = tl.where(m, v2 - _cvec(value_mean_ptr + hd, 2, C)[None, :], 0.0)
        v3 = tl.where(m, v3 - _cvec(value_mean_ptr + hd, 3, C)[None, :], 0.0)
    vn = tl.sqrt_rn(tl.sum(v0 * v0 + v1 * v1 + v2 * v2 + v3 * v3, axis=1))
    vcb = codebooks_ptr + 3 * 512
    y0, y1, y2, y3 = _crot(v0 * sg0, v1 * sg1, v2 * sg2, v3 * sg3,
                           tl.div_rn(1.0, tl.maximum(vn, 1e-30)), hc, SCALE, SPLIT)
    p0, c0 = _ccode(y0, vcb, VB_BITS, C, CODES, VB_CB, WIDE)
    _cstore(slot_ptrs, row_mask, p0, 0, VB_OFF, VB_BITS, C, VB_U, VB_K, ALIGN, WIDE)
    p1, c1 = _ccode(y1, vcb, VB_BITS, C, CODES, VB_CB, WIDE)
    _cstore(slot_ptrs, row_mask, p1, 1, VB_OFF, VB_BITS, C, VB_U, VB_K, ALIGN, WIDE)
    p2, c2 = _ccode(y2, vcb, VB_BITS, C, CODES, VB_CB, WIDE)
    _cstore(slot_ptrs, row_mask, p2, 2, VB_OFF, VB_BITS, C, VB_U, VB_K, ALIGN, WIDE)
    p3, c3 = _ccode(y3, vcb, VB_BITS, C, CODES, VB_CB, WIDE)
    _cstore(slot_ptrs, row_mask, p3, 3, VB_OFF, VB_BITS, C, VB_U, VB_K, ALIGN, WIDE)
    vcc = tl.sum(c0 * c0 + c1 * c1 + c2 * c2 + c3 * c3, axis=1)
    vyc = vcc
    if V_NORM_RULE == 2:
        vyc = tl.sum(y0 * c0 + y1 * c1 + y2 * c2 + y3 * c3, axis=1)
    _store_norm16(slot_ptrs, row_mask, _norm_of(vn, vyc, vcc, V_NORM_RULE), V_NORM_OFF, ALIGN,
                  WIDE)


@triton.jit
def _tq_store_kernel(
    key_ptr, stride_kt, stride_kh, value_ptr, stride_vt, stride_vh,
    cache_ptr, stride_blk, slot_mapping_ptr, num_tokens,
    codebooks_ptr, key_mean_ptr, key_scale_ptr, key_inv_scale_ptr, key_weight_ptr,
    value_mean_ptr, positions_ptr, rope_theta_ptr, rope_partner_ptr, rope_sign_ptr,
    kfa32, kfb32, vfa32, vfb32, kia32, kib32, kfa16, kfb16, vfa16, vfb16, kia16, kib16,
    kfax, kfbx, vfax, vfbx, rot_vm_ptr, signs_ptr, scratch_ptr, hc32, hc16,
    PAGE: tl.constexpr, STRIDE_TOK: tl.constexpr, STRIDE_HEAD: tl.constexpr,
    BLOCK_T: tl.constexpr, HEADS: tl.constexpr, SPLIT: tl.constexpr, EXACT16: tl.constexpr,
    KCAL: tl.constexpr, FALLBACK: tl.constexpr, ABS_NORM: tl.constexpr, MEAN: tl.constexpr,
    VMEAN: tl.constexpr, D: tl.constexpr, SLOT: tl.constexpr,
    KA_BITS: tl.constexpr, KA_N: tl.constexpr, KA_OFF: tl.constexpr, KA_U: tl.constexpr,
    KA_K: tl.constexpr, KA_NU: tl.constexpr, KA_W: tl.constexpr,
    KB_BITS: tl.constexpr, KB_N: tl.constexpr, KB_OFF: tl.constexpr, KB_U: tl.constexpr,
    KB_K: tl.constexpr, KB_NU: tl.constexpr, KB_W: tl.constexpr,
    VA_BITS: tl.constexpr, VA_N: tl.constexpr, VA_OFF: tl.constexpr, VA_U: tl.constexpr,
    VA_K: tl.constexpr, VA_NU: tl.constexpr, VA_W: tl.constexpr,
    VB_BITS: tl.constexpr, VB_N: tl.constexpr, VB_OFF: tl.constexpr, VB_U: tl.constexpr,
    VB_K: tl.constexpr, VB_NU: tl.constexpr, VB_W: tl.constexpr,
    K_NORM_OFF: tl.constexpr, V_NORM_OFF: tl.constexpr,
    K_NORM_RULE: tl.constexpr, V_NORM_RULE: tl.constexpr, ALIGN: tl.constexpr = 1,
    SAME_KV_ROT: tl.constexpr = False, CODES: tl.constexpr = 0, WIDE: tl.constexpr = True,
    ERR: tl.constexpr = 1, SYM: tl.constexpr = False,
    KB_CB: tl.constexpr = (), VB_CB: tl.constexpr = (), NO_CB: tl.constexpr = (),
    SCR: tl.constexpr = False,
    CHUNK: tl.constexpr = False, NEOX: tl.constexpr = False,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    in_range = t < num_tokens
    slot = tl.load(slot_mapping_ptr + t, mask=in_range, other=-1).to(tl.int64)
    row_mask = in_range & (slot >= 0)
    slot = tl.maximum(slot, 0)
    t64 = t.to(tl.int64)
    if MEAN:  # RoPE_p(key_mean) at each token's position p: its cos/sin, shared by the heads
        pos = tl.load(positions_ptr + t, mask=in_range, other=0)
        if CHUNK:
            CC: tl.constexpr = D // 4
            cos0, sin0 = rope_cos_sin(pos[:, None], _cvec(rope_theta_ptr, 0, CC)[None, :])
            cos1, sin1 = rope_cos_sin(pos[:, None], _cvec(rope_theta_ptr, 1, CC)[None, :])
            if NEOX:  # the second half's angles are the first half's
                cos2 = cos0
                sin2 = sin0
                cos3 = cos1
                sin3 = sin1
            else:
                cos2, sin2 = rope_cos_sin(pos[:, None], _cvec(rope_theta_ptr, 2, CC)[None, :])
                cos3, sin3 = rope_cos_sin(pos[:, None], _cvec(rope_theta_ptr, 3, CC)[None, :])
        else:
            cos, sin = rope_cos_sin(pos[:, None], tl.load(rope_theta_ptr + d)[None, :])
            rope_sign = tl.load(rope_sign_ptr + d)
            partner = tl.load(rope_partner_ptr + d)
    else:  # placeholders for arguments the paths without MEAN do not read
        cos = 0.0
        sin = 0.0
        rope_sign = 0.0
        partner = 0
        cos0 = 0.0
        cos1 = 0.0
        cos2 = 0.0
        cos3 = 0.0
        sin0 = 0.0
        sin1 = 0.0
        sin2 = 0.0
        sin3 = 0.0
    if CHUNK:
        if SPLIT == 0:
            hc = _load_mat(hc32, D // 4, D // 4)
        else:
            hc = _load_mat(hc16, D // 4, D // 4)

    # How the GPU rotates (_stream's INPUT): 16-bit inputs exactly where no calibration changed them
    K_INPUT: tl.constexpr = 0 if (KCAL or not EXACT16) else 1
    R_INPUT: tl.constexpr = 1 if EXACT16 else 0
    V_INPUT: tl.constexpr = (2 if VMEAN else 1) if EXACT16 else 0
    if SYM:  # one full stream per vector: the columns are H itself, the signs go on the input
        sg = tl.load(signs_ptr + d)
    if not CHUNK:
        hkb, hkbx = _mats(kfb32, kfb16, kfbx, D, KB_W, SPLIT)
        if SAME_KV_ROT:  # the value stream's columns are the key stream's (same extra coordinates)
            hvbx = hkbx
            hvb = hkb
        else:
            hvb, hvbx = _mats(vfb32, vfb16, vfbx, D, VB_W, SPLIT)
    for i in range(HEADS):
        head = tl.program_id(1) * HEADS + i
        slot_ptrs = cache_slot_ptrs(cache_ptr, slot // PAGE, slot % PAGE, head, stride_blk,
                                    STRIDE_TOK, STRIDE_HEAD)
        if CHUNK:
            _chunked_head(key_ptr + t64 * stride_kt + head * stride_kh,
                          value_ptr + t64 * stride_vt + head * stride_vh, slot_ptrs, row_mask,
                          scratch_ptr + (t64 * (tl.num_programs(1) * HEADS) + head) * 2, head,
                          hc, signs_ptr, cos0, cos1, cos2, cos3, sin0, sin1, sin2, sin3,
                          rope_sign_ptr, rope_partner_ptr, key_mean_ptr, key_inv_scale_ptr,
                          key_scale_ptr, key_weight_ptr, value_mean_ptr, codebooks_ptr,
                          D, SPLIT, MEAN, VMEAN, CODES, SCR, KB_BITS, KB_OFF, KB_U, KB_K,
                          VB_BITS, VB_OFF, VB_U, VB_K, K_NORM_OFF, V_NORM_OFF, K_NORM_RULE,
                          V_NORM_RULE, ALIGN, WIDE, KB_CB, VB_CB, NEOX)
        else:
            kb = tl.load(key_ptr + t64[:, None] * stride_kt + head * stride_kh + d[None, :],
                         mask=row_mask[:, None], other=0.0)
            k = kb.to(tl.float32)
            kbs = kb  # 16-bit inputs rotate with the signed columns (hkbx) in either mode
            ks = k
            if SYM:  # float32 inputs rotate with H: their signs first (exact)
                ks = k * sg[None, :]
            if SYM:
                # The raw coding first (its residual's weighted error is all that stays live), then
                # the calibrated one; the smaller weighted error wins (ties: calibrated), a raw key
                # stores -norm. The residual of a coding, in rotated unit coordinates: k - k^ =
                # rn * U(ry - rg rc) raw (rg = rnorm16 / rn), key_scale * n * U(y - g c) calibrated.
                w = tl.load(key_weight_ptr + head * D + d)
                scr = scratch_ptr + (t64 * (tl.num_programs(1) * HEADS) + head) * 2
                rn = _via_memory(tl.sqrt_rn(tl.sum(k * k, axis=1)), scr, in_range, SCR)
                rpk, rnorm16, re = _code_key_sym(ks, kbs, rn, hkb, hkbx, rot_vm_ptr,
                                                 codebooks_ptr + 512, D, KB_BITS, KB_N, KB_W,
                                                 SPLIT, R_INPUT, CODES, KB_CB, WIDE, K_NORM_RULE)
                rerr = tl.sum(w[None, :] * re * re, axis=1) * (rn * rn)

                k_mean = _key_mean_at(key_mean_ptr + head * D, d, partner, rope_sign, cos, sin,
                                      MEAN)
                k_inv_scale = tl.load(key_inv_scale_ptr + head * D + d) * sg
                x = tl.where(row_mask[:, None], (k - k_mean) * k_inv_scale[None, :], 0.0)
                n = _via_memory(tl.sqrt_rn(tl.sum(x * x, axis=1)), scr + 1, in_range, SCR)
                pk_b, norm16, e = _code_key_sym(x, kbs, n, hkb, hkbx, rot_vm_ptr,
                                                codebooks_ptr + 512, D, KB_BITS, KB_N, KB_W,
                                                SPLIT, K_INPUT, CODES, KB_CB, WIDE, K_NORM_RULE)
                sc = tl.load(key_scale_ptr + head * D + d)
                err = tl.sum((w * sc * sc)[None, :] * e * e, axis=1) * (n * n)
                raw = rerr < err
                pk_b = tl.where(raw[:, None], rpk, pk_b)
                pk_a = pk_b
                norm = tl.where(raw, -tl.abs(rnorm16), tl.abs(norm16))
            else:
                if KCAL:
                    k_mean = _key_mean_at(key_mean_ptr + head * D, d, partner, rope_sign, cos,
                                          sin, MEAN)
                    k_inv_scale = tl.load(key_inv_scale_ptr + head * D + d)
                    if SYM:
                        k_inv_scale = k_inv_scale * sg
                    x = tl.where(row_mask[:, None], (k - k_mean) * k_inv_scale[None, :], 0.0)
                else:
                    x = ks
                n = tl.sqrt_rn(tl.sum(x * x, axis=1))
                inv_n = tl.div_rn(1.0, tl.maximum(n, 1e-30))
                code_b, c_b, yc, cc, y_b = _stream(x, kbs, inv_n, hkb, hkbx, rot_vm_ptr,
                                              codebooks_ptr + 512, D, KB_BITS, KB_N, KB_W, SPLIT, K_INPUT,
                                              CODES, KB_CB)
                pk_b = _pack(code_b, KB_BITS, KB_N, KB_W, WIDE)
                pk_a = pk_b
                c_a = c_b
                if KA_N > 0:
                    hka, hkax = _mats(kfa32, kfa16, kfax, D, KA_W, SPLIT)
                    code_a, c_a, yc_a, cc_a, y_a = _stream(x, kbs, inv_n, hka, hkax, rot_vm_ptr,
                                                      codebooks_ptr, D, KA_BITS, KA_N, KA_W, SPLIT,
                                                      K_INPUT, CODES, NO_CB)
                    pk_a = _pack(code_a, KA_BITS, KA_N, KA_W, WIDE)
                    yc += yc_a
                    cc += cc_a
                norm = _norm_of(n, yc, cc, K_NORM_RULE)
                if ABS_NORM:
                    norm = tl.abs(norm)
                if FALLBACK:
                    # Code the raw key too and keep, per row, the coding with the smaller weighted error
                    # (ties: calibrated); the sign of the stored norm flags a raw key.
                    norm16 = _fp16_round(norm)
                    rn = tl.sqrt_rn(tl.sum(k * k, axis=1))
                    inv_rn = tl.div_rn(1.0, tl.maximum(rn, 1e-30))
                    if ERR == 0:
                        k_hat = _unrotate(c_b, norm16, hkb, D, KB_W, SPLIT)
                        if KA_N > 0:
                            k_hat += _unrotate(c_a, norm16, hka, D, KA_W, SPLIT)
                        k_hat = k_hat * tl.load(key_scale_ptr + head * D + d)[None, :] + k_mean
                        w = tl.load(key_weight_ptr + head * D + d)[None, :]
                        err = tl.sum(w * (k - k_hat) * (k - k_hat), axis=1)
                    rcode_b, rc_b, ryc, rcc, ry_b = _stream(ks, kbs, inv_rn, hkb, hkbx, rot_vm_ptr,
                                                            codebooks_ptr + 512, D, KB_BITS, KB_N, KB_W,
                                                            SPLIT, R_INPUT, CODES, KB_CB)
                    rpk_b = _pack(rcode_b, KB_BITS, KB_N, KB_W, WIDE)
                    rpk_a = rpk_b
                    rc_a = rc_b
                    if KA_N > 0:
                        rcode_a, rc_a, ryc_a, rcc_a, ry_a = _stream(ks, kbs, inv_rn, hka, hkax,
                                                                    rot_vm_ptr, codebooks_ptr, D, KA_BITS,
                                                                    KA_N, KA_W, SPLIT, R_INPUT, CODES,
                                                                    NO_CB)
                        rpk_a = _pack(rcode_a, KA_BITS, KA_N, KA_W, WIDE)
                        ryc += ryc_a
                        rcc += rcc_a
                    rnorm16 = _fp16_round(_norm_of(rn, ryc, rcc, K_NORM_RULE))
                    if ERR == 0:
                        r_hat = _unrotate(rc_b, rnorm16, hkb, D, KB_W, SPLIT)
                        if KA_N > 0:
                            r_hat += _unrotate(rc_a, rnorm16, hka, D, KA_W, SPLIT)
                        rerr = tl.sum(w * (k - r_hat) * (k - r_hat), axis=1)
                    else:
                        # The residuals in rotated, unit coordinates: k - k^ = key_scale * n * U(y - g c)
                        # (g = norm16 / n) for the calibrated coding, k - k^ = rn * U(ry - rg rc) raw.
                        g = (norm16 * inv_n)[:, None]
                        rg = (rnorm16 * inv_rn)[:, None]
                        e = _unrotate_unit(y_b - g * c_b, hkb, D, KB_W, SPLIT, SYM)
                        re = _unrotate_unit(ry_b - rg * rc_b, hkb, D, KB_W, SPLIT, SYM)
                        if KA_N > 0:
                            e += _unrotate_unit(y_a - g * c_a, hka, D, KA_W, SPLIT, SYM)
                            re += _unrotate_unit(ry_a - rg * rc_a, hka, D, KA_W, SPLIT, SYM)
                        w = tl.load(key_weight_ptr + head * D + d)
                        s = tl.load(key_scale_ptr + head * D + d)
                        err = tl.sum((w * s * s)[None, :] * e * e, axis=1) * (n * n)
                        rerr = tl.sum(w[None, :] * re * re, axis=1) * (rn * rn)
                    raw = rerr < err
                    pk_b = tl.where(raw[:, None], rpk_b, pk_b)
                    if KA_N > 0:
                        pk_a = tl.where(raw[:, None], rpk_a, pk_a)
                    norm = tl.where(raw, -tl.abs(rnorm16), tl.abs(norm16))
            _store_stream(slot_ptrs, row_mask, pk_b, KB_OFF, KB_BITS, KB_N, KB_U, KB_K, KB_NU, ALIGN,
                          WIDE)
            if KA_N > 0:
                _store_stream(slot_ptrs, row_mask, pk_a, KA_OFF, KA_BITS, KA_N, KA_U, KA_K, KA_NU,
                              ALIGN, WIDE)
            _store_norm16(slot_ptrs, row_mask, norm, K_NORM_OFF, ALIGN, WIDE)

            vb = tl.load(value_ptr + t64[:, None] * stride_vt + head * stride_vh + d[None, :],
                         mask=row_mask[:, None], other=0.0)
            v = vb.to(tl.float32)
            if VMEAN:
                v = tl.where(row_mask[:, None], v - tl.load(value_mean_ptr + head * D + d)[None, :],
                             0.0)
            n = tl.sqrt_rn(tl.sum(v * v, axis=1))
            inv_n = tl.div_rn(1.0, tl.maximum(n, 1e-30))
            if SYM and (V_INPUT == 0):
                v = v * sg[None, :]
            code_b, c_b, yc, cc, y_b = _stream(v, vb, inv_n, hvb, hvbx,
                                          rot_vm_ptr + (head * 2 + 1) * D, codebooks_ptr + 3 * 512, D,
                                          VB_BITS, VB_N, VB_W, SPLIT, V_INPUT, CODES, VB_CB)
            _store_stream(slot_ptrs, row_mask, _pack(code_b, VB_BITS, VB_N, VB_W, WIDE), VB_OFF,
                          VB_BITS, VB_N, VB_U, VB_K, VB_NU, ALIGN, WIDE)
            if VA_N > 0:
                hva, hvax = _mats(vfa32, vfa16, vfax, D, VA_W, SPLIT)
                code_a, c_a, yc_a, cc_a, y_a = _stream(v, vb, inv_n, hva, hvax,
                                                  rot_vm_ptr + head * 2 * D, codebooks_ptr + 2 * 512,
                                                  D, VA_BITS, VA_N, VA_W, SPLIT, V_INPUT, CODES,
                                                  NO_CB)
                _store_stream(slot_ptrs, row_mask, _pack(code_a, VA_BITS, VA_N, VA_W, WIDE), VA_OFF,
                              VA_BITS, VA_N, VA_U, VA_K, VA_NU, ALIGN, WIDE)
                yc += yc_a
                cc += cc_a
            _store_norm16(slot_ptrs, row_mask, _norm_of(n, yc, cc, V_NORM_RULE), V_NORM_OFF, ALIGN,
                          WIDE)


def _store_constants(tables, split: int, dtype: torch.dtype) -> dict:
    """Signed rotation blocks in the dtypes the store's dots take, the value mean's rotation and
    which calibration steps are on; built once per tables and split mode."""
    cache = tables.__dict__.setdefault("_tq_store_constants", {})
    if (split, dtype) in cache:
        return cache[split, dtype]
    signs = tables.signs.double()
    d = signs.numel()
    dev = tables.signs.device
    c = {}
    for name in ("ka", "kb", "va", "vb"):
        cols = tables.h_cols[name].double() * signs[:, None]  # diag(signs) H[:, stream]
        c[name + "_f32"] = cols.float().contiguous()
        c[name + "_f16"] = cols.half().contiguous()
        c[name + "_x"] = cols.to(dtype).contiguous()
        if name[0] == "k":
            c[name + "_i32"] = cols.t().float().contiguous()
            c[name + "_i16"] = cols.t().half().contiguous()
    heads = tables.value_mean.shape[0]
    vm = tables.value_mean.double()
    # [heads, 2 (streams A, B), D]: rotate(value_mean) per stream, padded like the tiles
    rot_vm = torch.zeros(heads, 2, d, dtype=torch.float64, device=dev)
    for s, name in enumerate(("va", "vb")):
        r = vm @ (tables.h_cols[name].double() * signs[:, None])
        rot_vm[:, s, : r.shape[1]] = r
    c["rot_vm"] = rot_vm.float().contiguous()
    kcal = bool(tables.has_mean or (tables.key_mean != 0).any() or (tables.key_scale != 1).any())
    c["kcal"] = kcal
    c["vmean"] = bool((tables.value_mean != 0).any())
    c["same_rot"] = bool(torch.equal(c["kb_x"], c["vb_x"])
                         and torch.equal(c["kb_f16"], c["vb_f16"]))
    # One full-width stream per vector (tq4, tq3): H itself (symmetric, +-1) rotates the signed
    # inputs and unrotates the residuals (tq_store's sym).
    lay = tables.layout
    c["sym_ok"] = (lay.key.a.n == 0 and lay.value.a.n == 0 and lay.key.b.n == d
                   and lay.value.b.n == d and lay.key.b.width == d and lay.value.b.width == d)
    h = tables.h_cols["kb"].double()
    c["h_f32"] = h.float().contiguous()
    c["h_f16"] = h.half().contiguous()
    hc = h[: d // 4, : d // 4]  # H_C, C = d / 4 (tq_store's chunks)
    c["hc_f32"] = hc.float().contiguous()
    c["hc_f16"] = hc.half().contiguous()

    # Stream B's codebooks as constants (tq_store's imm_codebooks): the positive levels, then the
    # positive thresholds, as Python floats (exactly the float32 table values), from the host.
    for name, st, i in (("kb", lay.key.b, 1), ("vb", lay.value.b, 3)):
        lv, th = tables.codebooks[i].cpu()  # LayerTables.codebooks: KA, KB, VA, VB
        half = 1 << (st.bits - 1)
        c["cb_" + name] = tuple(float(v) for v in lv[half: 2 * half]) + tuple(
            float(v) for v in th[half: 2 * half - 1])
    cache[split, dtype] = c
    return c


def _alignment(kv_cache: torch.Tensor) -> int:
    """4, 2 or 1: the widest store every slot's start is aligned to (pointer and strides)."""
    g = kv_cache.data_ptr()
    for st in kv_cache.stride()[:3]:
        g |= st
    return 4 if g % 4 == 0 else 2 if g % 2 == 0 else 1


def _heads_per_program(h: int, has_mean: bool) -> int:
    """With a key mean all heads of a token tile share one program (its cos/sin once)."""
    return h if has_mean else 1


def tq_store(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor, tables, block_t: int | None = None,
             split: int | None = None, num_warps: int | None = None,
             positions: torch.Tensor | None = None, heads_per_program: int | None = None,
             maxnreg: int | None = None, codes: int = 0,
             wide_stores: bool | None = None, err: int = 1, sym: bool | None = None,
             imm_codebooks: bool | None = None, via_memory: bool | None = None,
             chunks: bool | None = None) -> None:
    """Quantize key/value [T, H_kv, D] into kv_cache (uint8 [blocks, page, H_kv, slot] strides,
    i.e. vLLM's [B, N, H, C] order or any view with those logical axes) at slot_mapping [T].
    tables: the layer's vllm_gds.kvcache.tables.LayerTables (read by attribute: kernels/ never
    imports the package). positions [T] (the tokens' positions in their sequences) are needed
    with a key mean.
    split: 0 float32 dots (the CPU interpreter), 1 the GPU's bf16/fp16 dots; by default 0 where
    the tables' dot type is float32. Launch defaults (measured on an H200, benchmarks/RESULTS.md
    "Store kernel, fourth pass", benchmarks/kv_store_sweep.py): with the raw-key fallback 16-token
    tiles, 4 warps, 32-bit stores, and for one full-width stream per vector (tq4, tq3) chunks with
    maxnreg 128 (0.66 ms at 32K tokens, Llama-3-8B shape, against 0.95 before; 0.68 ms without
    chunks at maxnreg 168); else 64-token tiles, 8 warps, byte stores (unchanged).
    codes: the code search (_codes' CODES); wide_stores: 32/16-bit stores of whole code words;
    err: 1 residual weighted errors, 0 the decoded keys'; sym, imm_codebooks, via_memory, chunks:
    the fallback path's variants above (None: on where they apply); heads_per_program, maxnreg
    (0: no limit): for sweeps."""
    T, H, D = key.shape
    if T == 0:
        return
    if tables.has_mean and positions is None:
        raise ValueError("these tables have a pre-RoPE key mean: tq_store needs the positions")
    layout = tables.layout
    if kv_cache.dtype != torch.uint8 or kv_cache.shape[-1] < layout.slot_bytes:
        raise ValueError(f"kv_cache must be uint8 with >= {layout.slot_bytes} bytes per slot")
    if split is None:
        split = 0 if tables.level_tables.dtype == torch.float32 else 1
    split = min(split, 1)
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    exact16 = bool(split) and key.dtype in (torch.bfloat16, torch.float16) and value.dtype == key.dtype
    c = _store_constants(tables, split, key.dtype if exact16 else torch.float16)
    kcal = c["kcal"]
    fallback = tables.fallback and kcal
    if num_warps is None:
        num_warps = 4 if fallback else 8
    if block_t is None:
        block_t = 16 if fallback else 64
    heads = heads_per_program or _heads_per_program(H, tables.has_mean)
    if H % heads:
        raise ValueError(f"heads_per_program {heads} does not divide {H} KV heads")
    if sym is None:
        sym = fallback and err == 1
    sym = bool(sym and c["sym_ok"] and fallback)
    kb = ("h_f32", "h_f16", "kb_x") if sym else ("kb_f32", "kb_f16", "kb_x")
    vb = ("h_f32", "h_f16", "vb_x") if sym else ("vb_f32", "vb_f16", "vb_x")
    if imm_codebooks is None:
        imm_codebooks = fallback
    cbs = dict(KB_CB=c["cb_kb"], VB_CB=c["cb_vb"]) if imm_codebooks and codes == 0 else {}
    if chunks is None:
        chunks = sym
    chunks = bool(chunks and sym)
    if maxnreg is None and chunks:
        maxnreg = 128
    if via_memory is None:
        via_memory = sym
    scr = (torch.empty(T * H * 2, dtype=torch.float32, device=key.device)
           if via_memory and sym and key.device.type == "cuda" else tables.signs)
    extra = {} if not maxnreg or key.device.type != "cuda" else {"maxnreg": maxnreg}
    grid = (triton.cdiv(T, block_t), H // heads)
    _tq_store_kernel[grid](
        key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1),
        kv_cache, kv_cache.stride(0), slot_mapping, T,
        tables.codebooks, tables.key_mean, tables.key_scale, tables.key_inv_scale,
        tables.key_weight, tables.value_mean,
        slot_mapping if positions is None else positions, tables.rope_theta,
        tables.rope_partner, tables.rope_sign,
        c["ka_f32"], c[kb[0]], c["va_f32"], c[vb[0]], c["ka_i32"], c["kb_i32"],
        c["ka_f16"], c[kb[1]], c["va_f16"], c[vb[1]], c["ka_i16"], c["kb_i16"],
        c["ka_x"], c[kb[2]], c["va_x"], c[vb[2]], c["rot_vm"], tables.signs, scr,
        c["hc_f32"], c["hc_f16"],
        PAGE=kv_cache.shape[1], STRIDE_TOK=kv_cache.stride(1), STRIDE_HEAD=kv_cache.stride(2),
        BLOCK_T=block_t, HEADS=heads, SPLIT=split, EXACT16=exact16, KCAL=kcal,
        FALLBACK=fallback, ABS_NORM=tables.fallback and not kcal,
        MEAN=tables.has_mean, VMEAN=c["vmean"], ALIGN=_alignment(kv_cache), num_warps=num_warps,
        num_stages=1, SAME_KV_ROT=c["same_rot"], CODES=codes, SYM=sym,
        SCR=scr is not tables.signs, CHUNK=chunks,
        NEOX=bool(tables.has_mean and 2 * tables.rot_half == D),
        WIDE=fallback if wide_stores is None else wide_stores, ERR=err,
        **tables.constexprs, **cbs, **extra,
    )

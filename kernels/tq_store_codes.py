"""Triton pieces of the store kernel (tq_store_kernel.py) that both of its paths use: the code
search of a symmetric codebook, norms under the format's rules, packing codes into 32-bit words
and storing streams and norms as wide as the slot's alignment allows.

Codes: the codebooks are symmetric (codebook.py), so a code is the sign plus the number of
positive thresholds below |y| (half the compares of a plain count); torch.bucketize's tie rule
(thresholds strictly below y) is kept by comparing |y| of a non-positive y as the next float up.
"""

import triton
import triton.language as tl

from .tq_common import store_norm, store_stream_codes


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
def _codes_bucketed(y, cb_ptr, bk_ptr, HALF: tl.constexpr, BK: tl.constexpr):
    """CODES 3: codes and levels of y with one table lookup for the count m of positive
    thresholds below |y| and one for the level. The float bits of a' (|y|, the next float up
    for a non-positive y: bucketize's tie rule) shifted right by BK[0], less BK[1], clamped to
    [0, BK[2]), index buckets of which none holds more than one threshold (tq_store builds the
    table: _buckets). Entry b: the count of thresholds in buckets below b (high 32 bits) and
    the bits of the threshold in b, or of +inf (low 32 bits). Exact: integer compares of the
    bits of non-negative floats order them as the floats."""
    u = y.to(tl.int32, bitcast=True)
    pos = u > 0  # y > 0 (y is never NaN here)
    ab = (u & 0x7FFFFFFF) + ((u >> 31) & 1)
    b = tl.minimum(tl.maximum((ab >> BK[0]) - BK[1], 0), BK[2] - 1)
    if BK[3]:  # inline PTX: an elementwise op keeps the tile's layout (Triton gives a plain
        # gather load a layout of its own and moves the tile there and back through shared memory)
        e = tl.inline_asm_elementwise("ld.global.nc.b64 $0, [$1];", "=l,l", [bk_ptr + b],
                                      dtype=tl.int64, is_pure=True, pack=1)
    else:
        e = tl.load(bk_ptr + b)
    thr = e.to(tl.int32)
    m = (e >> 32).to(tl.int32) + (ab > thr).to(tl.int32)
    code = m ^ tl.where(pos, HALF, HALF - 1)  # HALF + m above 0, HALF - 1 - m below
    if BK[3]:
        c = tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [cb_ptr + code],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        c = tl.load(cb_ptr + code)
    return code, c


@triton.jit
def _codes(y, cb_ptr, BITS: tl.constexpr, N: tl.constexpr, W: tl.constexpr,
           CODES: tl.constexpr, CB: tl.constexpr, bk_ptr=None):
    """Codes (torch.bucketize, right=False, of a symmetric codebook) and levels of y [rows, W];
    levels are 0 in padding columns. A code is the sign plus the number m of positive thresholds
    below |y|. CODES 0: a compare and two selects per threshold; 1: no predicates: each
    threshold t below |y| is the sign bit s of t - |y| (exact: a float difference is 0 only for
    equal operands), m adds the s and the level's float bits add s * (the step between the bits
    of consecutive positive levels), exact integer arithmetic; 2: m as in 1, the level a lookup.
    CB (CODES 0): the positive levels then the positive thresholds as constants (compiled in as
    immediates: no loads, no registers), else () and the table at cb_ptr. 3: two lookups
    (_codes_bucketed; CB its bucket constants, bk_ptr its table)."""
    HALF: tl.constexpr = 1 << (BITS - 1)
    if CODES == 3:
        code, c = _codes_bucketed(y, cb_ptr, bk_ptr, HALF, CB)
    else:
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
def _raw_rows(errw_ptr, head, rsq, nsq):
    """The raw-key fallback's choice (formats.py, step 5): the rows whose raw key's squared norm
    rsq, weighted by the head's raw error weight, is under the calibrated key's nsq weighted by
    the calibrated one (ties: calibrated)."""
    return tl.load(errw_ptr + head * 2) * rsq < tl.load(errw_ptr + head * 2 + 1) * nsq


@triton.jit
def _fp16_round(x):
    return tl.minimum(tl.maximum(x, -65504.0), 65504.0).to(tl.float16).to(tl.float32)


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

"""CHUNK, the store kernel's served path for formats of one full-width stream per vector (tq4, tq3,
tq5) with the raw-key fallback: one head's keys (each coded once, raw or calibrated as the
fallback's rule picks) and values, each vector in four column chunks.

The rotation of a full-width stream is two Walsh-Hadamard butterfly levels on four column chunks
(float32, elementwise) and one small dot per chunk with H_C (C = D / 4). Sylvester's
H_D[(a, i), (b, j)] = H_4[a, b] H_C[i, j] for chunk indices a, b (the two top bits of a column),
so x H_D = [z_0 H_C, ..., z_3 H_C] with z = the 4-point transform of x's chunks. A quarter of the
tensor-core work of a full dot, a 2 KB matrix instead of 64 KB of columns, and small operands
(fewer registers; launched with maxnreg 128: four 4-warp programs per SM, measured,
benchmarks/RESULTS.md "Store kernel, fourth pass").
"""

import triton
import triton.language as tl

from .tq_store_codes import (_codes, _dot_split, _fp16_round, _load_mat, _norm_of, _pack,
                             _raw_rows, _store_norm16, _store_stream, _via_memory)


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
def _crot16(x0, x1, x2, x3, hs0, hs1, hs2, hs3, SPLIT: tl.constexpr):
    """(x * signs) H_D (entries +-1, unscaled) of 16-bit chunks x (EXACT_ROT: values): the
    dots first, p_a = x_a (diag(s_a) H_C) (16-bit products exact, one pass; float32 under the
    interpreter), then the 4-point transform across chunks (H_D = H_4 (x) H_C: the two commute)."""
    if SPLIT == 0:
        p0 = tl.dot(x0.to(tl.float32), hs0, input_precision="ieee")
        p1 = tl.dot(x1.to(tl.float32), hs1, input_precision="ieee")
        p2 = tl.dot(x2.to(tl.float32), hs2, input_precision="ieee")
        p3 = tl.dot(x3.to(tl.float32), hs3, input_precision="ieee")
    else:
        p0 = tl.dot(x0, hs0)
        p1 = tl.dot(x1, hs1)
        p2 = tl.dot(x2, hs2)
        p3 = tl.dot(x3, hs3)
    return _wht4(p0, p1, p2, p3)


@triton.jit
def _cload(ptrs, row_mask, a: tl.constexpr, C: tl.constexpr):
    """Chunk a [rows, C] (float32) of the rows at ptrs [rows] (16-bit or float32 elements)."""
    return tl.load(ptrs[:, None] + (a * C + tl.arange(0, C))[None, :], mask=row_mask[:, None],
                   other=0.0).to(tl.float32)


@triton.jit
def _cload_raw(ptrs, row_mask, C: tl.constexpr, LOAD: tl.constexpr = True):
    """The four chunks [rows, C] of the rows at ptrs [rows], in the input's dtype (PREFETCH:
    loaded one head ahead, converted where they are used); placeholders where not LOAD."""
    if LOAD:
        c = tl.arange(0, C)[None, :]
        m = row_mask[:, None]
        return (tl.load(ptrs[:, None] + c, mask=m, other=0.0),
                tl.load(ptrs[:, None] + (C + c), mask=m, other=0.0),
                tl.load(ptrs[:, None] + (2 * C + c), mask=m, other=0.0),
                tl.load(ptrs[:, None] + (3 * C + c), mask=m, other=0.0))
    else:
        return 0.0, 0.0, 0.0, 0.0


@triton.jit
def _cload_head(ptrs, r0, r1, r2, r3, row_mask, C: tl.constexpr, PREFETCH: tl.constexpr,
                EXACT_ROT: tl.constexpr):
    """One head's four chunks of keys or values: (raw chunks in the input's dtype, the same as
    float32). PREFETCH: the raw chunks given (r0..r3, loaded one head ahead); EXACT_ROT: loaded
    here raw; else loaded as float32 (the raw chunks then unused)."""
    if PREFETCH:
        x0 = r0.to(tl.float32)
        x1 = r1.to(tl.float32)
        x2 = r2.to(tl.float32)
        x3 = r3.to(tl.float32)
    elif EXACT_ROT:
        r0, r1, r2, r3 = _cload_raw(ptrs, row_mask, C)
        x0 = r0.to(tl.float32)
        x1 = r1.to(tl.float32)
        x2 = r2.to(tl.float32)
        x3 = r3.to(tl.float32)
    else:
        x0 = _cload(ptrs, row_mask, 0, C)
        x1 = _cload(ptrs, row_mask, 1, C)
        x2 = _cload(ptrs, row_mask, 2, C)
        x3 = _cload(ptrs, row_mask, 3, C)
    return r0, r1, r2, r3, x0, x1, x2, x3


@triton.jit
def _chunk_mats(hc32, hc16, hs32, hsx, D: tl.constexpr, SPLIT: tl.constexpr,
                EXACT_ROT: tl.constexpr):
    """H_C in the dtype of the split dots, and with EXACT_ROT diag(s_a) H_C for each chunk a in
    the 16-bit dots' input dtype (float32 under the interpreter); loaded once per program."""
    C: tl.constexpr = D // 4
    if SPLIT == 0:
        hc = _load_mat(hc32, C, C)
    else:
        hc = _load_mat(hc16, C, C)
    if EXACT_ROT:
        hsp = hs32 if SPLIT == 0 else hsx
        return (hc, _load_mat(hsp, C, C), _load_mat(hsp + C * C, C, C),
                _load_mat(hsp + 2 * C * C, C, C), _load_mat(hsp + 3 * C * C, C, C))
    else:
        return hc, 0.0, 0.0, 0.0, 0.0


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
           CB: tl.constexpr, WIDE: tl.constexpr, bk_ptr):
    """Packed codes and levels of one chunk."""
    code, c = _codes(y, cb_ptr, BITS, C, C, CODES, CB, bk_ptr)
    return _pack(code, BITS, C, C, WIDE), c


@triton.jit
def _cstore(slot_ptrs, row_mask, pk, a: tl.constexpr, OFF: tl.constexpr, BITS: tl.constexpr,
            C: tl.constexpr, U: tl.constexpr, K: tl.constexpr, ALIGN: tl.constexpr,
            WIDE: tl.constexpr):
    _store_stream(slot_ptrs, row_mask, pk, OFF + a * (C * BITS // 8), BITS, C, U, K, C // K,
                  ALIGN, WIDE)


@triton.jit
def _ccode_key(x0, x1, x2, x3, n, hc, cb_ptr, BITS: tl.constexpr, C: tl.constexpr,
               CODES: tl.constexpr, CB: tl.constexpr, WIDE: tl.constexpr,
               NORM_RULE: tl.constexpr, SCALE: tl.constexpr, SPLIT: tl.constexpr, bk_ptr):
    """One coding of a key given as four chunks x (signs applied) of norm n: the packed codes
    of the chunks and the norm as stored (float16-rounded)."""
    inv_n = tl.div_rn(1.0, tl.maximum(n, 1e-30))
    y0, y1, y2, y3 = _crot(x0, x1, x2, x3, inv_n, hc, SCALE, SPLIT)
    p0, c0 = _ccode(y0, cb_ptr, BITS, C, CODES, CB, WIDE, bk_ptr)
    p1, c1 = _ccode(y1, cb_ptr, BITS, C, CODES, CB, WIDE, bk_ptr)
    p2, c2 = _ccode(y2, cb_ptr, BITS, C, CODES, CB, WIDE, bk_ptr)
    p3, c3 = _ccode(y3, cb_ptr, BITS, C, CODES, CB, WIDE, bk_ptr)
    cc = tl.sum(c0 * c0 + c1 * c1 + c2 * c2 + c3 * c3, axis=1)
    yc = cc
    if NORM_RULE == 2:
        yc = tl.sum(y0 * c0 + y1 * c1 + y2 * c2 + y3 * c3, axis=1)
    return p0, p1, p2, p3, _fp16_round(_norm_of(n, yc, cc, NORM_RULE))


@triton.jit
def _chunked_head(kptr, vptr, kr0, kr1, kr2, kr3, vr0, vr1, vr2, vr3, slot_ptrs, row_mask, scr,
                  head, hc, hs0, hs1, hs2, hs3, sg_ptr, cos0, cos1, cos2,
                  cos3, sin0, sin1, sin2, sin3, rope_sign_ptr, rope_partner_ptr,
                  key_mean_ptr, key_inv_scale_ptr, key_errw_ptr,
                  value_mean_ptr, codebooks_ptr, bucket_ptr,
                  D: tl.constexpr, SPLIT: tl.constexpr, MEAN: tl.constexpr,
                  VMEAN: tl.constexpr, CODES: tl.constexpr, SCR: tl.constexpr,
                  KB_BITS: tl.constexpr, KB_OFF: tl.constexpr, KB_U: tl.constexpr,
                  KB_K: tl.constexpr, VB_BITS: tl.constexpr, VB_OFF: tl.constexpr,
                  VB_U: tl.constexpr, VB_K: tl.constexpr, K_NORM_OFF: tl.constexpr,
                  V_NORM_OFF: tl.constexpr, K_NORM_RULE: tl.constexpr,
                  V_NORM_RULE: tl.constexpr, ALIGN: tl.constexpr, WIDE: tl.constexpr,
                  KB_CB: tl.constexpr, VB_CB: tl.constexpr, NEOX: tl.constexpr,
                  PREFETCH: tl.constexpr, EXACT_ROT: tl.constexpr, rot_vm_ptr):
    """Keys (raw-key fallback, calibrated) and values of one head, in four column chunks;
    with PREFETCH its keys and values come loaded (kr*, vr*), else from kptr and vptr here.
    The keys, raw or calibrated, by the transform first, then the dots with H_C (on the GPU
    two float16 passes of the float32 chunks). EXACT_ROT (16-bit inputs, or float32 dots): the
    values rotated by _crot16 (a value mean taken off after the rotation: rot_vm_ptr, its
    rotation), else as the keys."""
    C: tl.constexpr = D // 4
    SCALE: tl.constexpr = 1.0 / (D ** 0.5)
    kcb = codebooks_ptr + 512
    kr0, kr1, kr2, kr3, k0, k1, k2, k3 = _cload_head(kptr, kr0, kr1, kr2, kr3, row_mask, C,
                                                     PREFETCH, EXACT_ROT)
    sg0 = _cvec(sg_ptr, 0, C)[None, :]
    sg1 = _cvec(sg_ptr, 1, C)[None, :]
    sg2 = _cvec(sg_ptr, 2, C)[None, :]
    sg3 = _cvec(sg_ptr, 3, C)[None, :]
    hd = head * D

    # the key's one coding (formats.py, step 5): raw where its weighted squared norm is the
    # smaller, else calibrated; either input by the transform first, then the dots with H_C
    rsq = tl.sum(k0 * k0 + k1 * k1 + k2 * k2 + k3 * k3, axis=1)
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
    nsq = tl.sum(x0 * x0 + x1 * x1 + x2 * x2 + x3 * x3, axis=1)
    raw = _raw_rows(key_errw_ptr, head, rsq, nsq)
    rw = raw[:, None]
    x0 = tl.where(rw, k0 * sg0, x0)
    x1 = tl.where(rw, k1 * sg1, x1)
    x2 = tl.where(rw, k2 * sg2, x2)
    x3 = tl.where(rw, k3 * sg3, x3)
    n = _via_memory(tl.sqrt_rn(tl.where(raw, rsq, nsq)), scr, row_mask, SCR)
    p0, p1, p2, p3, norm16 = _ccode_key(
        x0, x1, x2, x3, n, hc, kcb, KB_BITS, C, CODES, KB_CB, WIDE, K_NORM_RULE, SCALE, SPLIT,
        bucket_ptr)
    _cstore(slot_ptrs, row_mask, p0, 0, KB_OFF, KB_BITS, C, KB_U, KB_K, ALIGN, WIDE)
    _cstore(slot_ptrs, row_mask, p1, 1, KB_OFF, KB_BITS, C, KB_U, KB_K, ALIGN, WIDE)
    _cstore(slot_ptrs, row_mask, p2, 2, KB_OFF, KB_BITS, C, KB_U, KB_K, ALIGN, WIDE)
    _cstore(slot_ptrs, row_mask, p3, 3, KB_OFF, KB_BITS, C, KB_U, KB_K, ALIGN, WIDE)
    _store_norm16(slot_ptrs, row_mask, tl.where(raw, -tl.abs(norm16), tl.abs(norm16)),
                  K_NORM_OFF, ALIGN, WIDE)

    # values
    vr0, vr1, vr2, vr3, v0, v1, v2, v3 = _cload_head(vptr, vr0, vr1, vr2, vr3, row_mask, C,
                                                     PREFETCH, EXACT_ROT)
    if VMEAN:
        v0 = tl.where(m, v0 - _cvec(value_mean_ptr + hd, 0, C)[None, :], 0.0)
        v1 = tl.where(m, v1 - _cvec(value_mean_ptr + hd, 1, C)[None, :], 0.0)
        v2 = tl.where(m, v2 - _cvec(value_mean_ptr + hd, 2, C)[None, :], 0.0)
        v3 = tl.where(m, v3 - _cvec(value_mean_ptr + hd, 3, C)[None, :], 0.0)
    vn = tl.sqrt_rn(tl.sum(v0 * v0 + v1 * v1 + v2 * v2 + v3 * v3, axis=1))
    vcb = codebooks_ptr + 3 * 512
    inv_vn = tl.div_rn(1.0, tl.maximum(vn, 1e-30))
    if EXACT_ROT:
        y0, y1, y2, y3 = _crot16(vr0, vr1, vr2, vr3, hs0, hs1, hs2, hs3, SPLIT)
        if VMEAN:  # rotate(v - mean) = rotate(v) - rotate(mean)
            y0 -= _cvec(rot_vm_ptr, 0, C)[None, :]
            y1 -= _cvec(rot_vm_ptr, 1, C)[None, :]
            y2 -= _cvec(rot_vm_ptr, 2, C)[None, :]
            y3 -= _cvec(rot_vm_ptr, 3, C)[None, :]
        s = (inv_vn * SCALE)[:, None]
        y0 = y0 * s
        y1 = y1 * s
        y2 = y2 * s
        y3 = y3 * s
    else:
        y0, y1, y2, y3 = _crot(v0 * sg0, v1 * sg1, v2 * sg2, v3 * sg3, inv_vn, hc, SCALE, SPLIT)
    p0, c0 = _ccode(y0, vcb, VB_BITS, C, CODES, VB_CB, WIDE, bucket_ptr + 256)
    _cstore(slot_ptrs, row_mask, p0, 0, VB_OFF, VB_BITS, C, VB_U, VB_K, ALIGN, WIDE)
    p1, c1 = _ccode(y1, vcb, VB_BITS, C, CODES, VB_CB, WIDE, bucket_ptr + 256)
    _cstore(slot_ptrs, row_mask, p1, 1, VB_OFF, VB_BITS, C, VB_U, VB_K, ALIGN, WIDE)
    p2, c2 = _ccode(y2, vcb, VB_BITS, C, CODES, VB_CB, WIDE, bucket_ptr + 256)
    _cstore(slot_ptrs, row_mask, p2, 2, VB_OFF, VB_BITS, C, VB_U, VB_K, ALIGN, WIDE)
    p3, c3 = _ccode(y3, vcb, VB_BITS, C, CODES, VB_CB, WIDE, bucket_ptr + 256)
    _cstore(slot_ptrs, row_mask, p3, 3, VB_OFF, VB_BITS, C, VB_U, VB_K, ALIGN, WIDE)
    vcc = tl.sum(c0 * c0 + c1 * c1 + c2 * c2 + c3 * c3, axis=1)
    vyc = vcc
    if V_NORM_RULE == 2:
        vyc = tl.sum(y0 * c0 + y1 * c1 + y2 * c2 + y3 * c3, axis=1)
    _store_norm16(slot_ptrs, row_mask, _norm_of(vn, vyc, vcc, V_NORM_RULE), V_NORM_OFF, ALIGN,
                  WIDE)

"""Fused calibrate-rotate-quantize-store of new keys and values into the paged quantized cache.

Why this file keeps code no served launch runs: besides the two served paths (CHUNK, in
tq_store_chunked.py, for one full-width stream per vector with the raw-key fallback; the general
path here for uncalibrated caches and formats with extra-bit streams) it holds the store sweep's
variants (benchmarks/dev/kv_store_sweep.py, StoreTuning): the full-width path without chunks
(SYM) and the predicate-free code searches (CODES 1, 2). tests/test_kv_kernels.py checks each
against the reference bytes.

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
|x| <= 256 and split into two float16 parts (22 significant bits) for two dots. Under the CPU
interpreter (SPLIT=0) every dot is float32.

The rotation columns are loaded once per program (the head loop reuses them from shared memory).
With the raw-key fallback both codings of a key are packed, the fallback's choice taken per row in
registers and stored once, as 32-bit words where the slot is 4-byte aligned (16-bit where a
stream starts 2 bytes off, e.g. the value codes after the key norm) and the norms as 16-bit
stores.

The raw-key fallback (formats.py, step 5) picks a key's coding from the two inputs' weighted
squared norms (e_raw |k|^2 < e_cal |x|^2; e_raw, e_cal: the head's key_err_weights): CHUNK codes
the picked input once, the other paths code both and store the pick. Where a vector is one
full-width stream (tq4, tq3, tq5: SYM) the float32 rotations use H itself (the signs go on the
input), the code search compiles the stream's codebook in as immediates, and the key norms reach
the MMA layout through a small scratch store/load (SCR) so that Triton does not recompute the
calibrated key in a second layout. CHUNK (the default there) splits each rotation into butterflies and [C, C] dots
(tq_store_chunked.py).
"""

import triton
import triton.language as tl

from .tq_common import cache_slot_ptrs, rope_cos_sin
from .tq_store_chunked import _chunk_mats, _chunked_head, _cload_raw, _cvec
from .tq_store_codes import (_codes, _dot_split, _fp16_round, _load_mat, _norm_of, _pack,
                             _raw_rows, _store_norm16, _store_stream, _via_memory)


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
    """Codes, sum y*c and sum c*c (c: the levels) of one stream of x [rows, D] (unit-scaled by
    inv_n).
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
    return code, tl.sum(y * c, axis=1), tl.sum(c * c, axis=1)


@triton.jit
def _code_key_sym(x, xb, n, hf, hx, rot_mean_ptr, cb_ptr, D: tl.constexpr, BITS: tl.constexpr,
                  N: tl.constexpr, W: tl.constexpr, SPLIT: tl.constexpr, INPUT: tl.constexpr,
                  CODES: tl.constexpr, CB: tl.constexpr, WIDE: tl.constexpr,
                  NORM_RULE: tl.constexpr):
    """One coding of a full-width key stream (SYM) of x [rows, D] (signs applied) of norm n: the
    packed codes and the norm as stored (float16-rounded)."""
    inv_n = tl.div_rn(1.0, tl.maximum(n, 1e-30))
    code, yc, cc = _stream(x, xb, inv_n, hf, hx, rot_mean_ptr, cb_ptr, D, BITS, N, W, SPLIT,
                                 INPUT, CODES, CB)
    # packed before the norm: the other order compiled to 4801 loop instructions, not 3692 (sm_90)
    packed = _pack(code, BITS, N, W, WIDE)
    return packed, _fp16_round(_norm_of(n, yc, cc, NORM_RULE))


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
def _tq_store_kernel(
    key_ptr, stride_kt, stride_kh, value_ptr, stride_vt, stride_vh,
    cache_ptr, stride_blk, slot_mapping_ptr, num_tokens,
    codebooks_ptr, key_mean_ptr, key_inv_scale_ptr, key_errw_ptr,
    value_mean_ptr, positions_ptr, rope_theta_ptr, rope_partner_ptr, rope_sign_ptr,
    kfa32, kfb32, vfa32, vfb32, kfa16, kfb16, vfa16, vfb16,
    kfax, kfbx, vfax, vfbx, rot_vm_ptr, signs_ptr, scratch_ptr, hc32, hc16, bucket_ptr, hs32,
    hsx,
    # the cache: page size and strides in bytes
    PAGE: tl.constexpr, STRIDE_TOK: tl.constexpr, STRIDE_HEAD: tl.constexpr,
    # the launch (tq_store's plan) and the tables: tokens and heads per program, float32 or
    # split 16-bit dots, exact 16-bit inputs, calibrated keys, the raw-key fallback, the means
    BLOCK_T: tl.constexpr, HEADS: tl.constexpr, SPLIT: tl.constexpr, EXACT16: tl.constexpr,
    KCAL: tl.constexpr, FALLBACK: tl.constexpr, ABS_NORM: tl.constexpr, MEAN: tl.constexpr,
    VMEAN: tl.constexpr, D: tl.constexpr, SLOT: tl.constexpr,
    # the slot's code streams, each a tq_streams.Stream (tq_streams.stream_constexprs): the
    # key's A (extra-bit coordinates; n == 0: none) and B, the value's A and B; the norms
    KA: tl.constexpr, KB: tl.constexpr, VA: tl.constexpr, VB: tl.constexpr,
    K_NORM_OFF: tl.constexpr, V_NORM_OFF: tl.constexpr,
    K_NORM_RULE: tl.constexpr, V_NORM_RULE: tl.constexpr, ALIGN: tl.constexpr = 1,
    # the code paths: tq_store._Launch picks the served ones, StoreTuning the others (the
    # store sweep's); the stream B codebooks as immediates (KB_CB, VB_CB) where served
    SAME_KV_ROT: tl.constexpr = False, CODES: tl.constexpr = 0, WIDE: tl.constexpr = True,
    SYM: tl.constexpr = False,
    KB_CB: tl.constexpr = (), VB_CB: tl.constexpr = (), NO_CB: tl.constexpr = (),
    SCR: tl.constexpr = False,
    CHUNK: tl.constexpr = False, NEOX: tl.constexpr = False, PREFETCH: tl.constexpr = False,
    EXACT_ROT: tl.constexpr = False,
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
        hc, hs0, hs1, hs2, hs3 = _chunk_mats(hc32, hc16, hs32, hsx, D, SPLIT, EXACT_ROT)

    # How the GPU rotates (_stream's INPUT): 16-bit inputs exactly where no calibration changed them
    K_INPUT: tl.constexpr = 0 if (KCAL or not EXACT16) else 1
    R_INPUT: tl.constexpr = 1 if EXACT16 else 0
    V_INPUT: tl.constexpr = (2 if VMEAN else 1) if EXACT16 else 0
    if SYM:  # one full stream per vector: the columns are H itself, the signs go on the input
        sg = tl.load(signs_ptr + d)
    if not CHUNK:
        hkb, hkbx = _mats(kfb32, kfb16, kfbx, D, KB.w, SPLIT)
        if SAME_KV_ROT:  # the value stream's columns are the key stream's (same extra coordinates)
            hvbx = hkbx
            hvb = hkb
        else:
            hvb, hvbx = _mats(vfb32, vfb16, vfbx, D, VB.w, SPLIT)
    # PREFETCH (CHUNK): the next head's keys and values are loaded while this head is coded
    head0 = tl.program_id(1) * HEADS
    kp = key_ptr + t64 * stride_kt
    vp = value_ptr + t64 * stride_vt
    kr0, kr1, kr2, kr3 = _cload_raw(kp + head0 * stride_kh, row_mask, D // 4, PREFETCH)
    vr0, vr1, vr2, vr3 = _cload_raw(vp + head0 * stride_vh, row_mask, D // 4, PREFETCH)
    for i in range(HEADS):
        head = head0 + i
        slot_ptrs = cache_slot_ptrs(cache_ptr, slot // PAGE, slot % PAGE, head, stride_blk,
                                    STRIDE_TOK, STRIDE_HEAD)
        if CHUNK:
            if PREFETCH:  # the last head loads itself again (cached), never past the tensor
                nxt = head + 1 - (i + 1) // HEADS
                kn0, kn1, kn2, kn3 = _cload_raw(kp + nxt * stride_kh, row_mask, D // 4)
                vn0, vn1, vn2, vn3 = _cload_raw(vp + nxt * stride_vh, row_mask, D // 4)
            _chunked_head(kp + head * stride_kh, vp + head * stride_vh,
                          kr0, kr1, kr2, kr3, vr0, vr1, vr2, vr3, slot_ptrs, row_mask,
                          scratch_ptr + (t64 * (tl.num_programs(1) * HEADS) + head) * 2, head,
                          hc, hs0, hs1, hs2, hs3, signs_ptr, cos0, cos1, cos2, cos3, sin0, sin1, sin2, sin3,
                          rope_sign_ptr, rope_partner_ptr, key_mean_ptr, key_inv_scale_ptr,
                          key_errw_ptr, value_mean_ptr, codebooks_ptr, bucket_ptr,
                          D, SPLIT, MEAN, VMEAN, CODES, SCR, KB.bits, KB.off, KB.u, KB.k,
                          VB.bits, VB.off, VB.u, VB.k, K_NORM_OFF, V_NORM_OFF, K_NORM_RULE,
                          V_NORM_RULE, ALIGN, WIDE, KB_CB, VB_CB, NEOX, PREFETCH, EXACT_ROT,
                          rot_vm_ptr + (head * 2 + 1) * D)
            if PREFETCH:
                kr0 = kn0
                kr1 = kn1
                kr2 = kn2
                kr3 = kn3
                vr0 = vn0
                vr1 = vn1
                vr2 = vn2
                vr3 = vn3
        else:
            kb = tl.load(key_ptr + t64[:, None] * stride_kt + head * stride_kh + d[None, :],
                         mask=row_mask[:, None], other=0.0)
            k = kb.to(tl.float32)
            kbs = kb  # 16-bit inputs rotate with the signed columns (hkbx) in either mode
            ks = k
            if SYM:  # float32 inputs rotate with H: their signs first (exact)
                ks = k * sg[None, :]
            if SYM:
                # Both codings; the fallback's rule (formats.py, step 5) picks one per row
                # (ties: calibrated), a raw key stores -norm.
                scr = scratch_ptr + (t64 * (tl.num_programs(1) * HEADS) + head) * 2
                rsq = tl.sum(k * k, axis=1)
                rn = _via_memory(tl.sqrt_rn(rsq), scr, in_range, SCR)
                rpk, rnorm16 = _code_key_sym(ks, kbs, rn, hkb, hkbx, rot_vm_ptr,
                                                 codebooks_ptr + 512, D, KB.bits, KB.n, KB.w,
                                                 SPLIT, R_INPUT, CODES, KB_CB, WIDE, K_NORM_RULE)

                k_mean = _key_mean_at(key_mean_ptr + head * D, d, partner, rope_sign, cos, sin,
                                      MEAN)
                k_inv_scale = tl.load(key_inv_scale_ptr + head * D + d) * sg
                x = tl.where(row_mask[:, None], (k - k_mean) * k_inv_scale[None, :], 0.0)
                nsq = tl.sum(x * x, axis=1)
                n = _via_memory(tl.sqrt_rn(nsq), scr + 1, in_range, SCR)
                pk_b, norm16 = _code_key_sym(x, kbs, n, hkb, hkbx, rot_vm_ptr,
                                                codebooks_ptr + 512, D, KB.bits, KB.n, KB.w,
                                                SPLIT, K_INPUT, CODES, KB_CB, WIDE, K_NORM_RULE)
                raw = _raw_rows(key_errw_ptr, head, rsq, nsq)
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
                nsq = tl.sum(x * x, axis=1)
                n = tl.sqrt_rn(nsq)
                inv_n = tl.div_rn(1.0, tl.maximum(n, 1e-30))
                code_b, yc, cc = _stream(x, kbs, inv_n, hkb, hkbx, rot_vm_ptr,
                                              codebooks_ptr + 512, D, KB.bits, KB.n, KB.w, SPLIT, K_INPUT,
                                              CODES, KB_CB)
                pk_b = _pack(code_b, KB.bits, KB.n, KB.w, WIDE)
                pk_a = pk_b
                if KA.n > 0:
                    hka, hkax = _mats(kfa32, kfa16, kfax, D, KA.w, SPLIT)
                    code_a, yc_a, cc_a = _stream(x, kbs, inv_n, hka, hkax, rot_vm_ptr,
                                                      codebooks_ptr, D, KA.bits, KA.n, KA.w, SPLIT,
                                                      K_INPUT, CODES, NO_CB)
                    pk_a = _pack(code_a, KA.bits, KA.n, KA.w, WIDE)
                    yc += yc_a
                    cc += cc_a
                norm = _norm_of(n, yc, cc, K_NORM_RULE)
                if ABS_NORM:
                    norm = tl.abs(norm)
                if FALLBACK:
                    # Code the raw key too and keep, per row, the coding the fallback's rule
                    # picks (formats.py, step 5; ties: calibrated); the sign of the stored norm
                    # flags a raw key.
                    norm16 = _fp16_round(norm)
                    rsq = tl.sum(k * k, axis=1)
                    rn = tl.sqrt_rn(rsq)
                    inv_rn = tl.div_rn(1.0, tl.maximum(rn, 1e-30))
                    rcode_b, ryc, rcc = _stream(ks, kbs, inv_rn, hkb, hkbx, rot_vm_ptr,
                                                            codebooks_ptr + 512, D, KB.bits, KB.n, KB.w,
                                                            SPLIT, R_INPUT, CODES, KB_CB)
                    rpk_b = _pack(rcode_b, KB.bits, KB.n, KB.w, WIDE)
                    rpk_a = rpk_b
                    if KA.n > 0:
                        rcode_a, ryc_a, rcc_a = _stream(ks, kbs, inv_rn, hka, hkax,
                                                                    rot_vm_ptr, codebooks_ptr, D, KA.bits,
                                                                    KA.n, KA.w, SPLIT, R_INPUT, CODES,
                                                                    NO_CB)
                        rpk_a = _pack(rcode_a, KA.bits, KA.n, KA.w, WIDE)
                        ryc += ryc_a
                        rcc += rcc_a
                    rnorm16 = _fp16_round(_norm_of(rn, ryc, rcc, K_NORM_RULE))
                    raw = _raw_rows(key_errw_ptr, head, rsq, nsq)
                    pk_b = tl.where(raw[:, None], rpk_b, pk_b)
                    if KA.n > 0:
                        pk_a = tl.where(raw[:, None], rpk_a, pk_a)
                    norm = tl.where(raw, -tl.abs(rnorm16), tl.abs(norm16))
            _store_stream(slot_ptrs, row_mask, pk_b, KB.off, KB.bits, KB.n, KB.u, KB.k, KB.nu, ALIGN,
                          WIDE)
            if KA.n > 0:
                _store_stream(slot_ptrs, row_mask, pk_a, KA.off, KA.bits, KA.n, KA.u, KA.k, KA.nu,
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
            code_b, yc, cc = _stream(v, vb, inv_n, hvb, hvbx,
                                          rot_vm_ptr + (head * 2 + 1) * D, codebooks_ptr + 3 * 512, D,
                                          VB.bits, VB.n, VB.w, SPLIT, V_INPUT, CODES, VB_CB)
            _store_stream(slot_ptrs, row_mask, _pack(code_b, VB.bits, VB.n, VB.w, WIDE), VB.off,
                          VB.bits, VB.n, VB.u, VB.k, VB.nu, ALIGN, WIDE)
            if VA.n > 0:
                hva, hvax = _mats(vfa32, vfa16, vfax, D, VA.w, SPLIT)
                code_a, yc_a, cc_a = _stream(v, vb, inv_n, hva, hvax,
                                                  rot_vm_ptr + head * 2 * D, codebooks_ptr + 2 * 512,
                                                  D, VA.bits, VA.n, VA.w, SPLIT, V_INPUT, CODES,
                                                  NO_CB)
                _store_stream(slot_ptrs, row_mask, _pack(code_a, VA.bits, VA.n, VA.w, WIDE), VA.off,
                              VA.bits, VA.n, VA.u, VA.k, VA.nu, ALIGN, WIDE)
                yc += yc_a
                cc += cc_a
            _store_norm16(slot_ptrs, row_mask, _norm_of(n, yc, cc, V_NORM_RULE), V_NORM_OFF, ALIGN,
                          WIDE)

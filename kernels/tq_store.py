"""Fused calibrate-rotate-quantize-store of new keys and values into the paged quantized cache.

One program codes BLOCK_T tokens of one KV head, keys and values, and writes their slots through
vLLM's slot mapping (negative slots, vLLM's padding, are skipped). Per vector, as formats.py
specifies: calibrate (keys: subtract the mean, multiply by the inverse scale; values: subtract the
mean), take the norm, rotate with the signed Hadamard matrix (tl.dot; on the GPU the fp32 input is
split into three bf16 parts so that the rotation keeps fp32 accuracy on the tensor cores), count
the thresholds below each coordinate, pack, and store the norm under the format's rule.
"""

import torch
import triton
import triton.language as tl

from .tq_common import cache_slot_ptrs, rope_cos_sin, store_norm, store_stream_codes
from .tq_params import LayerTables, layout_kwargs


@triton.jit
def _dot_f32(x, h, SPLIT: tl.constexpr):
    """x (float32) @ h (entries +-1, or float32 when SPLIT == 0) in float32 accuracy."""
    if SPLIT == 0:
        return tl.dot(x, h, input_precision="ieee")
    else:
        # x = hi + mid + lo exactly (3 x 8 significant bits); h is exact in bf16.
        hi = x.to(tl.bfloat16)
        r = x - hi.to(tl.float32)
        mid = r.to(tl.bfloat16)
        lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(lo, h)
        acc = tl.dot(mid, h, acc)
        return tl.dot(hi, h, acc)


@triton.jit
def _h_cols(h_ptr, D: tl.constexpr, W: tl.constexpr):
    return tl.load(h_ptr + tl.arange(0, D)[:, None] * W + tl.arange(0, W)[None, :])


@triton.jit
def _h_rows(h_ptr, D: tl.constexpr, W: tl.constexpr):
    return tl.load(h_ptr + tl.arange(0, W)[:, None] * D + tl.arange(0, D)[None, :])


@triton.jit
def _codes(y, thresholds_ptr, BITS: tl.constexpr):
    """Number of thresholds strictly below each coordinate (torch.bucketize, right=False)."""
    code = tl.zeros(y.shape, dtype=tl.int32)
    for j in tl.static_range((1 << BITS) - 1):
        t = tl.load(thresholds_ptr + j)
        code += (y > t).to(tl.int32)
    return code


@triton.jit
def _quantize_stream(xs, inv_n, h_ptr, codebook_ptr, D: tl.constexpr, BITS: tl.constexpr,
                     N: tl.constexpr, W: tl.constexpr, SPLIT: tl.constexpr):
    """Rotated unit coordinates of one stream -> (codes, levels, sum y*c, sum c*c) per row."""
    SCALE: tl.constexpr = 1.0 / (D ** 0.5)
    y = _dot_f32(xs, _h_cols(h_ptr, D, W), SPLIT) * SCALE * inv_n[:, None]
    code = _codes(y, codebook_ptr + 256, BITS)
    c = tl.load(codebook_ptr + code)
    if N < W:
        c = tl.where(tl.arange(0, W)[None, :] < N, c, 0.0)
    return code, c, tl.sum(y * c, axis=1), tl.sum(c * c, axis=1)


@triton.jit
def _quantize(x, signs, ha_ptr, hb_ptr, codebooks_ptr, CB_A: tl.constexpr, CB_B: tl.constexpr,
              D: tl.constexpr, A_BITS: tl.constexpr, A_N: tl.constexpr, A_W: tl.constexpr,
              B_BITS: tl.constexpr, B_N: tl.constexpr, B_W: tl.constexpr,
              NORM_RULE: tl.constexpr, SPLIT: tl.constexpr):
    """x [rows, D] float32 (calibrated) -> codes and levels of streams A and B, stored norm."""
    n = tl.sqrt_rn(tl.sum(x * x, axis=1))
    inv_n = tl.div_rn(1.0, tl.maximum(n, 1e-30))
    xs = x * signs[None, :]
    code_b, c_b, yc, cc = _quantize_stream(xs, inv_n, hb_ptr, codebooks_ptr + CB_B * 512, D,
                                           B_BITS, B_N, B_W, SPLIT)
    code_a = tl.zeros([x.shape[0], A_W], dtype=tl.int32)
    c_a = tl.zeros([x.shape[0], A_W], dtype=tl.float32)
    if A_N > 0:
        code_a, c_a, yc_a, cc_a = _quantize_stream(xs, inv_n, ha_ptr, codebooks_ptr + CB_A * 512,
                                                   D, A_BITS, A_N, A_W, SPLIT)
        yc += yc_a
        cc += cc_a
    if NORM_RULE == 0:  # plain
        norm = n
    elif NORM_RULE == 1:  # unit
        norm = tl.div_rn(n, tl.maximum(tl.sqrt_rn(cc), 1e-30))
    else:  # ls
        norm = tl.div_rn(n * yc, tl.maximum(cc, 1e-30))
    return code_a, c_a, code_b, c_b, norm


@triton.jit
def _fp16_round(x):
    return tl.minimum(tl.maximum(x, -65504.0), 65504.0).to(tl.float16).to(tl.float32)


@triton.jit
def _dequantize(c_a, c_b, norm16, signs, ha_rows_ptr, hb_rows_ptr, D: tl.constexpr,
                A_N: tl.constexpr, A_W: tl.constexpr, B_W: tl.constexpr, SPLIT: tl.constexpr):
    """unrotate(norm * c) [rows, D], as the reference decodes a stored vector."""
    SCALE: tl.constexpr = 1.0 / (D ** 0.5)
    out = _dot_f32(c_b * norm16[:, None], _h_rows(hb_rows_ptr, D, B_W), SPLIT)
    if A_N > 0:
        out += _dot_f32(c_a * norm16[:, None], _h_rows(ha_rows_ptr, D, A_W), SPLIT)
    return out * (signs * SCALE)[None, :]


@triton.jit
def _store_vector(slot_ptrs, row_mask, code_a, code_b, norm,
                  A_OFF: tl.constexpr, A_BITS: tl.constexpr, A_N: tl.constexpr,
                  A_U: tl.constexpr, A_K: tl.constexpr, A_NU: tl.constexpr,
                  B_OFF: tl.constexpr, B_BITS: tl.constexpr, B_N: tl.constexpr,
                  B_U: tl.constexpr, B_K: tl.constexpr, B_NU: tl.constexpr,
                  NORM_OFF: tl.constexpr):
    store_stream_codes(slot_ptrs, row_mask, code_b, B_OFF, B_BITS, B_N, B_U, B_K, B_NU)
    if A_N > 0:
        store_stream_codes(slot_ptrs, row_mask, code_a, A_OFF, A_BITS, A_N, A_U, A_K, A_NU)
    store_norm(slot_ptrs, row_mask, norm, NORM_OFF)


@triton.jit
def _tq_store_kernel(
    key_ptr, stride_kt, stride_kh, value_ptr, stride_vt, stride_vh,
    cache_ptr, stride_blk, slot_mapping_ptr, num_tokens,
    codebooks_ptr, signs_ptr, key_mean_ptr, key_scale_ptr, key_inv_scale_ptr, key_weight_ptr,
    value_mean_ptr, positions_ptr, rope_theta_ptr, rope_partner_ptr, rope_sign_ptr,
    hka_ptr, hkb_ptr, hva_ptr, hvb_ptr, hka_rows_ptr, hkb_rows_ptr,
    PAGE: tl.constexpr, STRIDE_TOK: tl.constexpr, STRIDE_HEAD: tl.constexpr,
    BLOCK_T: tl.constexpr, SPLIT: tl.constexpr, FALLBACK: tl.constexpr, MEAN: tl.constexpr,
    D: tl.constexpr, SLOT: tl.constexpr,
    KA_BITS: tl.constexpr, KA_N: tl.constexpr, KA_OFF: tl.constexpr, KA_U: tl.constexpr,
    KA_K: tl.constexpr, KA_NU: tl.constexpr, KA_W: tl.constexpr,
    KB_BITS: tl.constexpr, KB_N: tl.constexpr, KB_OFF: tl.constexpr, KB_U: tl.constexpr,
    KB_K: tl.constexpr, KB_NU: tl.constexpr, KB_W: tl.constexpr,
    VA_BITS: tl.constexpr, VA_N: tl.constexpr, VA_OFF: tl.constexpr, VA_U: tl.constexpr,
    VA_K: tl.constexpr, VA_NU: tl.constexpr, VA_W: tl.constexpr,
    VB_BITS: tl.constexpr, VB_N: tl.constexpr, VB_OFF: tl.constexpr, VB_U: tl.constexpr,
    VB_K: tl.constexpr, VB_NU: tl.constexpr, VB_W: tl.constexpr,
    K_NORM_OFF: tl.constexpr, V_NORM_OFF: tl.constexpr,
    K_NORM_RULE: tl.constexpr, V_NORM_RULE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    head = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    in_range = t < num_tokens
    slot = tl.load(slot_mapping_ptr + t, mask=in_range, other=-1).to(tl.int64)
    row_mask = in_range & (slot >= 0)
    slot = tl.maximum(slot, 0)
    slot_ptrs = cache_slot_ptrs(cache_ptr, slot // PAGE, slot % PAGE, head, stride_blk,
                                STRIDE_TOK, STRIDE_HEAD)
    signs = tl.load(signs_ptr + d)
    t64 = t.to(tl.int64)

    # Keys: calibrated, and (FALLBACK) raw; keep the candidate with the smaller weighted error.
    k = tl.load(key_ptr + t64[:, None] * stride_kt + head * stride_kh + d[None, :],
                mask=row_mask[:, None], other=0.0).to(tl.float32)
    if MEAN:  # RoPE_p(key_mean) at each token's position p
        pos = tl.load(positions_ptr + t, mask=in_range, other=0)
        mu = tl.load(key_mean_ptr + head * D + d)
        mu_partner = tl.load(key_mean_ptr + head * D + tl.load(rope_partner_ptr + d))
        cos, sin = rope_cos_sin(pos[:, None], tl.load(rope_theta_ptr + d)[None, :])
        k_mean = mu[None, :] * cos + (tl.load(rope_sign_ptr + d) * mu_partner)[None, :] * sin
    else:
        k_mean = tl.load(key_mean_ptr + head * D + d)[None, :]
    k_scale = tl.load(key_scale_ptr + head * D + d)
    k_inv_scale = tl.load(key_inv_scale_ptr + head * D + d)
    x = tl.where(row_mask[:, None], (k - k_mean) * k_inv_scale[None, :], 0.0)
    code_a, c_a, code_b, c_b, norm = _quantize(
        x, signs, hka_ptr, hkb_ptr, codebooks_ptr, 0, 1, D, KA_BITS, KA_N, KA_W,
        KB_BITS, KB_N, KB_W, K_NORM_RULE, SPLIT)
    if FALLBACK:
        rcode_a, rc_a, rcode_b, rc_b, rnorm = _quantize(
            k, signs, hka_ptr, hkb_ptr, codebooks_ptr, 0, 1, D, KA_BITS, KA_N, KA_W,
            KB_BITS, KB_N, KB_W, K_NORM_RULE, SPLIT)
        norm16 = _fp16_round(norm)
        rnorm16 = _fp16_round(rnorm)
        k_hat = _dequantize(c_a, c_b, norm16, signs, hka_rows_ptr, hkb_rows_ptr, D,
                            KA_N, KA_W, KB_W, SPLIT) * k_scale[None, :] + k_mean
        r_hat = _dequantize(rc_a, rc_b, rnorm16, signs, hka_rows_ptr, hkb_rows_ptr, D,
                            KA_N, KA_W, KB_W, SPLIT)
        w = tl.load(key_weight_ptr + head * D + d)[None, :]
        err = tl.sum(w * (k - k_hat) * (k - k_hat), axis=1)
        rerr = tl.sum(w * (k - r_hat) * (k - r_hat), axis=1)
        raw = rerr < err
        code_a = tl.where(raw[:, None], rcode_a, code_a)
        code_b = tl.where(raw[:, None], rcode_b, code_b)
        # The sign of the stored norm flags a raw key.
        norm = tl.where(raw, -tl.abs(rnorm16), tl.abs(norm16))
    _store_vector(slot_ptrs, row_mask, code_a, code_b, norm,
                  KA_OFF, KA_BITS, KA_N, KA_U, KA_K, KA_NU,
                  KB_OFF, KB_BITS, KB_N, KB_U, KB_K, KB_NU, K_NORM_OFF)

    v = tl.load(value_ptr + t64[:, None] * stride_vt + head * stride_vh + d[None, :],
                mask=row_mask[:, None], other=0.0).to(tl.float32)
    v_mean = tl.load(value_mean_ptr + head * D + d)
    v = tl.where(row_mask[:, None], v - v_mean[None, :], 0.0)
    code_a, c_a, code_b, c_b, norm = _quantize(
        v, signs, hva_ptr, hvb_ptr, codebooks_ptr, 2, 3, D, VA_BITS, VA_N, VA_W,
        VB_BITS, VB_N, VB_W, V_NORM_RULE, SPLIT)
    _store_vector(slot_ptrs, row_mask, code_a, code_b, norm,
                  VA_OFF, VA_BITS, VA_N, VA_U, VA_K, VA_NU,
                  VB_OFF, VB_BITS, VB_N, VB_U, VB_K, VB_NU, V_NORM_OFF)


def tq_store(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor, tables: LayerTables, block_t: int = 32,
             split: int | None = None, num_warps: int = 4,
             positions: torch.Tensor | None = None) -> None:
    """Quantize key/value [T, H_kv, D] into kv_cache (uint8 [blocks, page, H_kv, slot] strides,
    i.e. vLLM's [B, N, H, C] order or any view with those logical axes) at slot_mapping [T].
    positions [T] (the tokens' positions in their sequences) are needed with a key mean."""
    T, H, D = key.shape
    if T == 0:
        return
    if tables.has_mean and positions is None:
        raise ValueError("these tables have a pre-RoPE key mean: tq_store needs the positions")
    layout = tables.layout
    if kv_cache.dtype != torch.uint8 or kv_cache.shape[-1] < layout.slot_bytes:
        raise ValueError(f"kv_cache must be uint8 with >= {layout.slot_bytes} bytes per slot")
    if split is None:
        split = 0 if tables.level_tables.dtype == torch.float32 else 3
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    grid = (triton.cdiv(T, block_t), H)
    h = tables.h_cols
    _tq_store_kernel[grid](
        key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1),
        kv_cache, kv_cache.stride(0), slot_mapping, T,
        tables.codebooks, tables.signs, tables.key_mean, tables.key_scale, tables.key_inv_scale,
        tables.key_weight,
        tables.value_mean, slot_mapping if positions is None else positions, tables.rope_theta,
        tables.rope_partner, tables.rope_sign, h["ka"], h["kb"], h["va"], h["vb"],
        tables.h_rows["ka"], tables.h_rows["kb"],
        PAGE=kv_cache.shape[1], STRIDE_TOK=kv_cache.stride(1), STRIDE_HEAD=kv_cache.stride(2),
        BLOCK_T=block_t, SPLIT=split, FALLBACK=tables.fallback, MEAN=tables.has_mean,
        num_warps=num_warps, **layout_kwargs(layout),
    )

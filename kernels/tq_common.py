"""Triton helpers shared by the store and attention kernels: streams of packed codes, fp16 norms.

A stream (vllm_gds/kvcache/slot_layout.Stream) is read and written a unit at a time: U bytes that hold K codes of
BITS bits, little-endian. Tiles hold one row per token and the stream's codes in rotated-coordinate
order, W = K * NU columns (NU units, padded to a power of two; columns >= N are padding).
Everything here runs under the CPU interpreter too: no inline asm, no libdevice, no block pointers.
"""

import triton
import triton.language as tl


@triton.jit
def load_stream_codes(slot_ptrs, row_mask, OFF: tl.constexpr, BITS: tl.constexpr,
                      N: tl.constexpr, U: tl.constexpr, K: tl.constexpr, NU: tl.constexpr):
    """Codes [rows, K * NU] (int32) of one stream of each row's slot (0 in padding columns)."""
    ROWS: tl.constexpr = slot_ptrs.shape[0]
    u = tl.arange(0, NU)
    mask = row_mask[:, None] & (u[None, :] < N // K)
    base = slot_ptrs[:, None] + (OFF + u[None, :] * U)
    if U > 4:
        v = tl.zeros([ROWS, NU], dtype=tl.int64)
    else:
        v = tl.zeros([ROWS, NU], dtype=tl.int32)
    for j in tl.static_range(U):
        byte = tl.load(base + j, mask=mask, other=0)
        v = v | (byte.to(v.dtype) << (8 * j))
    shifts = (tl.arange(0, K) * BITS).to(v.dtype)
    codes = (v[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes.to(tl.int32), [ROWS, K * NU])


@triton.jit
def store_stream_codes(slot_ptrs, row_mask, codes, OFF: tl.constexpr, BITS: tl.constexpr,
                       N: tl.constexpr, U: tl.constexpr, K: tl.constexpr, NU: tl.constexpr):
    """Pack codes [rows, K * NU] (int32, < 2^BITS) into one stream of each row's slot."""
    ROWS: tl.constexpr = slot_ptrs.shape[0]
    if U > 4:
        c3 = tl.reshape(codes, [ROWS, NU, K]).to(tl.int64)
    else:
        c3 = tl.reshape(codes, [ROWS, NU, K])
    shifts = (tl.arange(0, K) * BITS).to(c3.dtype)
    v = tl.sum(c3 << shifts[None, None, :], axis=2)  # the codes' bits do not overlap: sum == or
    u = tl.arange(0, NU)
    mask = row_mask[:, None] & (u[None, :] < N // K)
    base = slot_ptrs[:, None] + (OFF + u[None, :] * U)
    for j in tl.static_range(U):
        tl.store(base + j, ((v >> (8 * j)) & 255).to(tl.uint8), mask=mask)


@triton.jit
def lookup_levels(codes, table_ptr, N: tl.constexpr, W: tl.constexpr):
    """Codebook levels of codes [rows, W] from a 256-entry table; 0 in padding columns."""
    levels = tl.load(table_ptr + codes)
    if N < W:
        col = tl.arange(0, W)
        levels = tl.where(col[None, :] < N, levels, 0.0)
    return levels


@triton.jit
def load_norm(slot_ptrs, row_mask, OFF: tl.constexpr):
    """The float16 norm at byte OFF of each slot (any alignment), as float32."""
    lo = tl.load(slot_ptrs + OFF, mask=row_mask, other=0).to(tl.uint16)
    hi = tl.load(slot_ptrs + (OFF + 1), mask=row_mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def store_norm(slot_ptrs, row_mask, norm, OFF: tl.constexpr):
    """Store float32 norms as float16 (round to nearest even, clamped to the fp16 range)."""
    n16 = tl.minimum(tl.maximum(norm, -65504.0), 65504.0).to(tl.float16)
    bits = n16.to(tl.uint16, bitcast=True)
    tl.store(slot_ptrs + OFF, (bits & 255).to(tl.uint8), mask=row_mask)
    tl.store(slot_ptrs + (OFF + 1), (bits >> 8).to(tl.uint8), mask=row_mask)


@triton.jit
def cache_slot_ptrs(cache_ptr, blocks, offsets, head, stride_blk,
                    STRIDE_TOK: tl.constexpr, STRIDE_HEAD: tl.constexpr):
    """Pointers to the slots of (block, offset-in-block) pairs of one KV head (byte strides)."""
    return cache_ptr + (blocks.to(tl.int64) * stride_blk + offsets * STRIDE_TOK + head * STRIDE_HEAD)


@triton.jit
def rope_cos_sin(p, theta):
    """cos and sin (float32) of the angle p * theta taken in float64 and reduced to [-pi, pi]
    before the float32 cos/sin: accurate at any position (rope.cos_sin(exact=True)). 2 pi is
    split into three float32-exact parts (k * part is exact in float64 for k < 2^24), so the
    reduction does not depend on how the compiler types a float literal."""
    p = p + tl.zeros([1], dtype=tl.int32)  # a plain int too (the interpreter's loop index)
    a = p.to(tl.float64) * theta.to(tl.float64)
    k = tl.floor(a * 0.15915494309189535 + 0.5)
    r = ((a - k * 6.2831854820251465) + k * 1.7484555314695172e-07) + k * 7.105427357601002e-15
    r = r.to(tl.float32)
    return tl.cos(r), tl.sin(r)

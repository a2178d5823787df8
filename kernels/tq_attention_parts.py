"""The pieces of the attention kernel (tq_attention_kernel.py) that are not its main loop: the
query and output transforms by blocks of the Hadamard matrix, page-wise addresses, FOLD's merge of
the two softmax halves, the program-to-sequence search of chunked prefill, and the kernel that
merges the split partials (_tq_reduce_kernel)."""

import triton
import triton.language as tl

from .tq_common import rope_cos_sin


@triton.jit
def _stream_query(x, h_ptr, D: tl.constexpr, W: tl.constexpr, DOT: tl.constexpr,
                  COLS: tl.constexpr = 0, COL0: tl.constexpr = 0):
    """x @ columns [COL0, COL0 + W) of a [D, COLS] block of H (COLS = 0: W)."""
    d = tl.arange(0, D)
    w = tl.arange(0, W)
    STRIDE: tl.constexpr = W if COLS == 0 else COLS
    h = tl.load(h_ptr + d[:, None] * STRIDE + COL0 + w[None, :])
    return tl.dot(x.to(DOT), h)


@triton.jit
def _stream_output(o, h_ptr, D: tl.constexpr, W: tl.constexpr, DOT: tl.constexpr, acc):
    w = tl.arange(0, W)
    d = tl.arange(0, D)
    h = tl.load(h_ptr + w[:, None] * D + d[None, :])
    return tl.dot(o.to(DOT), h, acc)


@triton.jit
def _finish_rows(o_a, o_b, inv_l, rows_tok, rows_head, row_mask, head, out_ptr, stride_ot,
                 stride_oh, hva_ptr, hvb_ptr, signs_ptr, value_mean_ptr,
                 D: tl.constexpr, VA_N: tl.constexpr, VA_W: tl.constexpr, VB_W: tl.constexpr,
                 DOT: tl.constexpr):
    """out = value_mean + unrotate(o / l), for rows given as (token, query head)."""
    acc = tl.zeros([o_b.shape[0], D], dtype=tl.float32)
    acc = _stream_output(o_b * inv_l[:, None], hvb_ptr, D, VB_W, DOT, acc)
    if VA_N > 0:
        acc = _stream_output(o_a * inv_l[:, None], hva_ptr, D, VA_W, DOT, acc)
    _store_rows(acc, rows_tok, rows_head, row_mask, head, out_ptr, stride_ot, stride_oh,
                signs_ptr, value_mean_ptr, D)


@triton.jit
def _store_rows(acc, rows_tok, rows_head, row_mask, head, out_ptr, stride_ot, stride_oh,
                signs_ptr, value_mean_ptr, D: tl.constexpr):
    """out = value_mean + signs * acc / sqrt(D), acc = (o / l) @ H rows."""
    SCALE: tl.constexpr = 1.0 / (D ** 0.5)
    d = tl.arange(0, D)
    signs = tl.load(signs_ptr + d)
    mean = tl.load(value_mean_ptr + head * D + d)
    out = acc * (signs * SCALE)[None, :] + mean[None, :]
    ptrs = out_ptr + rows_tok.to(tl.int64)[:, None] * stride_ot + rows_head[:, None] * stride_oh
    tl.store(ptrs + d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


@triton.jit
def _load_norm16(slot_ptrs, row_mask, OFF: tl.constexpr):
    """The float16 norm at an even byte offset of each slot, in one 16-bit load."""
    ptrs = slot_ptrs.to(tl.pointer_type(tl.int16)) + OFF // 2
    return tl.load(ptrs, mask=row_mask, other=0).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _page_bases(cache_ptr, bt_row, tile, kv_end, head, stride_blk, BLOCK_N: tl.constexpr,
                PAGE: tl.constexpr, STRIDE_HEAD: tl.constexpr):
    """Byte pointers to this KV head's slot 0 in each page of a tile [BLOCK_N // PAGE]: one
    block-table load and one 64-bit product per page (not per token)."""
    pg = tile * (BLOCK_N // PAGE) + tl.arange(0, BLOCK_N // PAGE)
    blk = tl.load(bt_row + pg, mask=pg * PAGE < kv_end, other=0)
    return cache_ptr + (blk.to(tl.int64) * stride_blk + head * STRIDE_HEAD)


@triton.jit
def _paged_rows(base, x, PAGE: tl.constexpr, STRIDE_TOK: tl.constexpr):
    """[pages, PAGE] of base + offset * STRIDE_TOK + x: a tile's rows, page by page."""
    return base[:, None] + (tl.arange(0, PAGE) * STRIDE_TOK)[None, :] + x


@triton.jit
def _load_words16(slots, n_mask, base, n_mask2, OFF: tl.constexpr, WORDS: tl.constexpr,
                  PAGED: tl.constexpr, PAGE: tl.constexpr, STRIDE_TOK: tl.constexpr):
    """int16 words [OFF/2, OFF/2 + WORDS) of each slot of a tile, as [BLOCK_N, WORDS]. PAGED:
    loaded as [pages, PAGE, WORDS] from the pages' bases, so each address is a base plus a
    constant; else from the rows' slot pointers."""
    if PAGED:
        rows = _paged_rows(base, OFF, PAGE, STRIDE_TOK)
        ptrs = rows.to(tl.pointer_type(tl.int16))[:, :, None] + tl.arange(0, WORDS)[None, None, :]
        w = tl.load(ptrs, mask=n_mask2[:, :, None], other=0)
        return tl.reshape(w, [n_mask2.shape[0] * PAGE, WORDS])
    else:
        slots16 = slots.to(tl.pointer_type(tl.int16))
        return tl.load(slots16[:, None] + (OFF // 2 + tl.arange(0, WORDS))[None, :],
                       mask=n_mask[:, None], other=0)


@triton.jit
def _mean_ab(m_a, m_b, p0, theta):
    """[A', B'] of the key-mean term for a tile starting at position p0."""
    c0, s0 = rope_cos_sin(p0, theta)
    return m_a * c0[None, :] + m_b * s0[None, :], m_b * c0[None, :] - m_a * s0[None, :]


@triton.jit
def _pair_max(x, HALF: tl.constexpr):
    """x [2 * HALF] -> max(x[r], x[(r + HALF) % (2 * HALF)]) in every row r."""
    y = tl.max(tl.reshape(x, [2, HALF]), axis=0)
    return tl.reshape(tl.broadcast_to(y[None, :], [2, HALF]), [2 * HALF])


@triton.jit
def _pair_sum(x, HALF: tl.constexpr):
    """x [2 * HALF] -> x[r] + x[(r + HALF) % (2 * HALF)] in every row r."""
    y = tl.sum(tl.reshape(x, [2, HALF]), axis=0)
    return tl.reshape(tl.broadcast_to(y[None, :], [2, HALF]), [2 * HALF])


@triton.jit
def _pair_sum2(x, HALF: tl.constexpr):
    """x [2 * HALF, W] -> x[r] + x[(r + HALF) % (2 * HALF)] in every row r."""
    W: tl.constexpr = x.shape[1]
    y = tl.sum(tl.reshape(x, [2, HALF, W]), axis=0)
    return tl.reshape(tl.broadcast_to(y[None, :, :], [2, HALF, W]), [2 * HALF, W])


@triton.jit
def _find_seq(query_start_ptr, num_seqs, pid, BLOCK_Q: tl.constexpr):
    """The sequence whose query blocks contain program pid; block b of sequence s is program
    query_start[s] // BLOCK_Q + s + b (so the grid needs num_tokens // BLOCK_Q + num_seqs)."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(query_start_ptr + mid) // BLOCK_Q + mid
        if start <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _pad_rows(x, N: tl.constexpr):
    """x [M, W] -> [N, W] (N = M times a power of two, at most 16), rows M.. zero."""
    M: tl.constexpr = x.shape[0]
    W: tl.constexpr = x.shape[1]
    if M * 2 <= N:
        x = tl.reshape(tl.permute(tl.join(x, tl.zeros_like(x)), (2, 0, 1)), (2 * M, W))
    if M * 4 <= N:
        x = tl.reshape(tl.permute(tl.join(x, tl.zeros_like(x)), (2, 0, 1)), (4 * M, W))
    if M * 8 <= N:
        x = tl.reshape(tl.permute(tl.join(x, tl.zeros_like(x)), (2, 0, 1)), (8 * M, W))
    if M * 16 <= N:
        x = tl.reshape(tl.permute(tl.join(x, tl.zeros_like(x)), (2, 0, 1)), (16 * M, W))
    return x


@triton.jit
def _tq_reduce_kernel(
    part_ptr, out_ptr, stride_ot, stride_oh, hva_ptr, hvb_ptr, signs_ptr, value_mean_ptr,
    num_tokens,
    G: tl.constexpr, BLOCK_M: tl.constexpr, SPLITS: tl.constexpr, DOT: tl.constexpr,
    D: tl.constexpr, VA_N: tl.constexpr, VA_W: tl.constexpr, VB_W: tl.constexpr,
    SC: tl.constexpr, GM: tl.constexpr = 16,
):
    """Merge the SPLITS partials of GM of the G query heads of one token, then finish them:
    rows [GM * program_id(2), + GM) (grid dim 2: G / GM row groups, reduce_rows).

    SC partials per step, loaded together: one partial per step made the merge a chain of
    dependent loads, about 0.3 us per split on an H200 (151 us at 512 splits). The merge runs on
    GM rows, the finish's dot on BLOCK_M (>= 16): with few rows a step takes more partials
    (reduce_chunk)."""
    tok = tl.program_id(0)
    head = tl.program_id(1)
    WP: tl.constexpr = VA_W + VB_W + 2
    r = tl.program_id(2) * GM + tl.arange(0, GM)
    row_mask = r < G
    rows_head = head * G + r
    base = (tok.to(tl.int64) * (G * tl.num_programs(1)) + rows_head) * SPLITS * WP
    m_i = tl.full([GM], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([GM], dtype=tl.float32)
    acc_b = tl.zeros([GM, VB_W], dtype=tl.float32)
    acc_a = tl.zeros([GM, VA_W], dtype=tl.float32)
    wb = tl.arange(0, VB_W)
    wa = tl.arange(0, VA_W)
    sc = tl.arange(0, SC)
    for s0 in range(0, SPLITS, SC):
        row = base[:, None] + (s0 + sc)[None, :] * WP  # [GM, SC]
        mask = row_mask[:, None] & ((s0 + sc) < SPLITS)[None, :]
        m_s = tl.load(part_ptr + row + VA_W + VB_W, mask=mask, other=-1.0e30)
        l_s = tl.load(part_ptr + row + VA_W + VB_W + 1, mask=mask, other=0.0)
        m_new = tl.maximum(m_i, tl.max(m_s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        beta = tl.exp2(m_s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(l_s * beta, axis=1)
        a_b = tl.load(part_ptr + row[:, :, None] + wb[None, None, :], mask=mask[:, :, None],
                      other=0.0)
        acc_b = acc_b * alpha[:, None] + tl.sum(a_b * beta[:, :, None], axis=1)
        if VA_N > 0:
            a_a = tl.load(part_ptr + row[:, :, None] + VB_W + wa[None, None, :],
                          mask=mask[:, :, None], other=0.0)
            acc_a = acc_a * alpha[:, None] + tl.sum(a_a * beta[:, :, None], axis=1)
        m_i = m_new
    o_b = _pad_rows(acc_b / tl.maximum(l_i, 1e-30)[:, None], BLOCK_M)
    o_a = _pad_rows(acc_a / tl.maximum(l_i, 1e-30)[:, None], BLOCK_M)
    rm = tl.program_id(2) * GM + tl.arange(0, BLOCK_M)
    rows_tok = tl.zeros([BLOCK_M], dtype=tl.int32) + tok
    _finish_rows(o_a, o_b, tl.full([BLOCK_M], 1.0, tl.float32), rows_tok, head * G + rm,
                 (rm < G) & (rm < tl.program_id(2) * GM + GM), head, out_ptr, stride_ot,
                 stride_oh, hva_ptr, hvb_ptr, signs_ptr, value_mean_ptr, D, VA_N, VA_W, VB_W,
                 DOT)


@triton.jit
def _phase_queries(x, h_ptr, qk_scale, D: tl.constexpr, KQ: tl.constexpr, DOT: tl.constexpr,
                   COLS: tl.constexpr):
    """The query tiles of a 4-bit stream B's four phases (tq_lut4: codes 4e + j; the host orders
    H's columns to match): x @ each phase's KQ columns of the [D, COLS] block, times qk_scale."""
    q0 = (_stream_query(x, h_ptr, D, KQ, DOT, COLS, 0) * qk_scale).to(DOT)
    q1 = (_stream_query(x, h_ptr, D, KQ, DOT, COLS, KQ) * qk_scale).to(DOT)
    q2 = (_stream_query(x, h_ptr, D, KQ, DOT, COLS, 2 * KQ) * qk_scale).to(DOT)
    q3 = (_stream_query(x, h_ptr, D, KQ, DOT, COLS, 3 * KQ) * qk_scale).to(DOT)
    return q0, q1, q2, q3

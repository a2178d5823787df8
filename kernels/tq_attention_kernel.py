"""Paged attention over the quantized cache: decode and chunked prefill, split across programs.

One program takes one KV head and a block of rows, each row one (query token, query head of the
KV head's GQA group): BLOCK_M rows = BLOCK_Q tokens x G heads, padded. It

1. transforms its queries once: q~ = rotate(scale_k * q) * softmax_scale * log2(e), as tiles of
   the cache's streams (tl.dot with column blocks of the Hadamard matrix);
2. walks its share of the sequence's cache in tiles of BLOCK_N tokens: one load of each token's
   packed key and value serves all G query heads. Scores are q~ . levels(codes) (tl.dot) times the
   key norm. Online softmax in base 2; the value levels, weighted by p * value norm, accumulate by
   tl.dot. On the GPU a 4-bit stream takes the register lookup of tq_lut4 (four phases of codes
   scored as two half-width dots); the interpreter keeps the gather from the level table;
3. with one split, finishes the rows: o = value_mean + unrotate(acc / l); with several, writes
   (acc, max, sum) partials that _tq_reduce_kernel merges and finishes the same way.

Pre-RoPE key mean (MEAN): a calibrated key at position p adds q . RoPE_p(mu) to its score, a
different number for every key. Per (query, RoPE pair i) it is A_i cos(p t_i) + B_i sin(p t_i);
for a tile starting at p0, cos((p0 + j) t) = cos(p0 t) cos(j t) - sin(p0 t) sin(j t), so the tile's
term is [A', B'] . [cos(j t); sin(j t)] with A', B' rotated by p0 (exactly for the program's
first tile, then by one float32 rotation of BLOCK_N t per tile, MEAN_STEP; drift ~1e-7 rad a
tile, so every 32nd tile is exact again): one more small tl.dot against a constant [pairs,
BLOCK_N] table built on the host (tables.mean_table; fp16 on the GPU, where the scores use bf16
levels; read from cache every tile rather than held in registers, which left too few for four
programs per SM). Raw keys get no term. Only the pairs where the head's mean is not zero take
part (tables.mean_pairs): a mean kept on a few pairs costs a few pairs.

Raw-key fallback: a raw key (negative norm) is scored against the uncalibrated query. In decode
(FOLD) the G query heads take 2G rows of the same dots, calibrated query in one half of the rows
and uncalibrated in the other; each half is a softmax over its own kind of keys, and the partials
are merged after the loop, so the raw keys cost no second set of dots and no second query tiles in
registers. Chunked prefill (rows already full of query tokens) scores both and selects.

Addresses (PAGED, where BLOCK_N is a multiple of the page): one block-table load and one 64-bit
product per page of a tile, the code words loaded as [pages, page, words] (measured on an H200:
with MEAN_STEP 1.3x faster decode, benchmarks/RESULTS.md).

Causality: query token i of a chunk sits at position context_len + i and sees cache positions
<= its own. Within the current chunk the kernel reads the keys and values that the store kernel
has just quantized (vLLM stores before attention), so prefill attends over exactly what later
decode steps will read: every token always sees quantized keys and values, itself included.

The launcher (tq_attention.py) holds the served launch and the measurement switches; the pieces
outside the main loop, and the split reduce, are in tq_attention_parts.py.
"""

import triton
import triton.language as tl

from .tq_attention_parts import (_find_seq, _finish_rows, _load_norm16, _load_words16, _mean_ab,
                                 _page_bases, _pair_max, _pair_sum, _pair_sum2, _paged_rows,
                                 _phase_queries, _store_rows, _stream_output, _stream_query)
from .tq_common import cache_slot_ptrs, load_norm, load_stream_codes, lookup_levels, rope_cos_sin
from .tq_lut4 import levels4

MEAN_ANCHOR = tl.constexpr(32)  # tiles per run; MEAN_STEP: [A', B'] exact at each run's start


@triton.jit
def _tq_attention_kernel(
    q_ptr, stride_qt, stride_qh,
    cache_ptr, stride_blk, block_table_ptr, stride_bt, seq_lens_ptr, query_start_ptr, num_seqs,
    levels_ptr, signs_ptr, key_mean_ptr, key_scale_ptr, value_mean_ptr, mean_pairs_ptr,
    mean_theta_ptr, mean_mu_ptr, mean_table_ptr,
    hka_ptr, hkb_ptr, hva_ptr, hvb_ptr,
    out_ptr, stride_ot, stride_oh, part_ptr, qk_scale,
    # the launch (tq_attention's plan): rows and tiles, decode or chunked prefill, splits, dots
    G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DECODE: tl.constexpr, SPLITS: tl.constexpr, DOT: tl.constexpr,
    # from the tables: the raw-key fallback, the 4-bit register lookup (its PTX), the key mean
    FALLBACK: tl.constexpr, FAST_K: tl.constexpr, FAST_V: tl.constexpr, K_ASM: tl.constexpr,
    V_ASM: tl.constexpr, MEAN: tl.constexpr, ROT_HALF: tl.constexpr, RH: tl.constexpr,
    MEAN_DOT: tl.constexpr,
    # on in the served launch where they apply; off only to measure (AttentionTuning)
    MEAN_STEP: tl.constexpr, PAGED: tl.constexpr, FOLD: tl.constexpr,
    # the cache: page size, strides in bytes, head size, slot bytes
    PAGE: tl.constexpr, STRIDE_TOK: tl.constexpr, STRIDE_HEAD: tl.constexpr,
    D: tl.constexpr, SLOT: tl.constexpr,
    # the slot's code streams, each a tq_streams.Stream (tq_streams.stream_constexprs): the
    # key's A (extra-bit coordinates; n == 0: none) and B, the value's A and B; the norms
    KA: tl.constexpr, KB: tl.constexpr, VA: tl.constexpr, VB: tl.constexpr,
    K_NORM_OFF: tl.constexpr, V_NORM_OFF: tl.constexpr,
    K_NORM_RULE: tl.constexpr, V_NORM_RULE: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:
        seq = pid
        q_block = 0
    else:
        seq = _find_seq(query_start_ptr, num_seqs, pid, BLOCK_Q)
        q_block = pid - (tl.load(query_start_ptr + seq) // BLOCK_Q + seq)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    # Rows: (query token, query head of this KV head's group). FOLD (decode with the raw-key
    # fallback): the upper half of the rows repeats the group's heads with the uncalibrated
    # query and scores only the raw keys, the lower half only the calibrated ones; the halves
    # are two softmax partials over disjoint keys, merged once after the loop.
    r = tl.arange(0, BLOCK_M)
    if FOLD:
        HALF_M: tl.constexpr = BLOCK_M // 2
        raw_row = r >= HALF_M
        q_idx = q_block + r * 0
        q_mask = (r % HALF_M) < G
        row_mask = r < G
        rows_head = head * G + r % HALF_M
    else:
        q_idx = q_block * BLOCK_Q + r // G
        row_mask = (r < BLOCK_Q * G) & (q_idx < q_len)
        q_mask = row_mask
        rows_head = head * G + r % G
    rows_tok = q_start + q_idx
    q_pos = context_len + q_idx

    # 1. The query, transformed once (FAST_K: stream B in four phases, codes 4e + j;
    #    the host passes H's columns permuted to match).
    d = tl.arange(0, D)
    q_rows = q_ptr + rows_tok.to(tl.int64)[:, None] * stride_qt + rows_head[:, None] * stride_qh
    q = tl.load(q_rows + d[None, :], mask=q_mask[:, None], other=0.0).to(tl.float32)
    k_scale = tl.load(key_scale_ptr + head * D + d)
    signs = tl.load(signs_ptr + d)
    if FOLD:  # raw keys are scored against the uncalibrated rotated query
        x = q * tl.where(raw_row[:, None], signs[None, :], (k_scale * signs)[None, :])
    else:
        x = q * (k_scale * signs)[None, :]
    KQ: tl.constexpr = KB.n // 4
    if FAST_K:
        qb = (_stream_query(x, hkb_ptr, D, KQ, DOT, KB.w, 0) * qk_scale).to(DOT)
        qb1 = (_stream_query(x, hkb_ptr, D, KQ, DOT, KB.w, KQ) * qk_scale).to(DOT)
        qb2 = (_stream_query(x, hkb_ptr, D, KQ, DOT, KB.w, 2 * KQ) * qk_scale).to(DOT)
        qb3 = (_stream_query(x, hkb_ptr, D, KQ, DOT, KB.w, 3 * KQ) * qk_scale).to(DOT)
    else:
        qb = (_stream_query(x, hkb_ptr, D, KB.w, DOT) * qk_scale).to(DOT)
    if KA.n > 0:
        qa = (_stream_query(x, hka_ptr, D, KA.w, DOT) * qk_scale).to(DOT)
    if FALLBACK and not FOLD:
        # Raw keys (negative norm) are scored against the uncalibrated rotated query.
        x_raw = q * signs[None, :]
        if FAST_K:  # measurement only (fold=False): the served decode folds the raw keys in
            qrb, qrb1, qrb2, qrb3 = _phase_queries(x_raw, hkb_ptr, qk_scale, D, KQ, DOT, KB.w)
        else:
            qrb = (_stream_query(x_raw, hkb_ptr, D, KB.w, DOT) * qk_scale).to(DOT)
        if KA.n > 0:
            qra = (_stream_query(x_raw, hka_ptr, D, KA.w, DOT) * qk_scale).to(DOT)
    if MEAN:
        # q . RoPE_p(mu) = sum_i A_i cos(p t_i) + B_i sin(p t_i) + C (the unrotated channels).
        SQRT_D: tl.constexpr = D ** 0.5
        qs = qk_scale * SQRT_D
        # tables.mean_pairs: per head, the pairs where its mean is not zero (-1 pads), and their
        # frequencies and mean halves, contiguous
        j = head * RH + tl.arange(0, RH)
        i = tl.load(mean_pairs_ptr + j)
        if FOLD:
            i_mask = (q_mask & ~raw_row)[:, None] & (i >= 0)[None, :]
        else:
            i_mask = row_mask[:, None] & (i >= 0)[None, :]
        q_a = tl.load(q_rows + i[None, :], mask=i_mask, other=0.0).to(tl.float32)
        q_b = tl.load(q_rows + ROT_HALF + i[None, :], mask=i_mask, other=0.0).to(tl.float32)
        mu_a = tl.load(mean_mu_ptr + 2 * j)[None, :]
        mu_b = tl.load(mean_mu_ptr + 2 * j + 1)[None, :]
        m_a = (q_a * mu_a + q_b * mu_b) * qs
        m_b = (q_b * mu_a - q_a * mu_b) * qs
        mu = tl.load(key_mean_ptr + head * D + d)
        m_c = tl.sum(tl.where(d[None, :] >= 2 * ROT_HALF, q * mu[None, :], 0.0), axis=1) * qs
        if FOLD:
            m_c = tl.where(raw_row, 0.0, m_c)
        theta = tl.load(mean_theta_ptr + j)  # 0 in padding columns
        # cos / sin(j theta) [RH, BLOCK_N], read again every tile (not kept in registers)
        t_ptrs = (mean_table_ptr + head * 2 * RH * BLOCK_N + tl.arange(0, RH)[:, None] * BLOCK_N
                  + tl.arange(0, BLOCK_N)[None, :])

    # 2. This program's share of the keys: [0, kv_end) split into SPLITS runs of whole tiles.
    kv_end = tl.minimum(seq_len, context_len + (q_block + 1) * BLOCK_Q)
    num_tiles = tl.cdiv(kv_end, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    if MEAN:
        if MEAN_STEP:
            # [A', B'] exact at the start of every MEAN_ANCHOR tiles, stepped to each later
            # tile by one rotation by BLOCK_N * theta (float32; drifts about 1e-7 rad a tile)
            c_step, s_step = rope_cos_sin(BLOCK_N, theta)
            c_step = c_step[None, :]
            s_step = s_step[None, :]

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    VQ: tl.constexpr = VB.n // 4
    if FAST_V:  # the four phases of stream B; the host permutes H's rows to match
        acc_b = tl.zeros([BLOCK_M, VQ], dtype=tl.float32)
        acc_b1 = tl.zeros([BLOCK_M, VQ], dtype=tl.float32)
        acc_b2 = tl.zeros([BLOCK_M, VQ], dtype=tl.float32)
        acc_b3 = tl.zeros([BLOCK_M, VQ], dtype=tl.float32)
    else:
        acc_b = tl.zeros([BLOCK_M, tl.constexpr(VB.w)], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, tl.constexpr(VA.w)], dtype=tl.float32)
    # Runs of MEAN_ANCHOR tiles: with MEAN_STEP the key mean's [A', B'] is exact at the start of
    # each (the float32 steps drift) and stepped within it.
    for chunk in range(tile_lo, tile_hi, MEAN_ANCHOR):
        if MEAN:
            if MEAN_STEP:
                a_t, b_t = _mean_ab(m_a, m_b, chunk * BLOCK_N, theta)
        for tile in range(chunk, tl.minimum(chunk + MEAN_ANCHOR, tile_hi)):
            n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = n < kv_end
            base = 0
            n_mask2 = 0
            if PAGED:  # BLOCK_N is a multiple of PAGE: addresses page by page
                base = _page_bases(cache_ptr, block_table_ptr + seq * stride_bt, tile, kv_end, head,
                                   stride_blk, BLOCK_N, PAGE, STRIDE_HEAD)
                n_mask2 = tl.reshape(n_mask, [BLOCK_N // PAGE, PAGE])
                slots = tl.reshape(_paged_rows(base, 0, PAGE, STRIDE_TOK), [BLOCK_N])
            else:
                blocks = tl.load(block_table_ptr + seq * stride_bt + n // PAGE, mask=n_mask,
                                 other=0)
                slots = cache_slot_ptrs(cache_ptr, blocks, n % PAGE, head, stride_blk,
                                        STRIDE_TOK, STRIDE_HEAD)

            if FAST_K:
                kw16 = _load_words16(slots, n_mask, base, n_mask2, KB.off, KQ, PAGED, PAGE,
                                     STRIDE_TOK)
                k0, k1, k2, k3 = levels4(kw16, K_ASM)
                s = tl.dot(qb, tl.trans(k0))
                s = tl.dot(qb1, tl.trans(k1), s)
                s = tl.dot(qb2, tl.trans(k2), s)
                s = tl.dot(qb3, tl.trans(k3), s)
                if FALLBACK and not FOLD:
                    s_raw = tl.dot(qrb, tl.trans(k0))
                    s_raw = tl.dot(qrb1, tl.trans(k1), s_raw)
                    s_raw = tl.dot(qrb2, tl.trans(k2), s_raw)
                    s_raw = tl.dot(qrb3, tl.trans(k3), s_raw)
            else:
                kc = load_stream_codes(slots, n_mask, KB.off, KB.bits, KB.n, KB.u, KB.k, KB.nu)
                kl = tl.trans(lookup_levels(kc, levels_ptr + 256, KB.n, KB.w))
                s = tl.dot(qb, kl)
                if FALLBACK and not FOLD:
                    s_raw = tl.dot(qrb, kl)
            if KA.n > 0:
                kc_a = load_stream_codes(slots, n_mask, KA.off, KA.bits, KA.n, KA.u, KA.k, KA.nu)
                kl_a = tl.trans(lookup_levels(kc_a, levels_ptr, KA.n, KA.w))
                s = tl.dot(qa, kl_a, s)
                if FALLBACK and not FOLD:
                    s_raw = tl.dot(qra, kl_a, s_raw)
            if FAST_K:  # the register path needs even norm offsets: one 16-bit load
                k_norm = _load_norm16(slots, n_mask, K_NORM_OFF)
            else:
                k_norm = load_norm(slots, n_mask, K_NORM_OFF)
            if FALLBACK:
                s = s * tl.abs(k_norm)[None, :]
            else:
                s = s * k_norm[None, :]
            if MEAN:
                if not MEAN_STEP:
                    a_t, b_t = _mean_ab(m_a, m_b, tile * BLOCK_N, theta)
                t_cos = tl.load(t_ptrs)
                t_sin = tl.load(t_ptrs + RH * BLOCK_N)
                s += tl.dot(b_t.to(MEAN_DOT), t_sin, tl.dot(a_t.to(MEAN_DOT), t_cos)) + m_c[:, None]
                if MEAN_STEP:
                    a_t, b_t = a_t * c_step + b_t * s_step, b_t * c_step - a_t * s_step
            if FALLBACK and not FOLD:
                s = tl.where(k_norm[None, :] < 0, s_raw * tl.abs(k_norm)[None, :], s)
            if FOLD:
                visible = n_mask[None, :] & ((k_norm < 0)[None, :] == raw_row[:, None])
            elif DECODE:
                visible = n_mask[None, :]
            else:
                visible = n_mask[None, :] & (n[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new

            if FAST_V:
                v_norm = _load_norm16(slots, n_mask, V_NORM_OFF)
            else:
                v_norm = load_norm(slots, n_mask, V_NORM_OFF)
            pv = (p * v_norm[None, :]).to(DOT)
            if FAST_V:
                vw16 = _load_words16(slots, n_mask, base, n_mask2, VB.off, VQ, PAGED, PAGE,
                                     STRIDE_TOK)
                v0, v1, v2, v3 = levels4(vw16, V_ASM)
                acc_b = tl.dot(pv, v0, acc_b * alpha[:, None])
                acc_b1 = tl.dot(pv, v1, acc_b1 * alpha[:, None])
                acc_b2 = tl.dot(pv, v2, acc_b2 * alpha[:, None])
                acc_b3 = tl.dot(pv, v3, acc_b3 * alpha[:, None])
            else:
                vc = load_stream_codes(slots, n_mask, VB.off, VB.bits, VB.n, VB.u, VB.k, VB.nu)
                acc_b = tl.dot(pv, lookup_levels(vc, levels_ptr + 768, VB.n, VB.w),
                               acc_b * alpha[:, None])
            if VA.n > 0:
                vc_a = load_stream_codes(slots, n_mask, VA.off, VA.bits, VA.n, VA.u, VA.k, VA.nu)
                acc_a = tl.dot(pv, lookup_levels(vc_a, levels_ptr + 512, VA.n, VA.w),
                               acc_a * alpha[:, None])

    # 3. Finish, or leave partials for the reduction (FAST_V: the phases in turn, the order of
    #    the permuted H rows). FOLD: first the two halves' partials, merged into every row.
    if FOLD:
        m_pair = _pair_max(m_i, HALF_M)
        w = tl.exp2(m_i - m_pair)
        l_i = _pair_sum(l_i * w, HALF_M)
        m_i = m_pair
        acc_b = _pair_sum2(acc_b * w[:, None], HALF_M)
        if FAST_V:
            acc_b1 = _pair_sum2(acc_b1 * w[:, None], HALF_M)
            acc_b2 = _pair_sum2(acc_b2 * w[:, None], HALF_M)
            acc_b3 = _pair_sum2(acc_b3 * w[:, None], HALF_M)
        if VA.n > 0:
            acc_a = _pair_sum2(acc_a * w[:, None], HALF_M)
    if SPLITS == 1:
        inv_l = 1.0 / tl.maximum(l_i, 1e-30)
        if FAST_V:
            out = tl.zeros([BLOCK_M, D], dtype=tl.float32)
            out = _stream_output(acc_b * inv_l[:, None], hvb_ptr, D, VQ, DOT, out)
            out = _stream_output(acc_b1 * inv_l[:, None], hvb_ptr + VQ * D, D, VQ, DOT, out)
            out = _stream_output(acc_b2 * inv_l[:, None], hvb_ptr + 2 * VQ * D, D, VQ, DOT, out)
            out = _stream_output(acc_b3 * inv_l[:, None], hvb_ptr + 3 * VQ * D, D, VQ, DOT, out)
            _store_rows(out, rows_tok, rows_head, row_mask, head, out_ptr, stride_ot, stride_oh,
                        signs_ptr, value_mean_ptr, D)
        else:
            _finish_rows(acc_a, acc_b, inv_l, rows_tok, rows_head, row_mask, head, out_ptr,
                         stride_ot, stride_oh, hva_ptr, hvb_ptr, signs_ptr, value_mean_ptr,
                         D, VA.n, VA.w, VB.w, DOT)
    else:
        WP: tl.constexpr = VA.w + VB.w + 2
        row_base = ((rows_tok.to(tl.int64) * (G * tl.num_programs(1)) + rows_head) * SPLITS
                    + split) * WP
        if FAST_V:
            wq = part_ptr + row_base[:, None] + tl.arange(0, VQ)[None, :]
            tl.store(wq, acc_b, mask=row_mask[:, None])
            tl.store(wq + VQ, acc_b1, mask=row_mask[:, None])
            tl.store(wq + 2 * VQ, acc_b2, mask=row_mask[:, None])
            tl.store(wq + 3 * VQ, acc_b3, mask=row_mask[:, None])
        else:
            wb = tl.arange(0, VB.w)
            tl.store(part_ptr + row_base[:, None] + wb[None, :], acc_b, mask=row_mask[:, None])
        if VA.n > 0:
            wa = tl.arange(0, VA.w)
            tl.store(part_ptr + row_base[:, None] + VB.w + wa[None, :], acc_a,
                     mask=row_mask[:, None])
        tl.store(part_ptr + row_base + VA.w + VB.w, m_i, mask=row_mask)
        tl.store(part_ptr + row_base + VA.w + VB.w + 1, l_i, mask=row_mask)


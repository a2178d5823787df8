"""The Hopper decode kernel's source variants that benchmarks/dev/kv_decode_phases.py times beside
the served one (issue 16): text edits of kernels/tq_decode_hopper.py, each checked to apply
exactly once (variant_source), and the launch the cluster variants need (cluster_launcher).
Each variant's comment says what it changes and, where it was timed, what it measured; the
numbers are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

from pathlib import Path

import _source_tree  # noqa: F401  this tree's vllm_gds importable

RULE = "# " + "-" * 93 + "\n"  # the kernel module's section rule


# Source variants of the kernel, timed beside the served one: (old, new) replacements, each old
# text found exactly once, or "move_query_loads" (_move_query_loads) or "interleave" (_interleave). kv_end_first: the
# sequence's length (the head of the chain length -> block table entry -> the first tile's
# codes) loaded first, before the lookup table's barriers; loads_first: also the query and the
# transform's tables loaded before that chain.
# the sequence length's load taken from its place (the variants load it earlier)
_KV_END_OUT = ("    kv_end = gl.load(seq_lens_ptr + seq)\n    bt_row", "    bt_row")
SOURCE_VARIANTS = {
    "served": [],
    "kv_end_first": [
        _KV_END_OUT,
        ("    q_row = gl.load(query_start_ptr + seq)\n",
         "    q_row = gl.load(query_start_ptr + seq)\n    kv_end = gl.load(seq_lens_ptr + seq)\n"),
    ],
}
# (a CTA barrier after the first tile's loads was tried: the compiler drops it, no shared memory
# between it and the lookup table's barriers; the same SASS as kv_end_first)
# warp_reduce: the warps' partial rows merged by cross-warp reductions and converted again for
# the partial store (served until 2026-12-07; the served in-thread merge ("warp_sum_all") took
# 597 -> 248 SASS and 12 -> 7 CTA barriers from the tile loop to the counter at 70B TP8)
SOURCE_VARIANTS["warp_reduce"] = [(
    "    OW: gl.constexpr = gl.BlockedLayout([NW, 4, R2, 1], [1, 8, 1, 4], [1, NW, 1, 1],\n"
    "                                        [1, 0, 2, 3])\n"
    "    MW: gl.constexpr = gl.SliceLayout(1, OW)\n"
    "    mw = gl.convert_layout(m4, MW)\n"
    "    lw = gl.convert_layout(l4, MW)\n"
    "    ow = gl.convert_layout(o4, OW)\n"
    "    m_all = gl.max(gl.max(mw, axis=1), axis=0)\n"
    "    w = gl.exp2(mw - gl.expand_dims(gl.expand_dims(m_all, 0), 1))\n"
    "    l_all = gl.sum(gl.sum(lw * w, axis=1), axis=0)\n"
    "    o_all = gl.sum(gl.sum(ow * gl.expand_dims(w, 1), axis=2), axis=0)  # [D, HALF]\n"
    "    OL: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, OW))\n",
    "    m_all = gl.max(gl.max(m4, axis=1), axis=0)\n"
    "    w4 = gl.exp2(m4 - gl.expand_dims(gl.expand_dims(m_all, 0), 1))\n"
    "    l_all = gl.sum(gl.sum(l4 * w4, axis=1), axis=0)\n"
    "    w4o = gl.convert_layout(w4, gl.SliceLayout(1, o4.type.layout))\n"
    "    o_all = gl.sum(gl.sum(o4 * gl.expand_dims(w4o, 1), axis=2), axis=0)  # [D, HALF]\n"
    "    OL: gl.constexpr = gl.BlockedLayout([4, 1], [8, 4], [NW, 1], [0, 1])\n"
    "    o_all = gl.convert_layout(o_all, OL)\n")]
SOURCE_VARIANTS["loads_first"] = SOURCE_VARIANTS["kv_end_first"] + ["move_query_loads"]
# merge_wide: the merges take 16 partial rows a step where HALF = 8, not 8 (at 128 splits in
# groups of 8 the last merge's 16 groups in one round trip to the L2 instead of two); HALF 4
# keeps its 16, HALF 16 its 4 (more spill: 32 a step at HALF 4 took 392 bytes of stack)
SOURCE_VARIANTS["merge_wide"] = [
    ("    SC: gl.constexpr = 64 // HALF  # 64 float32 registers a thread at D = 128\n",
     "    SC: gl.constexpr = 16 if HALF <= 8 else 64 // HALF\n")]
# interleave: tiles dealt round-robin to the splits, the first tile's codes two memory round trips
# from the start, not three (_interleave); with merge_wide's 16 rows a step
SOURCE_VARIANTS["interleave"] = SOURCE_VARIANTS["merge_wide"] + ["interleave"]
# codes_late: as loads_first, and the first tile's code loads (which wait for the block-table
# entry, in program order) issued after the prologue's loads and math, just before the tile loop:
# the query, H and the key mean's loads no longer queue behind the chain length -> block table
SOURCE_VARIANTS["codes_late"] = SOURCE_VARIANTS["loads_first"] + [
    ("        base, kw, vw = _tile_codes(\n"
     "            cache_ptr, bt_row, tile_lo, kv_end, head, stride_blk, W1, NW, PAGE, STRIDE_TOK,\n"
     "            STRIDE_HEAD, K_LOAD, K_OFF, K_E, K_WORD, K_CODES, V_LOAD, V_OFF, V_E, V_WORD,"
     " V_CODES)\n",
     "        base = _tile_base(bt_row, tile_lo, kv_end, head, stride_blk, W1, NW, PAGE, STRIDE_TOK,\n"
     "                          STRIDE_HEAD)\n"),
    ("    for tile in range(tile_lo, tile_hi):\n",
     "    if PREFETCH:\n"
     "        kw = _load_words(cache_ptr, base, K_LOAD, K_OFF, K_E, K_WORD, K_CODES, STRIDE_TOK)\n"
     "        vw = _load_words(cache_ptr, base, V_LOAD, V_OFF, V_E, V_WORD, V_CODES, STRIDE_TOK)\n"
     "    for tile in range(tile_lo, tile_hi):\n")]
# Timing only (their outputs differ from the served call's): how much of 70B TP8 1x32K's prologue
# the two dependent chains cost. first_early: the first tile's block-table entries and codes
# loaded without waiting for the sequence's length (the tile at index `split`, no mask; the loop
# then decodes them as its first tile's): the chain length -> block table -> codes becomes block
# table -> codes, as a program given tile `split` first (tiles dealt round-robin for the first
# tile only) would have. q_seq: the query row taken as the sequence's index (a pure-decode batch)
# instead of loaded from query_start_loc: the chain query start -> query becomes the query.
SOURCE_VARIANTS["first_early"] = [
    ("            cache_ptr, bt_row, tile_lo, kv_end, head, stride_blk, W1, NW, PAGE, STRIDE_TOK,",
     "            cache_ptr, bt_row, split, 1 << 30, head, stride_blk, W1, NW, PAGE, STRIDE_TOK,")]
SOURCE_VARIANTS["q_seq"] = [("    q_row = gl.load(query_start_ptr + seq)\n", "    q_row = seq\n")]
# norms_ahead: the next tile's key and value norms loaded with its codes, one tile ahead (PREFETCH
# 1), instead of at the top of the tile that uses them: the tile loop's only load issued and used
# in the same iteration (its latency, an L2 round trip, against the key decode's ~100
# instructions). Four more registers (two tokens' norms a thread, each stream).
_NORMS = ("_load_norms(cache_ptr, base, {t}, kv_end, TOKS, K_NORM_OFF,\n"
          "{i}V_NORM_OFF, NW, STRIDE_TOK)\n")
SOURCE_VARIANTS["norms_ahead"] = [
    ("            STRIDE_HEAD, K_LOAD, K_OFF, K_E, K_WORD, K_CODES, V_LOAD, V_OFF, V_E, V_WORD, V_CODES)\n"
     "        if PREFETCH == 2:  # the second tile's codes too\n",
     "            STRIDE_HEAD, K_LOAD, K_OFF, K_E, K_WORD, K_CODES, V_LOAD, V_OFF, V_E, V_WORD, V_CODES)\n"
     "        kn_n, vn_n, ok_n = " + _NORMS.format(t="tile_lo", i=" " * 28)
     + "        if PREFETCH == 2:  # the second tile's codes too\n"),
    ("            else:\n"
     "                base, kw, vw = _tile_codes(\n"
     "                    cache_ptr, bt_row, tile + 1, kv_end, head, stride_blk, W1, NW, PAGE,\n"
     "                    STRIDE_TOK, STRIDE_HEAD, K_LOAD, K_OFF, K_E, K_WORD, K_CODES, V_LOAD, V_OFF,\n"
     "                    V_E, V_WORD, V_CODES)\n",
     "            else:\n"
     "                kn, vn, ok = kn_n, vn_n, ok_n\n"
     "                base, kw, vw = _tile_codes(\n"
     "                    cache_ptr, bt_row, tile + 1, kv_end, head, stride_blk, W1, NW, PAGE,\n"
     "                    STRIDE_TOK, STRIDE_HEAD, K_LOAD, K_OFF, K_E, K_WORD, K_CODES, V_LOAD, V_OFF,\n"
     "                    V_E, V_WORD, V_CODES)\n"
     "                kn_n, vn_n, ok_n = " + _NORMS.format(t="tile + 1", i=" " * 36)),
    ("        kn, vn, ok = _load_norms(cache_ptr, base_now, tile, kv_end, TOKS, K_NORM_OFF,\n"
     "                                 V_NORM_OFF, NW, STRIDE_TOK)\n",
     "        if PREFETCH != 1:\n"
     "            kn, vn, ok = _load_norms(cache_ptr, base_now, tile, kv_end, TOKS, K_NORM_OFF,\n"
     "                                     V_NORM_OFF, NW, STRIDE_TOK)\n"),
]
SOURCE_VARIANTS["early_both"] = SOURCE_VARIANTS["first_early"] + SOURCE_VARIANTS["q_seq"]
SOURCE_VARIANTS["early_all"] = SOURCE_VARIANTS["early_both"] + ["move_query_loads"]
# cluster: the merge groups of 8 splits launched as clusters of 8 CTAs (grid splits x heads x
# sequences, the splits along x; cluster_launcher), the group's counter atomic replaced by a cluster
# barrier (barrier.cluster arrive.release / wait.acquire), the last CTA of the cluster merging the
# group's partials from the L2 as served. cluster_cols: each CTA of the cluster then merges
# D / 8 columns of the group's 8 partials (the L2 reads of one merge spread over 8 programs), a
# second cluster barrier, and the last CTA writes m and l and goes on to the groups' counter.
# Every cluster variant needs splits a multiple of 8 (run where the served split count is).
CLUSTER = 8
_CLUSTER_HELPERS = """

@gluon.jit
def _cluster_sync(x, NW: gl.constexpr):
    \"\"\"Every CTA of the cluster here, their writes before it (global memory too) visible after it.\"\"\"
    t = gl.arange(0, 32 * NW, gl.BlockedLayout([1], [32], [NW], [0])) + x
    gl.inline_asm_elementwise(
        "barrier.cluster.arrive.release.aligned; barrier.cluster.wait.acquire.aligned; "
        "mov.u32 $0, 0;", "=r,r", [t], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _merged_cols(m_s, l_s, o_s, part_ptr, q_row, head, splits, first, c0, G: gl.constexpr,
                 HALF: gl.constexpr, WP: gl.constexpr, DC: gl.constexpr, M3: gl.constexpr):
    \"\"\"The merge of partials (m_s, l_s [8, HALF], o_s [8, HALF, DC] in M3) written into partial row
    first's columns [c0, c0 + DC); returns (l, m).\"\"\"
    m = gl.max(m_s, axis=0)
    beta = gl.exp2(m_s - m[None, :])
    l = gl.sum(l_s * beta, axis=0)
    o = gl.sum(o_s * beta[:, :, None], axis=0)  # [HALF, DC]
    OL: gl.constexpr = gl.SliceLayout(0, M3)
    ro = gl.arange(0, HALF, gl.SliceLayout(1, OL))
    co = c0 + gl.arange(0, DC, gl.SliceLayout(0, OL))
    rb2 = (q_row.to(gl.int64) * (G * gl.num_programs(1)) + head * G + ro) * splits + first
    gl.store(part_ptr + (rb2 * WP)[:, None] + co[None, :], o, mask=(ro < G)[:, None])
    return l, m


@gluon.jit
def _merge_cols(part_ptr, q_row, head, splits, first, n, c0, G: gl.constexpr, HALF: gl.constexpr,
                WP: gl.constexpr, V_PART: gl.constexpr, NW: gl.constexpr, DC: gl.constexpr):
    \"\"\"_merge of the n (<= 8) partial rows first, first + 1, ... for columns [c0, c0 + DC) only,
    written into row first's columns; returns (l, m) of the merge (every column's).\"\"\"
    M3: gl.constexpr = gl.BlockedLayout([8, 1, 1], [1, 2, 16], [1, NW, 1], [2, 1, 0])
    RL: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, M3))
    s = gl.arange(0, 8, gl.SliceLayout(1, gl.SliceLayout(2, M3)))
    r = gl.arange(0, HALF, RL)
    c = c0 + gl.arange(0, DC, gl.SliceLayout(0, gl.SliceLayout(1, M3)))
    rbase = (q_row.to(gl.int64) * (G * gl.num_programs(1)) + head * G + r) * splits + first
    mask = (s < n)[:, None] & (r < G)[None, :]
    row = (rbase[None, :] + s[:, None]) * WP
    m_s = gl.load(part_ptr + row + V_PART, mask=mask, other=-1.0e30)
    l_s = gl.load(part_ptr + row + V_PART + 1, mask=mask, other=0.0)
    o_s = gl.load(part_ptr + row[:, :, None] + c[None, None, :], mask=mask[:, :, None],
                  other=0.0)
    return _merged_cols(m_s, l_s, o_s, part_ptr, q_row, head, splits, first, c0, G, HALF, WP, DC,
                        M3)


@gluon.jit
def _store_ml(part_ptr, l, m, q_row, head, splits, slot, G: gl.constexpr, HALF: gl.constexpr,
              WP: gl.constexpr, V_PART: gl.constexpr):
    rm = gl.arange(0, HALF, l.type.layout)
    row_m = ((q_row.to(gl.int64) * (G * gl.num_programs(1)) + head * G + rm) * splits
             + slot) * WP
    gl.store(part_ptr + row_m + V_PART, m, mask=rm < G)
    gl.store(part_ptr + row_m + V_PART + 1, l, mask=rm < G)
"""
# every cluster variant: its helpers, and the grid splits x heads x sequences
_CLUSTER_GRID = [
    ("\n" + RULE + "# The kernel", _CLUSTER_HELPERS + "\n" + RULE + "# The kernel"),
    ("    seq = gl.program_id(0)\n", "    seq = gl.program_id(2)\n"),
    ("    # Layouts: one batched mma.sync layout",
     "    split = gl.program_id(0)  # the splits along x: a cluster is 8 of them\n"
     "    # Layouts: one batched mma.sync layout"),
    ("    splits = gl.num_programs(2)  # a runtime value: one compile serves every split count\n",
     "    splits = gl.num_programs(0)\n")]
SOURCE_VARIANTS["cluster"] = _CLUSTER_GRID + [
    ('            done = gl.atomic_add(counts + group, 1, sem="acq_rel", scope="gpu")\n'
     "            if done == in_group - 1:\n"
     "                gl.store(counts + group, 0)  # zero again for the next launch (graph replays)\n",
     "            _cluster_sync(split, NW)\n"
     "            done = split % GROUP\n"
     "            if done == in_group - 1:\n")]
SOURCE_VARIANTS["cluster_cols"] = SOURCE_VARIANTS["cluster"] + [
    ("            if done == in_group - 1:\n"
     "                h_v, sg_v, mean_v = _finish_operands(hvt_ptr, signs_ptr, value_mean_ptr, head,\n"
     "                                                     L2, D)\n"
     "                o_t, l_m, m_m = _merge(part_ptr, q_row, head, splits, group * GROUP, in_group,\n"
     "                                       1, G, D, HALF, WP, V_PART, NW)\n"
     "                last = groups == 1\n"
     "                if groups > 1:  # the group's merge replaces its first partial; the last group\n"
     "                    _cta_barrier()  # (every thread's reads of that partial done) merges them\n"
     "                    _store_merged(part_ptr, o_t, l_m, m_m, q_row, head, splits, group * GROUP,\n"
     "                                  G, D, HALF, WP, V_PART)\n"
     "                    _cta_barrier()\n",
     "            l_c, m_c = _merge_cols(part_ptr, q_row, head, splits, group * GROUP, in_group,\n"
     "                                   done * (D // GROUP), G, HALF, WP, V_PART, NW, D // GROUP)\n"
     "            _cluster_sync(split, NW)  # every CTA's columns written, its m and l read\n"
     "            if done == in_group - 1:\n"
     "                h_v, sg_v, mean_v = _finish_operands(hvt_ptr, signs_ptr, value_mean_ptr, head,\n"
     "                                                     L2, D)\n"
     "                _store_ml(part_ptr, l_c, m_c, q_row, head, splits, group * GROUP, G, HALF, WP,\n"
     "                          V_PART)\n"
     "                _cta_barrier()  # one group: its merged row read back to finish it\n"
     "                o_t, l_m, m_m = _merge(part_ptr, q_row, head, splits, group * GROUP,\n"
     "                                       (groups == 1).to(gl.int32), 1, G, D, HALF, WP,\n"
     "                                       V_PART, NW)\n"
     "                last = groups == 1\n"
     "                if groups > 1:\n")]


# cluster_dsmem: as cluster_cols, but no partial goes through the L2 at the group level: each CTA
# writes its partial (o, m, l) into a shared buffer declared in PTX (xbuf, outside Triton's
# allocation), a cluster barrier, each CTA reads its D / 8 columns of the 8 buffers through
# distributed shared memory (mapa, ld.shared::cluster), merges them and writes its columns of the
# group's row to the L2, a second cluster barrier (no CTA leaves while others read its buffer),
# then the last CTA writes m and l and goes on to the groups' counter (_dsmem).
_DSMEM_HELPERS = """

@gluon.jit
def _xs_declare(NW: gl.constexpr):
    \"\"\"xbuf: 16 rows x (128 + 2) float32, one element a thread (the declaration emitted once).\"\"\"
    one = gl.arange(0, 32 * NW, gl.BlockedLayout([1], [32], [NW], [0]))
    gl.inline_asm_elementwise(".shared .align 16 .b8 xbuf[8320]; mov.u32 $0, 0;", "=r,r", [one],
                              dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _xs_put(v, off):
    gl.inline_asm_elementwise(
        "{ .reg .u32 a; mov.u32 a, xbuf; add.u32 a, a, $1; st.shared.f32 [a], $2; mov.u32 $0, 0; }",
        "=r,r,f", [off, v], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _xs_get(off, rank):
    return gl.inline_asm_elementwise(
        "{ .reg .u32 a; mov.u32 a, xbuf; add.u32 a, a, $1; mapa.shared::cluster.u32 a, a, $2; "
        "ld.shared::cluster.f32 $0, [a]; }",
        "=f,r,r", [off, rank], dtype=gl.float32, is_pure=False, pack=1)


@gluon.jit
def _merge_dsmem(part_ptr, q_row, head, splits, first, n, c0, G: gl.constexpr, D: gl.constexpr,
                 HALF: gl.constexpr, WP: gl.constexpr, NW: gl.constexpr, DC: gl.constexpr):
    \"\"\"The cluster's n (<= 8) partials from its CTAs' xbuf merged for columns [c0, c0 + DC), written
    into partial row `first`'s columns; returns (l, m) of the merge.\"\"\"
    M3: gl.constexpr = gl.BlockedLayout([8, 1, 1], [1, 2, 16], [1, NW, 1], [2, 1, 0])
    RL: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, M3))
    s = gl.arange(0, 8, gl.SliceLayout(1, gl.SliceLayout(2, M3)))
    r = gl.arange(0, HALF, RL)
    c = c0 + gl.arange(0, DC, gl.SliceLayout(0, gl.SliceLayout(1, M3)))
    ok = (s < n)[:, None] & (r < G)[None, :]
    rank = gl.minimum(s, n - 1)[:, None] + r[None, :] * 0
    m_s = gl.where(ok, _xs_get((HALF * D + r[None, :] + s[:, None] * 0) * 4, rank), -1.0e30)
    l_s = gl.where(ok, _xs_get((HALF * D + HALF + r[None, :] + s[:, None] * 0) * 4, rank), 0.0)
    off3 = (r[None, :, None] * D + c[None, None, :]) * 4 + s[:, None, None] * 0
    o_s = _xs_get(off3, rank[:, :, None] + c[None, None, :] * 0)
    o_s = gl.where(ok[:, :, None], o_s, 0.0)
    return _merged_cols(m_s, l_s, o_s, part_ptr, q_row, head, splits, first, c0, G, HALF, WP, DC,
                        M3)
"""
_DSMEM_BLOCK = """        ML: gl.constexpr = gl.SliceLayout(0, OL)
        if FINISH == 2:  # the group's partials through the cluster's shared memory
            groups = gl.cdiv(splits, GROUP)
            group = split // GROUP
            in_group = gl.minimum(GROUP, splits - group * GROUP)
            counts = count_ptr + (seq * gl.num_programs(1) + head) * (groups + 1)
            _xs_declare(NW)
            _xs_put(o_all, (ro[None, :] * D + co[:, None]) * 4)
            _xs_put(gl.convert_layout(m_all, ML), (HALF * D + ro) * 4)
            _xs_put(gl.convert_layout(l_all, ML), (HALF * D + HALF + ro) * 4)
            _cluster_sync(split, NW)
            l_c, m_c = _merge_dsmem(part_ptr, q_row, head, splits, group * GROUP, in_group,
                                    split % GROUP * (D // GROUP), G, D, HALF, WP, NW,
                                    D // GROUP)
            _cluster_sync(split, NW)  # the buffers read, every CTA's columns written
            done = split % GROUP
            if done == in_group - 1:
                h_v, sg_v, mean_v = _finish_operands(hvt_ptr, signs_ptr, value_mean_ptr, head,
                                                     L2, D)
                _store_ml(part_ptr, l_c, m_c, q_row, head, splits, group * GROUP, G, HALF, WP,
                          V_PART)
                _cta_barrier()  # one group: its merged row read back to finish it
                o_t, l_m, m_m = _merge(part_ptr, q_row, head, splits, group * GROUP,
                                       (groups == 1).to(gl.int32), 1, G, D, HALF, WP,
                                       V_PART, NW)
                last = groups == 1
                if groups > 1:
"""


def _dsmem(src: str) -> str:
    """cluster_dsmem's group level: from the partial row's store to the groups' counter."""
    a = src.index("        row_base = ((q_row.to(gl.int64) * (G * gl.num_programs(1)) + rows_head)")
    b = src.index('                    top = gl.atomic_add(counts + groups, 1, sem="acq_rel"')
    return src[:a] + _DSMEM_BLOCK + src[b:]


SOURCE_VARIANTS["cluster_dsmem"] = _CLUSTER_GRID + [
    ("\n" + RULE + "# The kernel", _DSMEM_HELPERS + "\n" + RULE + "# The kernel"), "dsmem"]


# cluster_dsmem_relaxed (timing only: not a correct ordering): cluster_dsmem with both cluster
# barriers' arrive relaxed. A release at cluster scope compiles to MEMBAR.ALL.GPU (+ ERRBAR,
# CGAERRBAR; the acquire to CCTL.IVALL), as the served counter's acq_rel atomic does: this says
# how much of the cluster merge is those fences.
SOURCE_VARIANTS["cluster_dsmem_relaxed"] = SOURCE_VARIANTS["cluster_dsmem"] + [
    ('"barrier.cluster.arrive.release.aligned; barrier.cluster.wait.acquire.aligned; "',
     '"barrier.cluster.arrive.relaxed.aligned; barrier.cluster.wait.aligned; "')]


# head_merge: one merge level instead of two where there is more than one merge group. Each
# program adds itself to its sequence and KV head's counter; the last G to arrive each merge one
# query head's partial rows of every split (SC a step) and finish that row. The ones before the
# last wait (bounded) until every split has arrived; a program only waits once at most G - 1
# others of its pair are running or yet to start, which the whole grid's residency guarantees
# where it fits the GPU at once (at most one program an SM here). Against the served group merge
# + groups' counter + last merge (2.1 + 0.9 + 1.8 us at 70B TP8 1x32K): one poll and one merge.
_HEAD_MERGE_HELPERS = """

@gluon.jit
def _merge_head(part_ptr, q_row, head, hq, splits, G: gl.constexpr, D: gl.constexpr,
                WP: gl.constexpr, V_PART: gl.constexpr, NW: gl.constexpr, SC: gl.constexpr):
    \"\"\"(o [D], l) of query head hq's partial rows of every split merged, SC a step (warps
    along the splits, 4 columns a thread).\"\"\"
    SL: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [NW, 1], [1, 0])
    s = gl.arange(0, SC, gl.SliceLayout(1, SL))
    c = gl.arange(0, D, gl.SliceLayout(0, SL))
    rbase = (q_row.to(gl.int64) * (G * gl.num_programs(1)) + head * G + hq) * splits
    m_run = gl.max(gl.full([SC], -1.0e30, gl.float32, gl.SliceLayout(1, SL)), axis=0)
    l_run = m_run * 0.0
    o_run = gl.zeros([D], gl.float32, gl.SliceLayout(0, SL))
    for s0 in range(0, splits, SC):
        ss = s0 + s
        ok = ss < splits
        row = (rbase + ss) * WP
        m_s = gl.load(part_ptr + row + V_PART, mask=ok, other=-1.0e30)
        l_s = gl.load(part_ptr + row + V_PART + 1, mask=ok, other=0.0)
        o_s = gl.load(part_ptr + row[:, None] + c[None, :], mask=ok[:, None], other=0.0)
        m_new = gl.maximum(m_run, gl.max(m_s, axis=0))
        alpha = gl.exp2(m_run - m_new)
        beta = gl.exp2(m_s - m_new)
        l_run = l_run * alpha + gl.sum(l_s * beta, axis=0)
        o_run = o_run * alpha + gl.sum(o_s * beta[:, None], axis=0)
        m_run = m_new
    return o_run, l_run


@gluon.jit
def _finish_head(o, l, q_row, head, hq, out_ptr, stride_ot, stride_oh, h, sg, mean,
                 L2: gl.constexpr, G: gl.constexpr, D: gl.constexpr, NW: gl.constexpr):
    \"\"\"_finish of one row (query head hq): value_mean + signs * ((o / l) @ H_v) / sqrt(D).\"\"\"
    LA2: gl.constexpr = gl.DotOperandLayout(0, L2, 2)
    SL: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [NW, 1], [1, 0])  # _merge_head's
    x = o / gl.maximum(l, 1e-30)
    r16 = gl.arange(0, 16, gl.SliceLayout(1, SL))
    xx = gl.where((r16 == 0)[:, None], x[None, :], 0.0)
    a = gl.convert_layout(xx.to(gl.bfloat16), LA2)
    acc = mma_v2(a, h, gl.zeros([16, D], gl.float32, L2))
    c = gl.arange(0, D, gl.SliceLayout(0, L2))
    r = gl.arange(0, 16, gl.SliceLayout(1, L2))
    res = acc * sg[None, :] + mean[None, :]
    row = out_ptr + q_row.to(gl.int64) * stride_ot + (head * G + hq) * stride_oh
    gl.store(row + r[:, None] * 0 + c[None, :], res.to(out_ptr.dtype.element_ty),
             mask=(r == 0)[:, None])


@gluon.jit
def _merge_heads(counts, splits, part_ptr, q_row, head, out_ptr, stride_ot, stride_oh, hvt_ptr,
                 signs_ptr, value_mean_ptr, L2: gl.constexpr, G: gl.constexpr, D: gl.constexpr,
                 WP: gl.constexpr, V_PART: gl.constexpr, NW: gl.constexpr, SC: gl.constexpr):
    \"\"\"The last G programs of this sequence and KV head to arrive merge one query head each.\"\"\"
    arrived = gl.atomic_add(counts, 1, sem="acq_rel", scope="gpu")
    hq = arrived - (splits - G)
    if hq >= 0:
        h_v, sg_v, mean_v = _finish_operands(hvt_ptr, signs_ptr, value_mean_ptr, head, L2, D)
        n = arrived + 1
        polls = n * 0
        while (n < splits) & (polls < 100000):  # bounded: a bug gives wrong rows, not a hang
            n = gl.atomic_add(counts, 0, sem="acquire", scope="gpu")
            polls += 1
        fin = gl.atomic_add(counts + 1, 1, sem="relaxed", scope="gpu")
        o_h, l_h = _merge_head(part_ptr, q_row, head, hq, splits, G, D, WP, V_PART, NW, SC)
        _finish_head(o_h, l_h, q_row, head, hq, out_ptr, stride_ot, stride_oh, h_v, sg_v,
                     mean_v, L2, G, D, NW)
        if fin == G - 1:  # every merger past its wait: zero again for the next launch
            gl.store(counts, 0)
            gl.store(counts + 1, 0)
"""
SOURCE_VARIANTS["head_merge"] = [
    ("\n" + RULE + "# The kernel", _HEAD_MERGE_HELPERS + "\n" + RULE + "# The kernel"),
    ('            done = gl.atomic_add(counts + group, 1, sem="acq_rel", scope="gpu")\n',
     "            done = split % GROUP\n"
     "            if (groups > 1) & (splits >= 2 * G):\n"
     "                _merge_heads(counts, splits, part_ptr, q_row, head, out_ptr, stride_ot,\n"
     "                             stride_oh, hvt_ptr, signs_ptr, value_mean_ptr, L2, G, D, WP,\n"
     "                             V_PART, NW, 64)\n"
     "                done = split * 0 - 1\n"
     "            else:\n"
     '                done = gl.atomic_add(counts + group, 1, scope="gpu", sem="acq_rel")\n')]
# head_merge128: all of 128 splits in one step (one round trip to the L2, 128 registers of rows)
SOURCE_VARIANTS["head_merge128"] = [SOURCE_VARIANTS["head_merge"][0], (
    SOURCE_VARIANTS["head_merge"][1][0],
    SOURCE_VARIANTS["head_merge"][1][1].replace("V_PART, NW, 64)", "V_PART, NW, 128)"))]


# (served since 2026-12-07 12:00: the partial rows 16-byte aligned (D + 4 words), and the two
# transforms' H matrices loaded by 16-byte loads through shared memory (_h_operand); timed as the
# variants wp132, h_vec and hk_vec: raw results/kv_decode_phases_vec.json and _vec_all.json)


# wht: no H matrix at all. The query transform q~ = x @ H[:, k_perm] and the finish's
# (o / l) @ H_v[v_perm] as Walsh-Hadamard transforms in registers, float32 (log2(D / 4) in-thread
# butterfly stages, two across the 4 lanes of a row by shuffles), instead of an MMA with a
# 32 KB matrix loaded by every program (the query transform) and every merging one (the finish).
# k_perm and v_perm are GF(2)-linear maps of the index bits (A; checked by wht_tables), so
# x @ H[:, A] = WHT(x[A^-T]) (the query gathered, no permutation after) and y @ H[A, :] =
# WHT(y) scattered to the columns A^-T (the output stored where it belongs). The gather and
# scatter indices (wht_tables) go in hk_ptr's and hvt_ptr's places (int32), so the variant needs
# no new argument; WHT_ARGS tells kv_decode_phases to pass them. Not bit-identical to served:
# float32 butterflies instead of bfloat16 operands (the served transform rounds x to bfloat16).
_WHT_HELPERS = """

@gluon.jit
def _wht_rows(x, c, D: gl.constexpr, WL: gl.constexpr):
    \"\"\"The Walsh-Hadamard transform (Sylvester order, unnormalized) of every row of x [M, D] in
    WL (a row's D / 4 consecutive columns in a thread, 4 lanes a row; c: 0 .. D - 1 in
    SliceLayout(0, WL)).\"\"\"
    M: gl.constexpr = x.shape[0]
    C: gl.constexpr = D // 4
    LOGC: gl.constexpr = 5 if D == 128 else 4
    for k in gl.static_range(LOGC):  # (no size-1 dims: tt.split could not infer their layout)
        if k == 0:
            u, v = gl.split(gl.reshape(x, [M, D // 2, 2]))
            x = gl.reshape(gl.join(u + v, u - v), [M, D])
        else:
            y = gl.permute(gl.reshape(x, [M, D // (2 << k), 2, 1 << k]), [0, 1, 3, 2])
            u, v = gl.split(y)
            x = gl.reshape(gl.permute(gl.join(u + v, u - v), [0, 1, 3, 2]), [M, D])
    x = gl.convert_layout(x, WL)
    g = (c // C)[None, :]
    p = gl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 1, 0x1f, -1;", "=f,f", [x],
                                  dtype=gl.float32, is_pure=True, pack=1)
    x = gl.where((g & 1) != 0, p - x, x + p)
    p = gl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 2, 0x1f, -1;", "=f,f", [x],
                                  dtype=gl.float32, is_pure=True, pack=1)
    return gl.where((g & 2) != 0, p - x, x + p)


@gluon.jit
def _finish_operands(hvt_ptr, signs_ptr, value_mean_ptr, head, L2: gl.constexpr,
                     D: gl.constexpr):
    \"\"\"wht: the output columns of the transform's slots (hvt_ptr: the scatter table), and the
    signs / sqrt(D) and the head's value mean at those columns.\"\"\"
    WF: gl.constexpr = gl.BlockedLayout([1, D // 4], [8, 4], [gl.num_warps(), 1], [1, 0])
    oc = gl.load(hvt_ptr + gl.arange(0, D, gl.SliceLayout(0, WF)))
    sg = gl.load(signs_ptr + oc) * (1.0 / (D ** 0.5))
    mean = gl.load(value_mean_ptr + head * D + oc)
    return oc, sg, mean


@gluon.jit
def _finish(o_t, l, q_row, head, out_ptr, stride_ot, stride_oh, oc, sg, mean,
            L2: gl.constexpr, G: gl.constexpr, D: gl.constexpr, HALF: gl.constexpr):
    \"\"\"wht: out rows = value_mean + signs * WHT(o / l) / sqrt(D), each slot's value stored at
    its column oc.\"\"\"
    WF: gl.constexpr = gl.BlockedLayout([1, D // 4], [8, 4], [gl.num_warps(), 1], [1, 0])
    l = gl.convert_layout(l, gl.SliceLayout(1, o_t.type.layout))
    x = gl.convert_layout(o_t / gl.maximum(l, 1e-30)[:, None], WF)  # [HALF, D]
    c = gl.arange(0, D, gl.SliceLayout(0, WF))
    z = _wht_rows(x, c, D, WF)
    r = gl.arange(0, HALF, gl.SliceLayout(1, WF))
    res = z * sg[None, :] + mean[None, :]
    rows = out_ptr + q_row.to(gl.int64) * stride_ot + (head * G + r) * stride_oh
    gl.store(rows[:, None] + oc[None, :], res.to(out_ptr.dtype.element_ty),
             mask=(r < G)[:, None])
"""


def _wht(src: str) -> str:
    """wht's finish in place of the served _finish_operands and _finish."""
    a = src.index("@gluon.jit\ndef _finish_operands(")
    b = src.index("\n" + RULE + "# The kernel")
    return src[:a] + _WHT_HELPERS.lstrip("\n") + "\n" + src[b:]


SOURCE_VARIANTS["wht"] = ["wht", (
    "    x = gl.load(q_ptrs[:, None] + d2[None, :], mask=q_mask2[:, None], other=0.0).to(gl.float32)\n"
    "    sgn = gl.load(signs_ptr + d2)\n"
    "    ksc = gl.load(key_scale_ptr + head * D + d2)\n"
    "    if RAWQ:\n"
    "        x = x * gl.where((r2 >= XH)[:, None], sgn[None, :], (ksc * sgn)[None, :])\n"
    "    else:\n"
    "        x = x * (ksc * sgn)[None, :]\n"
    "    h = _h_operand(hk_ptr, LB2, D, NW)\n"
    "    qt = mma_v2(x.to(gl.bfloat16), h, gl.zeros([16, D], gl.float32, L2))\n",
    "    WQ: gl.constexpr = gl.BlockedLayout([1, D // 4], [8, 4], [NW, 1], [1, 0])\n"
    "    rw = gl.arange(0, 16, gl.SliceLayout(1, WQ))\n"
    "    cw = gl.arange(0, D, gl.SliceLayout(0, WQ))\n"
    "    iw = gl.load(hk_ptr + cw)  # wht: the query's gather table (A^-T)\n"
    "    mw = ((rw % XH) < G) & (rw < (2 * XH if RAWQ else R))\n"
    "    qw = q_ptr + q_row.to(gl.int64) * stride_qt + (head * G + rw % XH) * stride_qh\n"
    "    x = gl.load(qw[:, None] + iw[None, :], mask=mw[:, None], other=0.0).to(gl.float32)\n"
    "    sgn = gl.load(signs_ptr + iw)\n"
    "    ksc = gl.load(key_scale_ptr + head * D + iw)\n"
    "    if RAWQ:\n"
    "        x = x * gl.where((rw >= XH)[:, None], sgn[None, :], (ksc * sgn)[None, :])\n"
    "    else:\n"
    "        x = x * (ksc * sgn)[None, :]\n"
    "    h = x  # wht: no H (the stamps' anchor)\n"
    "    qt = gl.convert_layout(_wht_rows(h, cw, D, WQ), L2)  # the MMA's, as served\n")]
WHT_ARGS = {"wht"}


def wht_tables(d: int, codes: int, device):
    """(gather, scatter) int32 indices of the wht variant: the query's A_k^-T and the output's
    A_v^-T, where A_k, A_v (the kernel's k- and m-slot coordinates, tq_decode_hopper_host) are
    GF(2)-linear maps of the index bits; checked here."""
    import torch

    from vllm_gds.kernels import tq_decode_hopper_host as hh

    out = []
    for perm in hh.slot_maps(d, codes):
        if any(perm[a ^ b] != perm[a] ^ perm[b] for a in range(d) for b in range(d)):
            raise SystemExit("kv_decode_phases: wht: a slot map is not GF(2)-linear")
        images = [perm[1 << t] for t in range(d.bit_length() - 1)]
        inv_t = [next(i for i in range(d)
                      if all(bin(i & im).count("1") % 2 == (s >> t) & 1
                             for t, im in enumerate(images))) for s in range(d)]
        out.append(torch.tensor(inv_t, dtype=torch.int32, device=device))
    return tuple(out)


# part16: the partial rows' o / l in float16 (m and l stay float32 at their words): half the
# bytes the merges read into one SM (the last merge at 70B TP8 1x32K reads 16 groups x 8 rows x
# 128 columns, 64 KB, about 1.5 us, more than one round trip to the L2). o / l (a weighted mean of
# values) is bounded by the values' largest coordinate, far under float16's range; o itself (up
# to the split's tokens times that) is not. Its rounding (2^-11) is below the output's bfloat16
# one. Not bit-identical to served.
_P16 = "part_ptr.to(gl.pointer_type(gl.float16))"
SOURCE_VARIANTS["part16"] = [
    ("        o_s = gl.load(part_ptr + row[:, :, None] + c[None, None, :], mask=mask[:, :, None],\n"
     "                      other=0.0)\n",
     f"        o_s = gl.load({_P16} + (row * 2)[:, :, None] + c[None, None, :],\n"
     "                      mask=mask[:, :, None], other=0.0).to(gl.float32)\n"),
    ("        o_run = o_run * alpha_o[:, None] + gl.sum(o_s * beta[:, :, None], axis=0)\n",
     "        o_run = o_run * alpha_o[:, None] + gl.sum(o_s * (l_s * beta)[:, :, None], axis=0)\n"),
    ("    gl.store(part_ptr + row[:, None] + c[None, :], o, mask=(r < G)[:, None])\n",
     "    l_o = gl.maximum(gl.convert_layout(l, gl.SliceLayout(1, OL)), 1e-30)\n"
     f"    gl.store({_P16} + (row * 2)[:, None] + c[None, :], (o / l_o[:, None]).to(gl.float16),\n"
     "             mask=(r < G)[:, None])\n"),
    ("        gl.store(part_ptr + row_base[None, :] + co[:, None], o_all, mask=(ro < G)[None, :])\n",
     "        l_o = gl.maximum(gl.convert_layout(l_all, gl.SliceLayout(0, OL)), 1e-30)\n"
     f"        gl.store({_P16} + (row_base * 2)[None, :] + co[:, None],\n"
     "                 (o_all / l_o[None, :]).to(gl.float16), mask=(ro < G)[None, :])\n")]
SOURCE_VARIANTS["wht_part16"] = SOURCE_VARIANTS["wht"] + SOURCE_VARIANTS["part16"]
# wht_qseq: wht with the query row taken as the sequence's index (q_seq): once H is not loaded, the
# chain query start -> query is the prologue's longest (cold, at 70B TP8 1x32K: the query 3.1 us
# after the start, H 3.8). A served form would need the host's word that every row is its
# sequence's (a decode batch with at least as many query rows as sequences: vLLM's padded decode
# graphs give the padding rows zero-length queries at rows past the real ones)
SOURCE_VARIANTS["wht_qseq"] = SOURCE_VARIANTS["wht"] + SOURCE_VARIANTS["q_seq"]
SOURCE_VARIANTS["wht_part16_norms"] = (SOURCE_VARIANTS["wht_part16"]
                                       + SOURCE_VARIANTS["norms_ahead"])
WHT_ARGS.update({"wht_part16", "wht_qseq", "wht_part16_norms"})

# kv_end_zero: the lookup's table words made per-thread values from the sequence's length (loaded
# first; a global load's result is per-thread to ptxas) times lut_zero, instead of a CTA-wide
# max (two barriers before any load of the chain length -> block table -> codes)
SOURCE_VARIANTS["kv_end_zero"] = [
    ("    one: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])\n"
     "    lane0 = gl.max(gl.arange(0, 32 * NW, one), axis=0) * lut_zero\n",
     "    kv_end = gl.load(seq_lens_ptr + seq)\n"
     "    lane0 = kv_end * lut_zero\n"),
    _KV_END_OUT,
]


def _move_query_loads(src: str) -> str:
    """The query section's loads (from its comment to H's load) moved before section 0."""
    a = src.index("    # 1. The query, transformed once")
    b = src.index("    h = _h_operand(hk_ptr, LB2, D, NW)")
    b = src.index("\n", b) + 1
    block = src[a:b]
    at = src.index("    # 0. This program's share")
    return src[:at] + block + "\n" + src[at:a] + src[b:]


def _interleave(src: str) -> str:
    """Tiles dealt round-robin (program `split` takes tiles split, split + splits, ...), so the
    first tile's block-table entry needs no sequence length: the entry is loaded at an index
    clamped to the row (stride_bt entries), then zeroed past the sequence. The chain length ->
    block table -> codes (three round trips to memory before the first tile, each a DRAM
    latency after do_bench's L2 flush) becomes max(length, block table) -> codes. The key mean's
    step (splits tiles) is taken in the kernel from its angle (_rope_cos_sin), not the host's."""
    edits = [
        ("    per_split = gl.cdiv(num_tiles, splits)\n    tile_lo = split * per_split\n"
         "    tile_hi = gl.minimum(tile_lo + per_split, num_tiles)\n",
         "    tile_lo = split\n    tile_hi = num_tiles\n", 1),
        ("    for tile in range(tile_lo, tile_hi):\n",
         "    for tile in range(tile_lo, tile_hi, splits):\n", 1),
        ("bt_row, tile_lo + 1,", "bt_row, tile_lo + splits,", 1),
        ("bt_row, tile + 1,", "bt_row, tile + splits,", 1),
        ("bt_row, tile + 2,", "bt_row, tile + 2 * splits,", 1),
        ("def _tile_base(bt_row, tile, kv_end, head, stride_blk,",
         "def _tile_base(bt_row, tile, kv_end, head, stride_blk, bt_last,", 1),
        ("def _tile_codes(cache_ptr, bt_row, tile, kv_end, head, stride_blk,",
         "def _tile_codes(cache_ptr, bt_row, tile, kv_end, head, stride_blk, bt_last,", 1),
        ("    base = _tile_base(bt_row, tile, kv_end, head, stride_blk, W,",
         "    base = _tile_base(bt_row, tile, kv_end, head, stride_blk, bt_last, W,", 1),
        ("    blk = gl.load(bt_row + tok0 // PAGE, mask=tok0 < kv_end, other=0)\n",
         "    blk = gl.load(bt_row + gl.minimum(tok0 // PAGE, bt_last))\n"
         "    blk = gl.where(tok0 < kv_end, blk, 0)\n", 1),
        ("kv_end, head, stride_blk, W1", "kv_end, head, stride_blk, stride_bt - 1, W1", 5),
        ("        c_step = gl.load(mean_step_ptr + jj)[:, None]\n"
         "        s_step = gl.load(mean_step_ptr + gl.num_programs(1) * RH + jj)[:, None]\n"
         "        theta = gl.load(mean_theta_ptr + jj)\n",
         "        theta = gl.load(mean_theta_ptr + jj)\n"
         "        c_step, s_step = _rope_cos_sin((splits * (16 * NW)).to(gl.float64)"
         " * theta.to(gl.float64))\n"
         "        c_step = c_step[:, None]\n        s_step = s_step[:, None]\n", 1),
        ("        c_step = gl.load(mean_step_ptr + jj)\n"
         "        s_step = gl.load(mean_step_ptr + gl.num_programs(1) * RH + jj)\n",
         "        c_step, s_step = _rope_cos_sin((splits * (16 * NW)).to(gl.float64)"
         " * theta.to(gl.float64))\n", 1),
    ]
    for old, new, n in edits:
        if src.count(old) != n:
            raise SystemExit(f"kv_decode_phases: interleave: {old!r} found {src.count(old)} "
                             f"times (expected {n}); update this script to the kernel's source")
        src = src.replace(old, new)
    return src


# ring: the key codes of the next RING tiles in flight by cp.async into a ring of shared-memory
# stages (PREFETCH 1 launches; tq3's PREFETCH 2 as served), instead of one tile ahead in
# registers; the values stay one tile ahead in registers (their stream starts at byte 66 of a
# 132-byte tq4 slot: 2-byte aligned, and cp.async copies 4, 8 or 16 bytes). A stage costs shared
# memory, not registers (two tiles in registers: tq4 out of registers). Each thread reads back
# only the elements it copied (the copy and the load take the same layout); Triton's barrier
# analysis still puts two CTA barriers in each tile. A stage is refilled at the end of the tile
# that read it (its values consumed by then). The next tile's norms are loaded one tile ahead
# (norms_ahead). All copies are waited for after the loop (the compiler may reuse the ring's
# shared memory there). Timed 2026-12-07 15:00: slower at every shape (benchmarks/RESULTS.md).
_RING_HELPERS = """
RING = gl.constexpr(4)  # tiles in flight (a power of two: the ring's shape)


@gluon.jit
def _ring_issue(k_ring, stage, cache_ptr, bt_row, tile, kv_end, head, stride_blk,
                W: gl.constexpr, NW: gl.constexpr, PAGE: gl.constexpr, STRIDE_TOK: gl.constexpr,
                STRIDE_HEAD: gl.constexpr, K_LOAD: gl.constexpr, K_OFF: gl.constexpr,
                K_E: gl.constexpr, K_WORD: gl.constexpr, K_CODES: gl.constexpr):
    base = _tile_base(bt_row, tile, kv_end, head, stride_blk, W, NW, PAGE, STRIDE_TOK,
                      STRIDE_HEAD)
    _async_load(k_ring.index(stage),
                _word_ptrs(cache_ptr, base, K_LOAD, K_OFF, K_E, K_WORD, K_CODES, STRIDE_TOK))
    _acp.commit_group()


"""
_RING_ARGS = ("cache_ptr, bt_row, {t}, kv_end, head, stride_blk, W1, NW, PAGE, STRIDE_TOK,\n"
              "{i}STRIDE_HEAD, K_LOAD, K_OFF, K_E, K_WORD, K_CODES)\n")
_RING_ALLOC = """        RS: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
        if K_WORD == 4:
            k_ring = gl.allocate_shared_memory(gl.int32, [RING, NW, 16, K_E], RS)
        elif K_WORD == 2:
            k_ring = gl.allocate_shared_memory(gl.int16, [RING, NW, 16, K_E], RS)
        else:
            k_ring = gl.allocate_shared_memory(gl.int8, [RING, NW, 16, K_E], RS)
        for i in gl.static_range(RING):
            _ring_issue(k_ring, i, """ + _RING_ARGS.format(t="tile_lo + i", i=" " * 24) + """\
        base = _tile_base(bt_row, tile_lo, kv_end, head, stride_blk, W1, NW, PAGE, STRIDE_TOK,
                          STRIDE_HEAD)
        kn_n, vn_n, ok_n = _load_norms(cache_ptr, base, tile_lo, kv_end, TOKS, K_NORM_OFF,
                                       V_NORM_OFF, NW, STRIDE_TOK)
        vw = _load_words(cache_ptr, base, V_LOAD, V_OFF, V_E, V_WORD, V_CODES, STRIDE_TOK)
        kw = vw  # the stamps' first-codes anchor: the first values
"""


def _ring(src: str, late: bool = False) -> str:
    """late: the ring's first copies issued after the query transform's H is loaded, not before
    the query (a copy waits for its block-table entry, and the loads after it in program order
    with it: ring's query arrived 5.4 us after the start against served's 3.1)."""
    head = ("    if PREFETCH:\n"
            "        base, kw, vw = _tile_codes(\n"
            "            cache_ptr, bt_row, tile_lo, kv_end, head, stride_blk, W1, NW, PAGE, STRIDE_TOK,\n"
            "            STRIDE_HEAD, K_LOAD, K_OFF, K_E, K_WORD, K_CODES, V_LOAD, V_OFF, V_E, V_WORD, V_CODES)\n")
    if late:
        src = replace_once(src, head, head.replace("    if PREFETCH:\n", "    if PREFETCH == 2:\n"),
                           "ring")
        h = "    h = _h_operand(hk_ptr, LB2, D, NW)\n"
        src = replace_once(src, h, h + "    if PREFETCH == 1:\n" + _RING_ALLOC, "ring")
    else:
        src = replace_once(src, head, "    if PREFETCH == 1:\n" + _RING_ALLOC
                           + head.replace("    if PREFETCH:\n", "    if PREFETCH == 2:\n"), "ring")
    loop = ("        if PREFETCH:\n"
            "            kw_now = kw\n"
            "            vw_now = vw\n"
            "            base_now = base\n"
            "            if PREFETCH == 2:")
    src = replace_once(src, loop, (
        "        if PREFETCH == 1:\n"
        "            stage = (tile - tile_lo) % RING\n"
        "            kn, vn, ok = kn_n, vn_n, ok_n\n"
        "            base = _tile_base(bt_row, tile + 1, kv_end, head, stride_blk, W1, NW, PAGE,\n"
        "                              STRIDE_TOK, STRIDE_HEAD)\n"
        "            kn_n, vn_n, ok_n = _load_norms(cache_ptr, base, tile + 1, kv_end, TOKS,\n"
        "                                           K_NORM_OFF, V_NORM_OFF, NW, STRIDE_TOK)\n"
        "            vw_now = vw\n"
        "            vw = _load_words(cache_ptr, base, V_LOAD, V_OFF, V_E, V_WORD, V_CODES,\n"
        "                             STRIDE_TOK)\n"
        "            _acp.wait_group(RING - 1)\n"
        "            kw_now = k_ring.index(stage).load(K_LOAD)\n"
        "        elif PREFETCH:\n"
        "            kw_now = kw\n"
        "            vw_now = vw\n"
        "            base_now = base\n"
        "            if PREFETCH == 2:"), "ring")
    src = replace_once(src, (
        "        kn, vn, ok = _load_norms(cache_ptr, base_now, tile, kv_end, TOKS, K_NORM_OFF,\n"
        "                                 V_NORM_OFF, NW, STRIDE_TOK)\n"), (
        "        if PREFETCH != 1:\n"
        "            kn, vn, ok = _load_norms(cache_ptr, base_now, tile, kv_end, TOKS, K_NORM_OFF,\n"
        "                                     V_NORM_OFF, NW, STRIDE_TOK)\n"), "ring")
    src = replace_once(src, "        o = mma_v2(va, pb, o * gl.expand_dims(alpha, 1))\n", (
        "        o = mma_v2(va, pb, o * gl.expand_dims(alpha, 1))\n"
        "        if PREFETCH == 1:  # this stage read: refill it with tile + RING\n"
        "            _ring_issue(k_ring, stage, "
        + _RING_ARGS.format(t="tile + RING", i=" " * 24)), "ring")
    src = replace_once(src, "    l_i = gl.sum(l_t, axis=1)\n",
                       "    if PREFETCH == 1:\n        _acp.wait_group(0)\n"
                       "    l_i = gl.sum(l_t, axis=1)\n", "ring")
    src = replace_once(src, "from triton.experimental.gluon.language.nvidia.ampere import mma_v2\n",
                       "from triton.experimental.gluon.language.nvidia.ampere import mma_v2\n"
                       "from triton.experimental.gluon.language.nvidia.ampere import async_copy as _acp\n"
                       "_async_load = getattr(_acp, 'async_load', None) or "
                       "_acp.async_copy_global_to_shared\n", "ring")
    # _word_ptrs: _load_words without its load (the copy's source pointers)
    lw = src[src.index("@gluon.jit\ndef _load_words("):src.index("@gluon.jit\ndef _tile_codes(")]
    wp = replace_once(lw.replace("def _load_words(", "def _word_ptrs("), "    return gl.load(ptrs)\n",
                      "    return ptrs\n", "ring")
    a = src.index("@gluon.jit\ndef _load_norms(")
    return src[:a] + _RING_HELPERS.lstrip("\n") + wp + src[a:]


SOURCE_VARIANTS["ring"] = ["ring"]
SOURCE_VARIANTS["ring2"] = ["ring", ("RING = gl.constexpr(4)", "RING = gl.constexpr(2)")]
SOURCE_VARIANTS["ring_late"] = ["ring_late"]
SOURCE_VARIANTS["ring2_late"] = ["ring_late", ("RING = gl.constexpr(4)", "RING = gl.constexpr(2)")]
SOURCE_VARIANTS["wht_part16_ring"] = SOURCE_VARIANTS["wht_part16"] + ["ring"]
WHT_ARGS.add("wht_part16_ring")


def replace_once(src: str, old: str, new: str, what: str) -> str:
    if src.count(old) != 1:
        raise SystemExit(f"kv_decode_phases: {what}: {old!r} found {src.count(old)} times in "
                         "kernels/tq_decode_hopper.py; update this script to the kernel's source")
    return src.replace(old, new)


def variant_source(variant: str) -> str:
    from vllm_gds.kernels import tq_decode_hopper as tdh

    src = Path(tdh.__file__).read_text()
    for edit in SOURCE_VARIANTS[variant]:
        if edit == "move_query_loads":
            src = _move_query_loads(src)
        elif edit == "interleave":
            src = _interleave(src)
        elif edit == "dsmem":
            src = _dsmem(src)
        elif edit == "wht":
            src = _wht(src)
        elif edit in ("ring", "ring_late"):
            src = _ring(src, late=edit == "ring_late")
        elif edit[0] == "ALL":  # ("ALL", old, new, how many times old is found)
            if src.count(edit[1]) != edit[3]:
                raise SystemExit(f"kv_decode_phases: {variant}: {edit[1]!r} found "
                                 f"{src.count(edit[1])} times (expected {edit[3]})")
            src = src.replace(edit[1], edit[2])
        else:
            src = replace_once(src, *edit, variant)
    return src


def cluster_launcher(kernel, grid, args, kw):
    """The cluster variants' launch: `kernel` compiled for these arguments without a run
    (warmup), then launched with clusters of CLUSTER CTAs along x (the compiled kernel's
    num_ctas, which Triton's launcher turns into the cluster dimension and multiplies the grid's
    x by): grid (sequences, heads, splits) as (splits // CLUSTER, heads, sequences)."""
    from vllm_gds.kernels.launch import CachedLaunch

    seqs, heads, splits = grid
    if splits % CLUSTER:
        raise ValueError(f"{splits} splits: the cluster variants need a multiple of {CLUSTER}")
    compiled = kernel.warmup(*args, grid=(splits, heads, seqs), **kw)
    compiled._init_handles()
    md = compiled.metadata
    compiled.packed_metadata = (md.num_warps, CLUSTER, md.shared)
    consts = CachedLaunch(kernel).const_values(kw)
    return lambda *a: compiled[(splits // CLUSTER, heads, seqs)](*a, *consts)

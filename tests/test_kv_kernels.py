"""The Triton kernels of the quantized KV cache against the torch reference, in the CPU interpreter.

Every check draws random inputs (seeded per test, see `_seeded`), poisons what the kernel writes
(0xAB cache bytes, NaN outputs) and covers several page sizes, ragged sequence lengths, GQA ratios
1, 3 and 8 and head sizes 64 and 128. Grids stay tiny: an interpreted attention program costs tens
of milliseconds. Over 400 lines: the store's and the attention's checks share the reference
helpers and seeded inputs at the top and the PTX interpreter (_run_ptx, which
test_kv_hopper_compile.py imports from here).
"""

import importlib
import os

import pytest
import torch

from vllm_gds.kernels import AttentionTuning, StoreTuning, tq_attention, tq_store
from vllm_gds.kernels import fast_path
from vllm_gds.kvcache.formats import FORMATS, KVFormat, VectorCode
from vllm_gds.kvcache.quantizer import Encoded, KVLayerQuantizer
from vllm_gds.kvcache.slot_layout import SlotLayout
from vllm_gds.kvcache.tables import LayerTables

POISON = 0xAB
LAYER, SEED = 3, 11

# The offered formats plus codes that exercise every kernel path: 2..5 bits, extra-bit
# coordinates (two streams), each norm rule, 5-byte units (int64).
FORMAT_CASES = {
    **FORMATS,
    "k3+16/v2+8": KVFormat("x1", key=VectorCode(3, extra=16), value=VectorCode(2, extra=8, norm="unit")),
    "k5/v3": KVFormat("x2", key=VectorCode(5, norm="plain"), value=VectorCode(3)),
}


@pytest.fixture(autouse=True)
def _seeded(request):
    """A seed per test, from its name. The store is compared byte for byte, and a coordinate that
    lands within float rounding of a codebook threshold may legitimately get the neighbouring code
    when the kernel sums in another order than torch (6 in a million bytes at full size on the
    GPU, benchmarks/RESULTS.md); unseeded inputs made that a rare, random failure."""
    torch.manual_seed(sum(request.node.name.encode()))


def _calibration(h, d, calibrated):
    """Pre-RoPE key mean (RoPE on all channels at d = 128, on 48 of 64 with attention scaling
    at d = 64), key scale (pair-equal), value mean and key weight."""
    if not calibrated:
        return {}
    r = d if d >= 128 else d - 16
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, r, 2).float() / r)
    scale = torch.rand(h, d) + 0.5
    scale[:, r // 2 : r] = scale[:, : r // 2]
    return dict(key_mean=torch.randn(h, d), key_scale=scale, value_mean=torch.randn(h, d) * 0.1,
                key_weight=torch.rand(h, d), rope_inv_freq=inv_freq,
                rope_attention_scaling=1.0 if r == d else 1.1)


def _pair(fmt, d, h, calibrated, mean_pairs=None):
    cal = _calibration(h, d, calibrated)
    if mean_pairs is not None:  # the key mean kept on mean_pairs[head] RoPE pairs only
        r = cal["rope_inv_freq"].numel()
        keep = torch.zeros(h, d, dtype=torch.bool)
        for head, pairs in enumerate(mean_pairs):
            keep[head, pairs] = True
            keep[head, [p + r for p in pairs]] = True
        cal["key_mean"] = torch.where(keep, cal["key_mean"], 0.0)
    lq = KVLayerQuantizer(fmt, d, LAYER, SEED, **cal)
    tables = LayerTables(fmt, d, LAYER, SEED, "cpu", torch.float32, h, **cal)
    return lq, tables


def _keys_values(t, h, d, lq=None, positions=None):
    """Keys around RoPE_p(key mean) where lq has one (else around 0), a tenth of them far off
    (large norm, another direction: the raw-key fallback takes some), and values."""
    k = torch.randn(t, h, d) * (1 + 4 * (torch.rand(t, h, 1) < 0.1))
    if lq is not None and lq.key_mean is not None:
        k = k * 0.3 + lq.key_mean_at(positions)
    return k, torch.randn(t, h, d)


def _norm_bytes(n):
    return n.contiguous().view(torch.int16).unsqueeze(-1).view(torch.uint8)


def _reference_slots(lq, k, v, positions):
    ek, ev = lq.encode_keys(k, positions), lq.encode_values(v)
    return torch.cat([ek.codes, _norm_bytes(ek.norms), ev.codes, _norm_bytes(ev.norms)], -1)


def _decode_slots(lq, layout, slots, positions):
    kn, vn = layout.key.norm_offset, layout.value.norm_offset

    def norm(off):
        return slots[..., off : off + 2].contiguous().view(torch.float16).squeeze(-1)

    k = lq.decode_keys(Encoded(slots[..., :kn].contiguous(), norm(kn)), positions)
    v = lq.decode_values(Encoded(slots[..., kn + 2 : vn].contiguous(), norm(vn)))
    return k.double(), v.double()


@pytest.mark.parametrize("name", list(FORMAT_CASES))
@pytest.mark.parametrize("d, page, calibrated", [(64, 16, True), (128, 32, False), (64, 64, True)])
def test_store_writes_the_reference_bytes(name, d, page, calibrated):
    fmt = FORMAT_CASES[name]
    h, t = 2, 21
    lq, tables = _pair(fmt, d, h, calibrated)
    positions = torch.randint(0, 1 << 17, (t,))  # large angles too
    k, v = _keys_values(t, h, d, lq, positions)
    num_blocks = 3
    cache = torch.full((num_blocks, page, h, tables.layout.slot_bytes), POISON, dtype=torch.uint8)
    slots = torch.randperm(num_blocks * page)[:t]
    slots[5] = -1  # vLLM's padding token: written nowhere
    tq_store(k, v, cache, slots, tables, positions, tuning=StoreTuning(block_t=16))

    flat = cache.view(-1, h, tables.layout.slot_bytes)
    written = slots >= 0
    got = flat[slots[written]]
    want = _reference_slots(lq, k[written], v[written], positions[written])
    assert torch.equal(got, want), f"{(got != want).sum()} of {got.numel()} bytes differ"
    untouched = torch.ones(num_blocks * page, dtype=torch.bool)
    untouched[slots[written]] = False
    assert (flat[untouched] == POISON).all()


@pytest.mark.parametrize("name", ["tq4", "tq3", "k3+16/v2+8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("d, calibrated", [(64, True), (128, False)])
def test_store_gpu_dots_match_the_reference(name, dtype, d, calibrated):
    """The GPU's rotation (split=1: exact 16-bit dots, a value mean taken off after the rotation,
    float32 split in two float16 parts) run by the interpreter. float16 stands in for the GPU's
    bfloat16 (the interpreter's bfloat16 dot is wrong); a coordinate within rounding of a
    threshold may take the neighbouring code (another summation order), so a few bytes may differ."""
    fmt = FORMAT_CASES[name]
    h, t, page = 2, 40, 16
    lq, tables = _pair(fmt, d, h, calibrated)
    positions = torch.randint(0, 1 << 17, (t,))
    k, v = _keys_values(t, h, d, lq, positions)
    k, v = k.to(dtype), v.to(dtype)
    cache = torch.full((3, page, h, tables.layout.slot_bytes), POISON, dtype=torch.uint8)
    slots = torch.randperm(3 * page)[:t]
    tq_store(k, v, cache, slots, tables, positions, tuning=StoreTuning(block_t=32, split=1))
    got = cache.view(-1, h, tables.layout.slot_bytes)[slots]
    want = _reference_slots(lq, k.float(), v.float(), positions)
    assert (got != want).sum() <= 2, f"{(got != want).sum()} of {got.numel()} bytes differ"



@pytest.mark.parametrize("name", ["tq4", "tq3"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("split", [0, 1])
def test_store_fallback_variants_write_the_reference_bytes(name, d, split):
    """The raw-key fallback's code paths (tq_store's chunks, sym) store the same bytes: the
    chunked Walsh-Hadamard rotation (the default: the bucketed code search, the next head's keys
    and values prefetched, the values rotated by exact 16-bit dots first; and without them),
    full-width dots with H, and the signed columns; split 1 with float16 inputs as the GPU runs."""
    fmt = FORMATS[name]
    h, t, page = 2, 24, 16
    lq, tables = _pair(fmt, d, h, True)
    positions = torch.randint(0, 1 << 17, (t,))
    k, v = _keys_values(t, h, d, lq, positions)
    if split:
        k, v = k.half(), v.half()
    want = _reference_slots(lq, k.float(), v.float(), positions)
    for launch in ({}, dict(codes=0, prefetch=False, exact_rot=False), dict(chunks=False),
                   dict(sym=False)):
        cache = torch.full((2, page, h, tables.layout.slot_bytes), POISON, dtype=torch.uint8)
        slots = torch.randperm(2 * page)[:t]
        tq_store(k, v, cache, slots, tables, positions,
                 tuning=StoreTuning(block_t=16, split=split, **launch))
        got = cache.view(-1, h, tables.layout.slot_bytes)[slots]
        assert (got != want).sum() <= (2 if split else 0), (launch, (got != want).sum().item())

def _paged(lq, layout, h, d, seq_lens, page):
    """A paged cache holding the reference's coding of random K/V, and their decodings."""
    blocks = [-(-s // page) for s in seq_lens]
    perm = torch.randperm(sum(blocks) + 2)
    block_table = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    cache = torch.full((perm.numel(), page, h, layout.slot_bytes), POISON, dtype=torch.uint8)
    ks, vs = [], []
    at = 0
    for i, s in enumerate(seq_lens):
        block_table[i, : blocks[i]] = perm[at : at + blocks[i]]
        at += blocks[i]
        pos = torch.arange(s)
        k, v = _keys_values(s, h, d, lq, pos)
        slots = _reference_slots(lq, k, v, pos)
        cache[block_table[i, pos // page].long(), pos % page] = slots
        kd, vd = _decode_slots(lq, layout, slots, pos)
        ks.append(kd)
        vs.append(vd)
    return cache, block_table, ks, vs


def _attention_reference(q, ks, vs, seq_lens, q_lens, scale):
    out, start = [], 0
    for k, v, s, ql in zip(ks, vs, seq_lens, q_lens):
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        scores = torch.einsum("qhd,khd->hqk", q[start : start + ql].double(), k) * scale
        q_pos = s - ql + torch.arange(ql)
        visible = torch.arange(s)[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~visible[None], float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
        start += ql
    return torch.cat(out)


def _run_attention(fmt, d, h, g, seq_lens, q_lens, page, splits=None, calibrated=True,
                   mean_pairs=None):
    lq, tables = _pair(fmt, d, h, calibrated, mean_pairs)
    if mean_pairs is not None:
        assert tables.rot_half_pad == 16 and (tables.mean_theta != 0).sum() == sum(map(len, mean_pairs))
    cache, block_table, ks, vs = _paged(lq, tables.layout, h, d, seq_lens, page)
    q = torch.randn(sum(q_lens), h * g, d)
    query_start = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    scale = d**-0.5
    tq_attention(q, cache, block_table, torch.tensor(seq_lens, dtype=torch.int32), query_start,
                 tables, scale, out, max_query_len=max(q_lens), tuning=AttentionTuning(splits=splits))
    ref = _attention_reference(q, ks, vs, seq_lens, q_lens, scale)
    assert not out.isnan().any()
    err = (out.double() - ref).norm() / ref.norm()
    assert err < 1e-5, err


@pytest.mark.parametrize(
    "name, d, h, g, page, splits",
    [
        ("tq4", 128, 1, 8, 16, 1),
        ("tq4", 64, 2, 3, 32, 3),
        ("tq4", 64, 2, 3, 16, 8),  # the reduce on one row a program (REDUCE_ROW_SPLITS)
        ("tq3", 64, 2, 1, 16, 2),
        ("k3+16/v2+8", 64, 1, 3, 16, 1),
        ("k5/v3", 128, 1, 1, 32, 2),
        ("tq5", 64, 2, 4, 16, 2),
    ],
)
def test_decode_matches_reference(name, d, h, g, page, splits):
    seq_lens = [int(x) for x in torch.randint(1, 50, (3,))]  # ragged, fresh each run
    _run_attention(FORMAT_CASES[name], d, h, g, seq_lens, [1] * len(seq_lens), page, splits)


@pytest.mark.parametrize("d", [64, 128])
def test_decode_with_a_sparse_key_mean(d):
    """A key mean kept on a few RoPE pairs (other pairs per head) is scored on those pairs only."""
    seq_lens = [int(x) for x in torch.randint(20, 80, (2,))]
    _run_attention(FORMATS["tq4"], d, 2, 3, seq_lens, [1, 1], 16, 2,
                   mean_pairs=[[0, 5, 17], [2, 23]])


def test_decode_past_the_key_mean_anchor():
    """Over 32 tiles in one program: the key mean's stepped [A', B'] is made exact again
    (tq_attention_kernel.MEAN_ANCHOR) and the scores stay the reference's."""
    seq_lens = [int(torch.randint(16 * 33, 16 * 40, ()))]
    _run_attention(FORMATS["tq4"], 64, 1, 4, seq_lens, [1], 16, 1)


def test_decode_and_prefill_on_pages_of_64():
    """vLLM 0.34's default block size: pages of 64 tokens, sequences across page boundaries."""
    seq_lens = [int(x) for x in torch.randint(65, 140, (2,))]
    _run_attention(FORMATS["tq4"], 64, 1, 2, seq_lens, [1, 1], 64, 2)
    _run_attention(FORMATS["tq4"], 64, 1, 2, [70, 9], [3, 9], 64)


@pytest.mark.parametrize(
    "name, d, h, g, page",
    [("tq4", 64, 1, 3, 16), ("tq3", 128, 1, 8, 32), ("k3+16/v2+8", 64, 2, 1, 16)],
)
def test_chunked_prefill_matches_reference(name, d, h, g, page):
    # A fresh prompt, a continued chunk after a prefix-cache hit, and a decode row in one batch.
    q_lens = [int(torch.randint(2, 9, ())), int(torch.randint(2, 9, ())), 1]
    seq_lens = [q_lens[0], q_lens[1] + int(torch.randint(5, 30, ())), int(torch.randint(3, 20, ()))]
    _run_attention(FORMAT_CASES[name], d, h, g, seq_lens, q_lens, page)


def _stored_tq4(calibrated, d=64, h=1, seq_len=19, page=16):
    """tq4 tables and a two-page cache (pages [1, 0]) holding seq_len stored keys and values."""
    lq, tables = _pair(FORMATS["tq4"], d, h, calibrated)
    pos = torch.arange(seq_len)
    k, v = _keys_values(seq_len, h, d, lq, pos)
    cache = torch.full((2, page, h, tables.layout.slot_bytes), POISON, dtype=torch.uint8)
    block_table = torch.tensor([[1, 0]], dtype=torch.int32)
    tq_store(k, v, cache, (block_table[0, pos // page] * page + pos % page).long(), tables,
             positions=pos)
    return lq, tables, k, v, pos, cache, block_table


@pytest.mark.parametrize("calibrated", [False, True])
def test_store_then_attend(calibrated):
    """What the store kernel writes is what the attention kernel reads (with calibration: the
    key mean centred at the positions given to the store, scored at the cache positions)."""
    lq, tables, k, v, pos, cache, block_table = _stored_tq4(calibrated)
    d, h, g, seq_len = 64, 1, 3, 19
    q = torch.randn(1, h * g, d)
    out = tq_attention(q, cache, block_table, torch.tensor([seq_len], dtype=torch.int32),
                       torch.tensor([0, 1], dtype=torch.int32), tables, d**-0.5, max_query_len=1)
    kd, vd = _decode_slots(lq, tables.layout, _reference_slots(lq, k, v, pos), pos)
    ref = _attention_reference(q, [kd], [vd], [seq_len], [1], d**-0.5)
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


def test_slot_layout_matches_format_bytes():
    for fmt in FORMAT_CASES.values():
        for d in (64, 128):
            layout = SlotLayout.of(fmt, d)
            assert layout.slot_bytes == fmt.slot_bytes(d)
            assert layout.value.a.offset == fmt.key.vector_bytes(d)


def _run_ptx(asm: str, regs: dict) -> dict:
    """A tiny interpreter for the straight-line b32 PTX of tq_lut4 (the CPU cannot run inline asm)."""
    m32 = 0xFFFFFFFF

    def val(x):
        return regs[x] if x in regs else int(x, 0)

    def prmt(a, b, c):
        src = (b << 32) | a
        out = 0
        for k in range(4):
            sel = (c >> (4 * k)) & 0xF
            byte = (src >> (8 * (sel & 7))) & 0xFF
            if sel & 8:  # sign-replicate mode
                byte = 0xFF if byte & 0x80 else 0
            out |= byte << (8 * k)
        return out

    ops = {
        "mov.b32": lambda a: a, "not.b32": lambda a: ~a & m32,
        "shr.b32": lambda a, b: a >> b, "shl.b32": lambda a, b: (a << b) & m32,
        "and.b32": lambda a, b: a & b, "or.b32": lambda a, b: a | b, "xor.b32": lambda a, b: a ^ b,
        "mul.lo.u32": lambda a, b: (a * b) & m32, "mad.lo.u32": lambda a, b, c: (a * b + c) & m32,
        "prmt.b32": prmt,
        "lop3.b32": lambda a, b, c, lut: sum(  # bit i of lut: the result for (a, b, c) = i's bits
            (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c) & m32
            for i in range(8) if lut >> i & 1),
    }
    for stmt in asm.replace("\n", " ").split(";"):
        stmt = stmt.strip(" {}")
        if not stmt or stmt.startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        dst, *srcs = [a.strip() for a in args.split(",")]
        regs[dst] = ops[op](*map(val, srcs))
    return regs


@pytest.mark.parametrize("d", [64, 128])
def test_levels4_asm_looks_up_every_code(d):
    """The GPU-only 4-bit lookup (kernels/tq_lut4.py, its PTX from kvcache/lut4_ptx.py), run on a PTX interpreter, equals the bf16
    codebook table for random registers of two int16 elements; output j holds phase j (code 4e+j)
    of element 0 in its low and of element 1 in its high half."""
    from vllm_gds.kvcache.lut4_ptx import levels4_asm
    from vllm_gds.kvcache.codebook import codebook

    levels = codebook(d, 4)[0]
    table = levels.to(torch.bfloat16).view(torch.int16).tolist()
    asm = levels4_asm(levels)
    for w in [0, 0xFFFFFFFF, 0x76543210, 0xFEDCBA98, *torch.randint(0, 2**32, (64,)).tolist()]:
        out = _run_ptx(asm, {"$4": w})
        for j in range(4):
            for elem in range(2):
                code = (w >> (16 * elem + 4 * j)) & 15
                got = (out[f"${j}"] >> (16 * elem)) & 0xFFFF
                assert got == table[code] & 0xFFFF, (hex(w), j, elem, code)


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_decode_split_counts_match_reference(splits):
    """The context split across 1, 3 and 8 programs (8 > the tiles of the shorter sequences: those
    splits stay empty) and merged by the reduce, 8 in one step (tq_attention.reduce_chunk)."""
    seq_lens = [int(torch.randint(60, 130, ())), int(torch.randint(1, 20, ()))]
    _run_attention(FORMATS["tq4"], 64, 1, 8, seq_lens, [1, 1], 16, splits)


def test_split_count_is_decided_from_the_batch_shape():
    """2 * SMs programs rounded up to a power of two, capped; never depends on the context."""
    from vllm_gds.kernels.tq_attention import (HOPPER_MAX_SPLITS, MAX_SPLITS, reduce_chunk,
                                               split_count)

    assert split_count(32, 8, 132) == 2  # 264 / 256 -> 2: 512 programs
    assert split_count(64, 8, 132) == 1
    assert split_count(8, 1, 132) == min(64, MAX_SPLITS)
    assert split_count(1, 1, 132) == MAX_SPLITS
    assert split_count(1, 1, 132, max_splits=512) == 512
    assert split_count(1024, 8, 132) == 1
    # the Hopper kernel (2 programs resident per SM): one wave, rounded down to a power of two
    assert split_count(32, 8, 132, resident=2) == 1  # 256 programs
    assert split_count(32, 1, 132, resident=2) == 8  # 264 / 32 -> 8: 256 programs
    assert split_count(8, 1, 132, resident=2) == 32
    assert split_count(1, 8, 132, resident=2) == 32
    assert split_count(1, 1, 132, resident=2) == MAX_SPLITS
    assert split_count(1, 1, 132, HOPPER_MAX_SPLITS, resident=2) == 128  # 264 -> 256, capped
    assert split_count(2, 1, 132, HOPPER_MAX_SPLITS, resident=2) == 128
    assert split_count(1024, 8, 132, resident=2) == 1
    assert [reduce_chunk(s) for s in (1, 2, 3, 8, 64)] == [1, 2, 4, 8, 8]
    # fewer query heads, more partials a step (the same registers)
    assert [reduce_chunk(64, rows) for rows in (8, 4, 2, 1)] == [16, 32, 64, 64]
    assert reduce_chunk(3, 1) == 4


def test_launch_plans_are_made_once_per_tables_and_go_with_them():
    """The launchers' memo (kernels/launch_plans.py): one plan per (tables, key), made on first
    use, and dropped with the tables (keyed by id, so a stale entry could serve new tables)."""
    import gc

    from vllm_gds.kernels.launch_plans import LaunchPlans

    made = []
    plans = LaunchPlans(lambda tables, *key: made.append(key) or object())
    tables = LayerTables(FORMATS["tq4"], 64, LAYER, SEED, "cpu", torch.float32)
    first = plans.get(tables, (1, None))
    assert plans.get(tables, (1, None)) is first and plans.get(tables, (2, None)) is not first
    assert made == [(1, None), (2, None)]
    del tables
    gc.collect()
    assert plans._by_tables == {}


@pytest.mark.parametrize("calibrated", [False, True])
def test_relaunch_covers_every_constexpr_of_the_served_plans(calibrated):
    """CachedLaunch relaunches a compiled kernel with its plan's constexprs in signature order, the
    kernel's defaults where the plan leaves one out: every served plan (store, decode with splits,
    reduce, prefill) must give a value for each, or the GPU relaunch fails (it did once: NO_CB)."""
    from vllm_gds.kernels import tq_attention as attention_mod
    from vllm_gds.kernels.launch import CachedLaunch, _spec

    attention = importlib.import_module("vllm_gds.kernels.tq_attention")
    store = importlib.import_module("vllm_gds.kernels.tq_store")
    _, tables, _, _, _, cache, block_table = _stored_tq4(calibrated)
    d, h, g, seq_len = 64, 1, 3, 19
    lens = torch.tensor([seq_len], dtype=torch.int32)
    for q_len, splits in ((1, 2), (3, None)):
        q = torch.randn(q_len, h * g, d)
        attention_mod(q, cache, block_table, lens, torch.tensor([0, q_len], dtype=torch.int32),
                      tables, d**-0.5, max_query_len=q_len,
                      tuning=AttentionTuning(splits=splits) if splits else None)
    checked = 0
    for module, kernels in ((store, [("_tq_store_kernel", "kwargs")]),
                            (attention, [("_tq_attention_kernel", "kwargs"),
                                         ("_tq_reduce_kernel", "reduce_kwargs")])):
        for plan in module._LAUNCHES._by_tables[id(tables)].values():
            for name, meta in kernels:
                launch = CachedLaunch(getattr(module, name))
                values = launch.const_values(getattr(plan, meta))
                assert len(values) == len(launch._const_names) > 5
                checked += 1
    assert checked == 5  # store; decode and prefill, each with its reduce
    # the key tells apart what Triton specializes on
    x = torch.zeros(9, dtype=torch.bfloat16)
    assert _spec(x) != _spec(x[1:]) and _spec(16) != _spec(8) != _spec(1)
    with pytest.raises(TypeError, match="neither given nor defaulted"):
        CachedLaunch(attention._tq_reduce_kernel).const_values({})

# The Hopper decode's dispatch (kernels/tq_attention.py): the decision, the CPU path, the log.


def test_decode_path_takes_hopper_only_on_sm90_with_gluon_and_a_supported_layout():
    from vllm_gds.kernels.fast_path import hopper_path

    def decode_path(capability, gluon_error, unsupported):  # as tq_attention's plan decides
        return hopper_path(capability, gluon_error, unsupported, "kernel")

    assert decode_path((9, 0), None, None) == (True, "Hopper fast path (Gluon, sm_90)")
    for cap in ((8, 0), (8, 9), (10, 0), (12, 0)):  # checked on sm_90 only
        use, path = decode_path(cap, None, None)
        assert not use and f"sm_{cap[0]}{cap[1]}" in path, path
    use, path = decode_path((9, 0), "ModuleNotFoundError: No module named 'triton.experimental.gluon'",
                            None)
    assert not use and "no Gluon" in path and "triton.experimental.gluon" in path
    use, path = decode_path((9, 0), None, "head size 96 (64 and 128 only)")
    assert (use, path) == (False, "portable Triton kernel (head size 96 (64 and 128 only))")
    assert decode_path(None, None, None) == (False, "portable Triton kernel (not a CUDA device)")


def _decode_case(fmt="tq4", d=64, h=1, g=2, seq_lens=(5, 19)):
    lq, tables = _pair(FORMATS[fmt], d, h, True)
    cache, block_table, ks, vs = _paged(lq, tables.layout, h, d, list(seq_lens), 16)
    q = torch.randn(len(seq_lens), h * g, d)
    qsl = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    ref = _attention_reference(q, ks, vs, list(seq_lens), [1] * len(seq_lens), d**-0.5)
    return (q, cache, block_table, sl, qsl, tables), ref


def test_decode_on_cpu_takes_the_portable_kernel_and_logs_it_once(caplog, monkeypatch):
    import sys

    ta = sys.modules["vllm_gds.kernels.tq_attention"]
    monkeypatch.setattr(fast_path, "LOGGED", set())  # earlier tests logged the CPU line already
    args, ref = _decode_case()
    tables = args[-1]
    assert tables.hopper_asm is not None  # LayerTables attaches the Hopper tables itself
    caplog.set_level("INFO", logger="vllm_gds.kernels")
    for _ in range(2):
        out = tq_attention(*args, 64**-0.5, max_query_len=1)
        assert (out.double() - ref).norm() / ref.norm() < 1e-5
    lines = [r.getMessage() for r in caplog.records if r.name == "vllm_gds.kernels"]
    assert lines == ["tq4 decode: portable Triton kernel (not a CUDA device)"], lines
    plans = ta._LAUNCHES._by_tables[id(tables)]
    assert [p.hopper for p in plans.values()] == [False]  # decided once, on the plan
    tq_attention(*args, 64**-0.5, max_query_len=1, tuning=AttentionTuning(hopper=False))
    lines = [r.getMessage() for r in caplog.records if r.name == "vllm_gds.kernels"]
    assert lines[1:] == ["tq4 decode: portable Triton kernel (AttentionTuning(hopper=False))"]


def test_hopper_counters_are_per_stream_and_outgrown_ones_kept():
    """The Hopper decode's completion counters (tq_attention.Counters): zeros, one buffer per CUDA
    stream (two streams never share a counter), grown for a larger batch with the old buffer kept
    (a captured graph may point at it), reused otherwise."""
    from vllm_gds.kernels.tq_attention import Counters

    c = Counters()
    a = c.get(1, 8, "cpu")
    assert a.dtype == torch.int32 and a.numel() == 8 and not a.any()
    assert c.get(1, 4, "cpu") is a  # smaller batch: the same buffer
    b = c.get(2, 4, "cpu")
    assert b.data_ptr() != a.data_ptr()  # another stream, another buffer
    grown = c.get(1, 32, "cpu")
    assert grown.numel() == 32 and grown is not a and c.kept == [a]
    assert c.get(1, 32, "cpu") is grown


def test_decode_requiring_hopper_on_cpu_raises():
    args, _ = _decode_case()
    with pytest.raises(ValueError, match=r"hopper=True.*not a CUDA device.*hopper=False"):
        tq_attention(*args, 64**-0.5, max_query_len=1, tuning=AttentionTuning(hopper=True))


def test_store_on_cpu_takes_the_portable_kernel_and_logs_it_once(caplog, monkeypatch):
    """The Hopper store (tq_store_hopper.py) is chosen only on an sm_90 GPU with Gluon
    (fast_path.choose, tests/test_kv_store_hopper.py): here the portable kernel, decided once
    per plan and logged once; requiring the Hopper store raises."""
    import sys

    ts = sys.modules["vllm_gds.kernels.tq_store"]
    monkeypatch.setattr(fast_path, "LOGGED", set())
    h, t, d = 1, 16, 128
    lq, tables = _pair(FORMATS["tq4"], d, h, True)
    positions = torch.randint(0, 1 << 17, (t,))
    k, v = _keys_values(t, h, d, lq, positions)
    cache = torch.full((2, 16, h, tables.layout.slot_bytes), POISON, dtype=torch.uint8)
    slots = torch.randperm(32)[:t]
    caplog.set_level("INFO", logger="vllm_gds.kernels")
    for _ in range(2):
        tq_store(k, v, cache, slots, tables, positions)
    lines = [r.getMessage() for r in caplog.records if r.name == "vllm_gds.kernels"]
    assert lines == ["tq4 store: portable Triton kernel (not a CUDA device)"], lines
    assert [p.hopper for p in ts._LAUNCHES._by_tables[id(tables)].values()] == [False]
    got = cache.view(-1, h, tables.layout.slot_bytes)[slots]
    assert torch.equal(got, _reference_slots(lq, k, v, positions))
    with pytest.raises(ValueError, match=r"hopper=True.*not a CUDA device.*False"):
        tq_store(k, v, cache, slots, tables, positions, tuning=StoreTuning(hopper=True))


def test_store_plans_ask_for_kvptx_only_with_16_byte_rows(monkeypatch):
    """The Hopper store's KVPTX copies whole key and value rows 16 bytes at a time, and a plan's
    constexprs are fixed at its first call, so tq_store's plan key carries the rows' alignment:
    with KVPTX served, rows 16-byte aligned make a plan that asks for it, the same rows 4 bytes
    off another that does not; with KVPTX off no plan asks. Both store the reference's bytes."""
    import sys

    ts = sys.modules["vllm_gds.kernels.tq_store"]
    if ts._hop is None:
        pytest.skip(f"no Gluon here: {ts.GLUON_ERROR}")
    h, t, d = 1, 16, 128
    lq, tables = _pair(FORMATS["tq4"], d, h, True)
    positions = torch.randint(0, 1 << 17, (t,))
    k, v = _keys_values(t, h, d, lq, positions)
    wide = torch.zeros(t, h, d + 4)
    wide[..., 1:d + 1] = k
    k_off = wide[..., 1:d + 1]  # rows 4 bytes past a 16-byte boundary, strides of 132
    assert k_off.data_ptr() % 16 == 4 and torch.equal(k_off, k)
    slots = torch.randperm(32)[:t]
    ref = _reference_slots(lq, k, v, positions)
    for served, keys, plans in ((True, (k, k_off, k), [True, False]), (False, (k,), [False])):
        monkeypatch.setattr(ts._hop, "KVPTX", served)
        ts._LAUNCHES._by_tables.pop(id(tables), None)
        for key in keys:
            cache = torch.full((2, 16, h, tables.layout.slot_bytes), POISON, dtype=torch.uint8)
            tq_store(key, v, cache, slots, tables, positions)
            assert torch.equal(cache.view(-1, h, tables.layout.slot_bytes)[slots], ref)
        assert [p.kvptx for p in ts._LAUNCHES.plans(tables)] == plans, served


def test_served_launch_says_what_the_served_call_ran():
    """kv_bench's store rows report what tq_store's served call launched (served_launch): nothing
    before a served call, the portable launch on the CPU after one (no CUDA), and a call with a
    tuning is not the served one."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import kv_bench as kb
    from vllm_gds.kernels.tq_store import served_launch

    hk, d, T = 2, 128, 16
    cal = {k: v for k, v in kb.served_calibration(torch, "tq4", hk, d, True).items()
           if v is not None}
    tables = LayerTables(FORMATS["tq4"], d, 0, 0, "cpu", torch.bfloat16, hk, **cal)
    k = torch.randn(T, hk, d).bfloat16()
    cache = torch.zeros(2, 16, hk, tables.layout.slot_bytes, dtype=torch.uint8)
    slots, positions = torch.arange(T), torch.arange(T)
    assert served_launch(tables, T, hk) is None
    tq_store(k, k, cache, slots, tables, positions, tuning=StoreTuning(block_t=16, split=0))
    assert served_launch(tables, T, hk) is None
    tq_store(k, k, cache, slots, tables, positions)
    got = served_launch(tables, T, hk)
    assert got["kernel"] == "portable" and got["block_t"] == 16 and got["num_warps"] == 4, got

"""The Hopper tq4/tq3/tq5 decode (kernels/tq_decode_hopper.py) without a GPU: its coordinate
permutations against a torch emulation of the kernel's reshapes, its lookup PTX on a PTX
interpreter, and an sm_90 compile under the installed Triton (Gluon has no interpreter; the GPU check is benchmarks/dev/kv_hopper_check.py).

The compile test asserts what the design promises: mma.sync tensor-core instructions, the decoded
codes reach the operands without shared memory (no LDS in the tile loop; the key mean's operand
alone goes through it), no register spills
in the loop, 32-bit loads of the key code words, and a loop of fewer SASS instructions than the
portable kernel's 946 per 64-token tile (RESULTS.md, decode fifth pass).
"""

import collections
import json

import pytest
import torch

from compile_jobs import checked, run

pytest.importorskip("triton.experimental.gluon._runtime")

from vllm_gds.kernels import tq_decode_hopper as hop  # noqa: E402
from vllm_gds.kvcache.calibration_file import top_pairs  # noqa: E402
from vllm_gds.kvcache.formats import FORMATS  # noqa: E402
from vllm_gds.kvcache.hopper_tables import attach, operand_asm  # noqa: E402
from vllm_gds.kvcache.tables import LayerTables  # noqa: E402


def _emulate(codes: torch.Tensor, order, out_shape, per: int):
    """The kernel's chain on [NT, D] codes of one warp: elements of `per` codes (int16: 4, int8:
    2) -> the lookup's phases P_j[t, e] = code per e + j (elementwise) -> join(join(P0, P1),
    join(P2, P3)) (per = 4) or join(P0, P1) -> reshape to index bits -> permute(order) ->
    reshape(out_shape)."""
    nt, d = codes.shape
    phases = [codes[:, j::per] for j in range(per)]  # [NT, E], e -> code per e + j
    if per == 4:
        x = torch.stack([torch.stack([phases[0], phases[1]], -1),
                         torch.stack([phases[2], phases[3]], -1)], -1)  # [NT, E, jl, jh]
    else:
        x = torch.stack(phases, -1)  # [NT, E, j]
    x = x.reshape([1, nt] + [2] * (d.bit_length() - 1))
    return x.permute(order).reshape(out_shape)


@pytest.mark.parametrize("per", [2, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_operand_slots_hold_the_coordinates_the_host_permutes(d, per):
    codes = torch.arange(d).repeat(16, 1) + 1000 * torch.arange(16)[:, None]  # token*1000 + coord
    ka = _emulate(codes, hop.k_order(d, per), [1, 16, d], per)[0]  # [token, k-slot]
    va = _emulate(codes, hop.v_order(d, per), [1, d, 16], per)[0]  # [m-slot, token]
    kperm = hop.slot_coordinates(d, hop.k_order(d, per), per)
    vperm = hop.slot_coordinates(d, hop.v_order(d, per), per)
    assert sorted(kperm) == list(range(d)) and sorted(vperm) == list(range(d))
    assert torch.equal(ka, torch.tensor(kperm)[None, :] + 1000 * torch.arange(16)[:, None])
    assert torch.equal(va, torch.tensor(vperm)[:, None] + 1000 * torch.arange(16)[None, :])
    # The lane-held k-slots (bits 1, 2) are the load layout's lane-held words: thread c's key
    # codes are bytes [c D/8, (c + 1) D/8) of the token
    for k in range(d):
        assert kperm[k] // (d // 4) == (k >> 1) & 3
    for m in range(d):  # thread g's value codes: bytes [g D/16, (g + 1) D/16)
        assert vperm[m] // (d // 8) == m & 7


def test_3bit_operand_slots_hold_the_coordinates_the_host_permutes():
    """tq3 (CODES = 3): the lookup's outputs (lut3_ptx: element e, phase j -> coordinate()) through
    the kernel's reshape/permute land where slot_coordinates says; lane c's keys are its 12 bytes
    [12c, 12c + 12) (32 codes), lane g's values its 6 bytes [6g, 6g + 6) (16 codes)."""
    d = 128
    for stream, order, shape in (("k", hop.k_order(d, 3), [1, 16, d]),
                                 ("v", hop.v_order(d, 3), [1, d, 16])):
        n, phases = hop.geometry(d, 3, stream)
        coord = torch.tensor([[hop.coordinate(3, stream, e, j) for j in range(phases)]
                              for e in range(n)])  # [E, phase]
        assert sorted(coord.flatten().tolist()) == list(range(d))
        x = coord[None, :, :] + 1000 * torch.arange(16)[:, None, None]  # [NT, E, phase]
        x = x.reshape(16, n, 2, 2, 2) if phases == 8 else x.reshape(16, n, 2, 2)
        x = x.permute(0, 1, *range(x.dim() - 1, 1, -1))  # phase bits LSB first, as the joins
        x = x.reshape([1, 16] + [2] * 7).permute(order).reshape(shape)[0]
        perm = torch.tensor(hop.slot_coordinates(d, order, 3, stream))
        assert sorted(perm.tolist()) == list(range(d))
        if stream == "k":
            assert torch.equal(x, perm[None, :] + 1000 * torch.arange(16)[:, None])
            assert all(perm[k] // 32 == (k >> 1) & 3 for k in range(d))
        else:
            assert torch.equal(x, perm[:, None] + 1000 * torch.arange(16)[None, :])
            assert all(perm[m] // 16 == m & 7 for m in range(d))


def test_3bit_lookup_ptx_decodes_packed_codes():
    """lut3_ptx's key and value lookups (as attach gives them for tq3), run on test_kv_kernels'
    PTX interpreter on codes packed by packing.pack: register $k holds codes 2k, 2k + 1 of the
    lane's 32 keys, and code k of both tokens' 16 values, as bf16 levels of codebook(128, 3)."""
    from test_kv_kernels import _run_ptx
    from vllm_gds.kvcache.codebook import codebook
    from vllm_gds.kvcache.packing import pack

    t = attach(LayerTables(FORMATS["tq3"], 128, 0, 0, "cpu", torch.float32, 1))
    assert t.hopper_codes == 3
    table = codebook(128, 3)[0].to(torch.bfloat16).view(torch.int16).tolist()
    words = [w & 0xFFFFFFFF for w in t.hopper_lut]
    for trial in range(40):  # all codes 7 first: every bit set, so no stray bit goes unseen
        codes = torch.full((32,), 7) if trial == 0 else torch.randint(0, 8, (32,))
        b = pack(codes, 3).tolist()
        regs = {f"${16 + i}": int.from_bytes(bytes(b[4 * i:4 * i + 4]), "little")
                for i in range(3)}
        regs |= {"$19": 0xDEADBEEF, **{f"${20 + 4 * i}": words[i] for i in range(4)}}
        out = _run_ptx(t.hopper_asm[3, "k"], regs)
        for k in range(32):
            assert (out[f"${k // 2}"] >> (16 * (k % 2))) & 0xFFFF == table[codes[k]] & 0xFFFF
        tok = torch.full((2, 16), 7) if trial == 0 else torch.randint(0, 8, (2, 16))
        b0, b1 = pack(tok[0], 3).tolist(), pack(tok[1], 3).tolist()
        regs = {f"${16 + i}": b0[2 * i] | b0[2 * i + 1] << 8 | b1[2 * i] << 16 | b1[2 * i + 1] << 24
                for i in range(3)}
        regs |= {"$19": 0x12345678, **{f"${20 + 8 * i}": words[i] for i in range(4)}}
        out = _run_ptx(t.hopper_asm[3, "v"], regs)
        for k in range(16):
            for h in range(2):
                assert (out[f"${k}"] >> (16 * h)) & 0xFFFF == table[tok[h, k]] & 0xFFFF


def test_5bit_key_slots_hold_the_coordinates_the_host_permutes():
    """tq5's keys (5-bit lookup, lut5_ptx: output p, element e -> coordinate()) through the
    kernel's reshape/permute land where slot_coordinates says; lane c's keys are its 20 bytes
    [20c, 20c + 20) (32 codes). Its values are tq4's (4-bit codes in int16 elements)."""
    d = 128
    kc, vc = hop.stream_codes(5)
    assert (kc, vc) == (5, 4) and hop.geometry(d, vc, "v") == hop.geometry(d, 4, "v")
    order = hop.k_order(d, kc)
    n, phases = hop.geometry(d, kc, "k")
    coord = torch.tensor([[hop.coordinate(kc, "k", e, j) for j in range(phases)]
                          for e in range(n)])  # [E, phase]
    assert sorted(coord.flatten().tolist()) == list(range(d))
    x = coord[None, :, :] + 1000 * torch.arange(16)[:, None, None]  # [NT, E, phase]
    x = x.reshape(16, n, 2, 2).permute(0, 1, 3, 2)  # phase bits LSB first, as the joins
    x = x.reshape([1, 16] + [2] * 7).permute(order).reshape(1, 16, d)[0]
    perm = torch.tensor(hop.slot_coordinates(d, order, kc, "k"))
    assert torch.equal(x, perm[None, :] + 1000 * torch.arange(16)[:, None])
    assert all(perm[k] // 32 == (k >> 1) & 3 for k in range(d))
    assert hop.slot_coordinates(d, hop.v_order(d, vc), vc, "v") == hop.slot_coordinates(
        d, hop.v_order(d, 4), 4, "v")


def test_5bit_key_lookup_ptx_decodes_packed_codes():
    """lut5_ptx's key lookup (as attach gives it for tq5), run on test_kv_kernels' PTX
    interpreter on codes packed by packing.pack: output p's element e (register 4p + e // 2,
    half e % 2) holds the bf16 level of codebook(128, 5) of the code at the kernel's
    coordinate(5, "k", e, p); the values take tq4's lookup and table words."""
    from test_kv_kernels import _run_ptx
    from vllm_gds.kvcache import lut5_ptx
    from vllm_gds.kvcache.codebook import codebook
    from vllm_gds.kvcache.hopper_tables import table_words
    from vllm_gds.kvcache.lut4_ptx import levels4_asm
    from vllm_gds.kvcache.packing import pack

    t = attach(LayerTables(FORMATS["tq5"], 128, 0, 0, "cpu", torch.float32, 1))
    assert t.hopper_codes == 5 and hop.K5_PAIRS == lut5_ptx.PAIRS
    assert t.hopper_asm[5, "v"] == operand_asm(levels4_asm(codebook(128, 4)[0]), 4)
    assert t.hopper_lut == table_words(codebook(128, 4)[0])
    table = codebook(128, 5)[0].to(torch.bfloat16).view(torch.int16).tolist()
    words = [w & 0xFFFFFFFF for w in t.hopper_klut]
    for trial in range(24):
        codes = torch.arange(32) if trial == 0 else torch.randint(0, 32, (32,))
        b = pack(codes, 5).tolist()
        regs = {f"${16 + i}": int.from_bytes(bytes(b[4 * i:4 * i + 4]), "little")
                for i in range(5)}
        regs |= {f"${21 + i}": 0xDEADBEEF for i in range(3)}
        regs |= {f"${24 + 8 * i}": words[i] for i in range(8)}
        out = _run_ptx(t.hopper_asm[5, "k"], regs)
        for p in range(4):
            for e in range(8):
                code = codes[hop.coordinate(5, "k", e, p)]
                got = (out[f"${4 * p + e // 2}"] >> (16 * (e % 2))) & 0xFFFF
                assert got == table[code] & 0xFFFF, (trial, p, e, int(code))


def test_layout_check_takes_tq5_at_head_128_only():
    """The Hopper kernel's layout check (why_unsupported past the device) on CPU tensors: tq5 runs
    at head 128 (attach gives its tables there), not at 64; tq3 likewise; tq4 at both."""
    def case(fmt, d, g=4, h=8):
        mu = top_pairs(torch.randn(h, d), None, FORMATS[fmt].key_mean_pairs, d // 2)
        t = attach(LayerTables(FORMATS[fmt], d, 0, 0, "cpu", torch.bfloat16, h, key_mean=mu,
                               rope_inv_freq=torch.ones(d // 2)))
        cache = torch.zeros(4, 16, h, t.layout.slot_bytes, dtype=torch.uint8)
        return t, hop.layout_unsupported(torch.zeros(2, g * h, d), cache, t)

    t, why = case("tq5", 128)
    assert why is None and t.hopper_codes == 5 and len(t.hopper_klut) == 8
    assert len(hop.lut_args(t)) == 13 and hop.lut_args(t)[5:] == t.hopper_klut
    t, why = case("tq5", 64)
    assert t.hopper_codes is None and why == "head size 64 (128 only at 5-bit keys)"
    assert case("tq3", 64)[1] == "head size 64 (128 only at 3-bit keys)"
    for d in (64, 128):
        t, why = case("tq4", d)
        assert why is None and t.hopper_klut is None and hop.lut_args(t)[4:] == (0,) * 9
    assert case("tq5", 128, g=16)[1] == "16 query heads per KV head"


def test_hadamard_operands_are_permuted_blocks():
    mu = top_pairs(torch.randn(1, 128), None, FORMATS["tq4"].key_mean_pairs, 64)
    t = attach(LayerTables(FORMATS["tq4"], 128, 0, 0, "cpu", torch.bfloat16, 1, key_mean=mu,
                           rope_inv_freq=torch.ones(64)))
    h_k, h_v = hop.hadamard_operands(t)
    kperm = hop.slot_coordinates(128, hop.k_order(128))
    vperm = hop.slot_coordinates(128, hop.v_order(128))
    assert torch.equal(h_k.t(), t.h_cols["kb"][:, kperm])
    assert torch.equal(h_v, t.h_rows["vb"][vperm])
    # the portable kernel's lookup at d = 128, its table words as operands
    assert t.hopper_asm[4, "k"] == operand_asm(t.lut4_asm["k"], 4)
    # the finish's B operand: the same permuted output rows, transposed
    assert torch.equal(hop.finish_rows(t), h_v.t())


@pytest.mark.parametrize("splits", [1, 8, 64])
def test_served_plan_holds_what_decode_launch_launches_with(splits):
    """tq_attention's kept Hopper plan (_Hopper, made without a launch's buffers) holds the
    constexprs, finish mode, table words and finish tables decode_launch gives the same call."""
    from vllm_gds.kernels.tq_attention import _Hopper

    t = _mean_tables("tq4", 1)
    q = torch.zeros(2, 8, 128, dtype=torch.bfloat16)
    cache = torch.zeros(8, 16, 1, t.layout.slot_bytes, dtype=torch.uint8)
    bt = torch.arange(8, dtype=torch.int32).reshape(2, 4)
    sl = torch.full((2,), 60, dtype=torch.int32)
    qsl = torch.arange(3, dtype=torch.int32)
    plan = _Hopper(q, cache, t, splits)
    out = torch.empty_like(q)
    _, args, kw = hop.decode_launch(q, cache, bt, sl, qsl, t, 128**-0.5, splits, out)
    assert plan.kwargs == kw and plan.finish == kw["FINISH"] == (1 if splits == 1 else 2)
    assert kw["GROUP"] == hop.MERGE_GROUP
    # the arguments that vary between calls: in tq_attention's order, around the plan's tables
    calls = [object() for _ in range(15)]
    launch = (*calls[:9], *plan.tables, *calls[9:11], *plan.lut, *calls[11:14],
              *plan.finish_tables, calls[14])
    assert len(launch) == len(args) and plan.varying(launch) == tuple(calls)
    if splits > 1:  # the counters: one per merge group and one for the groups, per sequence
        counts = args[-1]  # and KV head, zeros
        assert counts.numel() == hop.counter_count(2, 1, splits) == 2 * (-(-splits // 8) + 1)
        assert counts.dtype == torch.int32 and not counts.any()
    assert plan.lut == hop.lut_args(t)
    assert all(a is b for a, b in zip(plan.finish_tables, hop.finish_args(out, t)[3:]))


@pytest.mark.parametrize("fmt, q_heads, kv_heads, want", [
    ("tq3", 8, 1, 2), ("tq3", 32, 8, 1), ("tq4", 8, 1, 1), ("tq4", 32, 8, 1), ("tq5", 8, 1, 1)])
def test_served_launch_loads_codes_two_tiles_ahead_for_tq3_at_groups_over_4(
        fmt, q_heads, kv_heads, want):
    """The served launch's PREFETCH (prefetch_served): two tiles ahead for tq3 at the 70B TP8
    shapes' groups of 8 (faster there on an H100), one elsewhere; an explicit prefetch wins."""
    t = _mean_tables(fmt, kv_heads)
    q = torch.zeros(1, q_heads, 128, dtype=torch.bfloat16)
    cache = torch.zeros(4, 16, kv_heads, t.layout.slot_bytes, dtype=torch.uint8)
    args = (q, cache, torch.zeros(1, 4, dtype=torch.int32), torch.full((1,), 60, dtype=torch.int32),
            torch.arange(2, dtype=torch.int32), t, 128**-0.5, 4, torch.empty_like(q))
    assert hop.decode_launch(*args)[2]["PREFETCH"] == want
    assert hop.decode_launch(*args, prefetch=0)[2]["PREFETCH"] == 0


def _mean_tables(fmt, heads, rope_inv_freq=None):
    mu = top_pairs(torch.randn(heads, 128), None, FORMATS[fmt].key_mean_pairs, 64)
    inv_freq = torch.ones(64) if rope_inv_freq is None else rope_inv_freq
    return attach(LayerTables(FORMATS[fmt], 128, 0, 0, "cpu", torch.bfloat16, heads, key_mean=mu,
                              rope_inv_freq=inv_freq))


def _rope_inv_freq():
    return (10000.0 ** (-torch.arange(64, dtype=torch.float64) / 64)).float()


def test_mean_step_rotates_the_key_mean_by_one_tile():
    """The host's per-tile rotation (mean_step): cos / sin of 16 * NW * theta for each head's
    kept pairs, so that rotating a pair's (cos, sin) at position p by it gives p + 16 NW; padding
    pairs (theta 0) rotate by nothing."""
    heads, nw = 2, 4
    t = _mean_tables("tq3", heads, _rope_inv_freq())
    step = hop.mean_step(t, nw)
    theta = t.mean_theta.double().flatten()  # [heads * RH], as the kernel indexes it
    assert step.is_contiguous() and step.dtype == torch.float32
    step = step.reshape(2, theta.numel())  # cos rows, then sin rows
    p = 1000.0
    a = theta * p
    rotated_cos = a.cos() * step[0].double() - a.sin() * step[1].double()
    rotated_sin = a.sin() * step[0].double() + a.cos() * step[1].double()
    b = theta * (p + 16 * nw)
    assert (rotated_cos - b.cos()).abs().max() < 1e-6
    assert (rotated_sin - b.sin()).abs().max() < 1e-6
    pad = theta == 0
    assert torch.equal(step[0][pad], torch.ones(int(pad.sum())))
    assert hop.mean_step(t, nw) is hop.mean_step(t, nw)  # made once per tables and warp count


def test_mean_rows_hold_each_positions_cos_then_sin():
    """mean_rows, the key mean's A operand table [heads, 16 NW, 2 RH] (fp16): row j of a head holds
    cos(j theta) of each of the head's pairs, then sin(j theta), for the 16 NW positions of a
    tile (each warp reads its 16)."""
    heads, nw = 2, 4
    t = _mean_tables("tq3", heads, _rope_inv_freq())
    rows = hop.mean_rows(t, nw)
    rh = t.rot_half_pad
    assert rows.shape == (heads, 16 * nw, 2 * rh) and rows.dtype == torch.float16
    assert rows.is_contiguous()
    ang = t.mean_theta.double()[:, None, :] * torch.arange(16 * nw, dtype=torch.float64)[:, None]
    assert (rows.double() - torch.cat([ang.cos(), ang.sin()], -1)).abs().max() < 1e-3
    assert hop.mean_rows(t, nw) is hop.mean_rows(t, nw)  # made once per tables and warp count


CONFIGS = [dict(d=128, g=4, kv_heads=8), dict(d=128, g=8, kv_heads=1),
           dict(d=64, g=3, kv_heads=3), dict(d=128, g=4, kv_heads=8, mean=False),
           dict(d=128, g=4, kv_heads=8, maxnreg=168), dict(d=128, g=4, kv_heads=8, prefetch=True),
           dict(d=128, g=4, kv_heads=8, codes=2), dict(d=128, g=4, kv_heads=8, trans_asm=False),
           dict(d=128, g=16, kv_heads=1, fallback=False),
           dict(d=128, g=4, kv_heads=8, fmt="tq3"), dict(d=128, g=8, kv_heads=1, fmt="tq3"),
           dict(d=128, g=4, kv_heads=8, fmt="tq5", prefetch=True),
           dict(d=128, g=8, kv_heads=1, fmt="tq5", prefetch=True),
           dict(d=128, g=4, kv_heads=8, finish=1), dict(d=128, g=8, kv_heads=1, finish=2),
           dict(d=64, g=3, kv_heads=3, finish=2),
           dict(d=128, g=8, kv_heads=1, fmt="tq3", prefetch=True, mean_smem=False),
           dict(d=128, g=4, kv_heads=8, fmt="tq3", prefetch=True, mean_smem=True),
           dict(d=128, g=8, kv_heads=1, prefetch=True, mean_smem=True),
           dict(d=128, g=16, kv_heads=1, fallback=False, fmt="tq3"),
           dict(d=128, g=8, kv_heads=1, fmt="tq3", prefetch=2),  # two tiles' codes in flight
           dict(d=128, g=4, kv_heads=8, prefetch=2)]


LAUNCHES = [dict(), dict(d=64, q_heads=9, kv_heads=3), dict(q_heads=8, kv_heads=1),
            dict(q_heads=8, kv_heads=1, prefetch=True, codes=2, trans_asm=False, maxnreg=0,
                 num_warps=8),
            dict(q_heads=8, kv_heads=1, fmt="tq3"), dict(fmt="tq5"), dict(splits=1),
            dict(q_heads=8, kv_heads=1, splits=64),
            dict(q_heads=8, kv_heads=1, splits=256, fmt="tq3")]


@pytest.fixture(scope="module")
def compiled():
    """tests/hopper_compile.py's results: each launch's (warmup_launch) and each config's stats,
    all compiled in one process of their own (tests/compile_jobs.py: one that imported Triton
    under TRITON_INTERPRET=1 cannot compile Gluon)."""
    jobs = [["hopper_compile.py", "--launch", json.dumps(launch)] for launch in LAUNCHES]
    jobs += [["hopper_compile.py", json.dumps([cfg])] for cfg in CONFIGS]
    keys = [("launch", json.dumps(launch)) for launch in LAUNCHES]
    keys += [("config", json.dumps(cfg)) for cfg in CONFIGS]
    return dict(zip(keys, run(jobs)))


@pytest.mark.parametrize("launch", LAUNCHES)
def test_launch_binds_and_compiles_as_on_the_gpu(compiled, launch):
    """tq_decode_hopper's launch (decode_launch) through the JIT's own binding, specialization
    and compile (kernel.warmup with a compile-only driver): what the first call on the GPU machine
    does before it launches. One kernel at every split count: one split writes the rows (FINISH
    1), more merge their partials in the kernel (FINISH 2), no reduce launch."""
    splits = launch.get("splits", 4)
    want = ["_tq_decode_hopper_kernel", 1 if splits == 1 else 2]
    assert hop.finish_mode(splits) == want[1]
    assert checked(compiled["launch", json.dumps(launch)]) == want


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_compiles_for_sm90_with_codes_decoded_into_mma_registers(compiled, cfg):
    (st,) = checked(compiled["config", json.dumps(cfg)])
    loop = collections.Counter(st["loop"])
    d, g, mean, fold = cfg["d"], cfg["g"], cfg.get("mean", True), cfg.get("fallback", True)
    ops = collections.Counter()
    for op, n in loop.items():
        ops[op.split(".")[0]] += n
    hmma = sum(n for op, n in loop.items() if op.startswith("HMMA.16816"))
    # S^T: D/16 k-steps x R/8 row n-blocks (twice where SELECT scores the raw keys' query apart);
    # O^T: D/16 m-blocks x R/8; the key mean: 2 x RH/16 x R/8 (R: 8 rows up to G = 8, else 16;
    # RH: the mean's pairs, half the D/2 for tq4, all for tq3)
    nb = 1 if g <= 8 else 2
    select = fold and g > 4
    rh = d // 2 if cfg.get("fmt") == "tq3" else d // 4  # tq4, tq5: half the pairs
    want = d // 16 * nb * (3 if select else 2) + (2 * (rh // 16) * nb if mean else 0)
    assert hmma == want, (hmma, want, loop)
    # the codes never pass through shared memory; the key mean's [A', B'] does where MEAN_SMEM
    # (made once a tile for all the warps: stored, two barriers, read with ldmatrix as the B
    # operand)
    assert ops["LDS"] == 0, f"shared-memory loads in the tile loop: {loop}"
    if mean and cfg.get("mean_smem", hop.mean_smem_served(rh, g)):  # served: tq3 at G > 4
        assert ops["LDSM"] == 2 * rh // 32 * nb and 1 <= ops["STS"] + ops["STSM"] <= 4, loop
        assert ops["BAR"] == 2, loop
    else:
        assert ops["STS"] == ops["STSM"] == ops["LDSM"] == ops["BAR"] == 0, loop
    assert ops["STL"] == ops["LDL"] == 0, f"local memory (spills) in the tile loop: {loop}"
    # key words: 32-bit loads (tq4: 4 of a token's words a lane; tq3: 3; tq5: 5, the repeated
    # elements' loads merged), two tokens a lane
    words = {"tq3": 3, "tq5": 5}.get(cfg.get("fmt"), 2 * (d // 64))
    assert loop["LDG.E"] >= 2 * words, loop
    if cfg.get("fmt") == "tq5":
        assert loop["LDG.E"] <= 2 * words + 2, loop
    assert st["loop_total"] < 946, f"{st['loop_total']} SASS instructions per tile"


@pytest.mark.parametrize("codes", [2, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_lookup_ptx_with_table_operands_looks_up_every_code(d, codes):
    """The kernel's lookups (hopper_tables.attach: table words as operands $5, $5 + p, ...; p =
    the call's pack), run on test_kv_kernels' PTX interpreter. codes 4 (int16 elements in pairs):
    $j = phase j (code 4e + j) of both elements; codes 2 (int8 elements in fours): $0/$1 the
    low nibbles of bytes (0, 1)/(2, 3), $2/$3 the high ones."""
    from test_kv_kernels import _run_ptx
    from vllm_gds.kvcache.codebook import codebook
    from vllm_gds.kvcache.hopper_tables import PACK

    t = attach(LayerTables(FORMATS["tq4"], d, 0, 0, "cpu", torch.float32, 1))
    table = codebook(d, 4)[0].to(torch.bfloat16).view(torch.int16).tolist()
    p = PACK[codes]
    words = [w & 0xFFFFFFFF for w in t.hopper_lut]
    for w in [0, 0xFFFFFFFF, 0x76543210, 0xFEDCBA98, *torch.randint(0, 2**32, (64,)).tolist()]:
        regs = {"$4": w, **{f"${5 + i * p}": words[i] for i in range(4)}}
        out = _run_ptx(t.hopper_asm[codes, "k"], regs)
        for reg in range(4):
            for half in range(2):
                if codes == 4:  # element `half`, phase `reg`
                    code = (w >> (16 * half + 4 * reg)) & 15
                else:  # nibble reg // 2 of byte 2 (reg % 2) + half
                    code = (w >> (8 * (2 * (reg % 2) + half) + 4 * (reg // 2))) & 15
                got = (out[f"${reg}"] >> (16 * half)) & 0xFFFF
                assert got == table[code] & 0xFFFF, (hex(w), reg, half, code)

"""The served store launch compiled for sm_90 without a GPU (tests/store_compile.py, in a process
of its own), under the installed Triton: tq_store's plan for a CUDA bf16 call takes the bucketed
code search with its lookups as inline PTX (Triton would move a plain gather's tile through
shared memory) and the exact 16-bit rotation (the next head's prefetch is off: slower on the
GPU), and its head loop is shorter than the
launch before them by at least 20% (tq4) / 12% (tq3) (sm_90 SASS; benchmarks/RESULTS.md, store
fifth pass: tq4 4537 -> 3195 instructions under Triton 3.6). The GPU check is benchmarks/dev/kv_store_check.py.
Every kernel here is compiled once, all in one process (the module's `compiled`)."""

import pytest

from compile_jobs import checked, run

VARIANTS = [("--vsmem", "0"), ("--async-kv", "0"), ("--slut", "0"),
            ("--kv16", "1", "--async-kv", "0"), ("--fastdiv", "1"), ("--remat", "1"),
            ("--kvptx", "1")]
JOBS = [*(["store_compile.py", name, *old] for name in ("tq4", "tq3") for old in ((), ("old",))),
        *(["store_hopper_compile.py", name] for name in ("tq4", "tq3", "tq5")),
        *(["store_hopper_compile.py", "tq4", *v] for v in VARIANTS),
        ["store_hopper_compile.py", "tq4", "--num-warps", "1", "--heads-per-program", "1"],
        ["store_hopper_compile.py", "tq4", "--num-warps", "4", "--heads-per-program", "1"]]


@pytest.fixture(scope="module")
def compiled():
    """Each job's result by its command line, compiled in one process (tests/compile_jobs.py)."""
    return {tuple(job): result for job, result in zip(JOBS, run(JOBS))}


def _compile(compiled, *job):
    """tests/`script`'s JSON for this command line (compiled, not interpreted)."""
    return checked(compiled[job])


@pytest.mark.parametrize("name, most", [("tq4", 0.8), ("tq3", 0.88)])
def test_served_store_compiles_for_sm90_with_a_shorter_loop(compiled, name, most):
    new = _compile(compiled, "store_compile.py", name)
    old = _compile(compiled, "store_compile.py", name, "old")
    assert (new["codes"], new["prefetch"], new["exact_rot"], new["chunk"]) == (3, False, True, True)
    assert old["codes"] == 0 and not old["prefetch"] and not old["exact_rot"]
    assert new["gathers_inline"] > 0 and old["gathers_inline"] == 0
    n, o = sum(new["loop"].values()), sum(old["loop"].values())
    assert n < most * o, (n, o)
    assert new["loop"].get("HMMA", 0) < old["loop"].get("HMMA", 0)


@pytest.mark.parametrize("name", ["tq4", "tq3", "tq5"])
def test_hopper_store_compiles_for_sm90_in_registers(compiled, name):
    """The Gluon store (kernels/tq_store_hopper.py) as tq_store launches it at the Llama-3-8B
    shape: 8 HMMA per chunk pass of its 3 passes (the rotations: the value's, the key's two
    float16 passes; 96 a head: since 2026-12-08 a key is coded once, raw or calibrated as the
    fallback's rule picks), one 16-byte lookup a coordinate (2 codings x 64 per thread) from
    SLUT's shared table, the keys and values by cp.async one
    head ahead (ASYNC: 16 copies and two CTA barriers a head, no loads into registers), and a
    loop under a third of the portable kernel's instructions per code (99.1 -> 26.5 for tq4
    under Triton 3.6)."""
    st = _compile(compiled, "store_hopper_compile.py", name)
    loop = st["loop"]
    assert st["ptx_mma"] == 96 and sum(v for k, v in loop.items() if k.startswith("HMMA")) == 96
    assert st["lookups"] == 128 and st["ld_v4"] == 0 and st["slut"] and st["smem_ok"]
    assert loop["LDS.128"] == 128 and "LDG.E.128.CONSTANT" not in loop
    assert loop.get("LDGSTS.E.BYPASS.128") == 16 and loop.get("BAR.SYNC.DEFER_BLOCKING") == 2
    # global loads in the loop: the head's two error weights only
    assert loop.get("LDG.E") == 2 and not any(k.startswith("STS") for k in loop)
    # the heads' per-column vectors from shared memory (VSMEM), not global loads held in registers
    assert "LDG.E.64" not in loop and loop.get("LDS.64", 0) >= 96, loop
    assert st["per_code"] < 0.34 * 99.1, st["per_code"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_hopper_store_measurement_variants_compile(compiled, variant):
    """The code variants benchmarks/dev/kv_store_hopper_variants.py times on the GPU compile for
    sm_90 under the installed Triton: the per-column vectors from global memory, keys and
    values loaded into registers per head (no cp.async), the code search from bucket_table
    through L1 (the store as served until 2026-12-07), keys and values by 16-byte loads, the
    norms' sqrt and divisions without their slow-path branches, the lookups' bases, the copies'
    pointers and the slots' addresses worked out per head (REMAT, served 2026-12-07 to 12-08),
    the staging buffers declared in PTX (KVPTX)."""
    st = _compile(compiled, "store_hopper_compile.py", "tq4", *variant)
    loop = st["loop"]
    assert st["ptx_mma"] == 96 and st["lookups"] == 128 and st["smem_ok"]
    if variant[0] == "--slut":
        assert not st["slut"] and st["ld_v4"] == 128 and "LDS.128" not in loop
        assert loop["LDG.E.128.CONSTANT"] == 128
    if variant[0] == "--kv16":
        assert loop.get("LDG.E.128") == 16 and loop.get("LDG.E") == 2
    if variant[0] == "--fastdiv":  # one basic block a head: no calls, no FCHK
        assert not any(k.startswith(("CALL", "BSSY", "FCHK")) for k in loop), loop
        assert loop.get("MUFU.RSQ") == 8 and loop.get("MUFU.RCP") == 8
    if variant[0] == "--async-kv":  # key / value loads into registers, no copies, no barrier
        assert "LDGSTS.E.BYPASS.128" not in loop and loop.get("LDG.E") == 64 + 2
        assert not any(k.startswith("BAR") for k in loop)
    if variant[0] == "--vsmem":
        assert loop.get("LDG.E.64") == 64
    if variant[0] == "--kvptx":  # copies and reads in PTX, each warp its own rows: no CTA barrier
        assert loop.get("LDGSTS.E.BYPASS.128") == 16 and not any(k.startswith("BAR") for k in loop)
        assert loop.get("LDSM.16.M88.4") == 16 and st["static_shared"] > 32768, st
    if variant[0] == "--remat":  # since a key is coded once, the loop spills neither way, and
        # REMAT's recomputation only lengthens it
        served = _compile(compiled, "store_hopper_compile.py", "tq4")
        assert loop.get("LDGSTS.E.BYPASS.128") == 16 and loop.get("BAR.SYNC.DEFER_BLOCKING") == 2
        assert st["stack"] == served["stack"] == 0, (st, served)
        assert st["loop_total"] > served["loop_total"], (st, served)


def test_hopper_store_compiles_for_few_tokens(compiled):
    """The launch shape tq_store picks for a decode step's few tokens: one warp of 16 tokens and
    one head a program (the key mean's cos / sin per program; no head loop)."""
    st = _compile(compiled, "store_hopper_compile.py", "tq4", "--num-warps", "1",
                  "--heads-per-program", "1")
    assert st["ptx_mma"] == 96 and st["lookups"] == 128 and st["shared"] <= 20480
    assert not st["slut"] and st["smem_ok"] and st["ld_v4"] == 128


def test_hopper_store_keeps_its_shared_memory_launchable(compiled):
    """4 warps x 1 head a program (tq_store's middle launch shape, and every launch without a key
    mean): Triton's 42 KB with the key mean's cos / sin, so SLUT's 8 KB of static tables would
    pass the 48 KB a launch gets below Triton's own 48 KB: that launch keeps the L1 table."""
    st = _compile(compiled, "store_hopper_compile.py", "tq4", "--num-warps", "4",
                  "--heads-per-program", "1")
    assert st["shared"] == 43008 and not st["slut"] and st["smem_ok"] and st["ld_v4"] == 128

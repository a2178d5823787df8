"""The Hopper tq4 decode (kernels/tq_decode_hopper.py) without a GPU: its coordinate permutations
against a torch emulation of the kernel's reshapes, and an sm_90 compile under the installed
Triton (Gluon has no interpreter; the GPU check is benchmarks/dev/kv_hopper_check.py).

The compile test asserts what the design promises: mma.sync tensor-core instructions, the decoded
codes reach the operands without shared memory (no STS/LDS in the tile loop), no register spills
in the loop, 32-bit loads of the key code words, and a loop of fewer SASS instructions than the
portable kernel's 946 per 64-token tile (RESULTS.md, decode fifth pass).
"""

import collections
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
gluon_runtime = pytest.importorskip("triton.experimental.gluon._runtime")

from vllm_gds.kernels import tq_decode_hopper as hop  # noqa: E402
from vllm_gds.kvcache.calibration_file import top_pairs  # noqa: E402
from vllm_gds.kvcache.formats import FORMATS  # noqa: E402
from vllm_gds.kvcache.hopper_tables import attach  # noqa: E402
from vllm_gds.kvcache.tables import LayerTables  # noqa: E402


def _emulate(codes: torch.Tensor, order, out_shape):
    """The kernel's chain on [NT, D] codes of one warp: int16 words (codes 4e..4e+3) -> four
    phases P_j[t, e] = code 4e + j (the lookup, elementwise) -> join(join(P0, P1), join(P2, P3))
    -> reshape to index bits -> permute(order) -> reshape(out_shape)."""
    nt, d = codes.shape
    eb = (d // 4).bit_length() - 1
    phases = [codes[:, j::4] for j in range(4)]  # [NT, E], e -> code 4e + j
    x = torch.stack([torch.stack([phases[0], phases[1]], -1),
                     torch.stack([phases[2], phases[3]], -1)], -1)  # [NT, E, jl, jh]
    x = x.reshape([1, nt] + [2] * (eb + 2))
    return x.permute(order).reshape(out_shape)


@pytest.mark.parametrize("d", [64, 128])
def test_operand_slots_hold_the_coordinates_the_host_permutes(d):
    codes = torch.arange(d).repeat(16, 1) + 1000 * torch.arange(16)[:, None]  # token*1000 + coord
    kb = _emulate(codes, hop.k_order(d), [1, d, 16])[0]  # [k-slot, token]
    vb = _emulate(codes, hop.v_order(d), [1, 16, d])[0]  # [token, n-slot]
    kperm = hop.slot_coordinates(d, hop.k_order(d))
    vperm = hop.slot_coordinates(d, hop.v_order(d))
    assert sorted(kperm) == list(range(d)) and sorted(vperm) == list(range(d))
    assert torch.equal(kb, torch.tensor(kperm)[:, None] + 1000 * torch.arange(16)[None, :])
    assert torch.equal(vb, torch.tensor(vperm)[None, :] + 1000 * torch.arange(16)[:, None])
    # The lane-held k-slots (bits 1, 2) are the load layout's lane-held words: thread c's key
    # codes are bytes [c D/8, (c + 1) D/8) of the token
    for k in range(d):
        assert kperm[k] // (d // 4) == (k >> 1) & 3
    for n in range(d):  # thread m's value codes: bytes [m D/16, (m + 1) D/16)
        assert vperm[n] // (d // 8) == n & 7


def _tables(d, mean=True):
    kw = {}
    if mean:
        mu = top_pairs(torch.randn(1, d), None, FORMATS["tq4"].key_mean_pairs, d // 2)
        kw = dict(key_mean=mu, rope_inv_freq=torch.ones(d // 2))
    return attach(LayerTables(FORMATS["tq4"], d, 0, 0, "cpu", torch.bfloat16, 1, **kw))


def test_hadamard_operands_are_permuted_blocks():
    t = _tables(128)
    h_k, h_v = hop.hadamard_operands(t)
    kperm = hop.slot_coordinates(128, hop.k_order(128))
    vperm = hop.slot_coordinates(128, hop.v_order(128))
    assert torch.equal(h_k, t.h_cols["kb"][:, kperm])
    assert torch.equal(h_v, t.h_rows["vb"][vperm])
    assert t.hopper_asm["k"] == t.lut4_asm["k"]  # the portable kernel's lookup at d = 128


TYPES = {"q_ptr": "*bf16", "cache_ptr": "*u8", "block_table_ptr": "*i32", "seq_lens_ptr": "*i32",
         "query_start_ptr": "*i32", "signs_ptr": "*fp32", "key_scale_ptr": "*fp32",
         "key_mean_ptr": "*fp32", "mean_pairs_ptr": "*i32", "mean_theta_ptr": "*fp32",
         "mean_mu_ptr": "*fp32", "mean_table_ptr": "*fp16", "hk_ptr": "*bf16",
         "part_ptr": "*fp32", "qk_scale": "fp32"}
DIVISIBLE = ("q_ptr", "cache_ptr", "block_table_ptr", "part_ptr", "stride_blk", "stride_bt",
             "stride_qt", "hk_ptr", "mean_table_ptr")  # as torch tensors specialize them


def compile_sm90(d, g, kv_heads, mean=True, fallback=True, **launch):
    from triton.backends.compiler import GPUTarget

    t = _tables(d, mean)
    t.fallback = fallback
    slot = t.layout.slot_bytes
    nw = launch.pop("num_warps", 4)
    cx = hop.kernel_constexprs(t, g, 16, kv_heads * slot, slot, 4, nw, **launch)
    fn = hop._tq_decode_hopper_kernel
    sig = {n: "constexpr" if n in cx else TYPES.get(n, "i32") for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in DIVISIBLE}
    src = gluon_runtime.GluonASTSource(fn, sig, constexprs=cx, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": nw})


INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def tile_loop(kernel) -> collections.Counter:
    """SASS op counts of the innermost loop that runs tensor-core MMAs (the tile loop)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([str(tool), "-sass", str(path)], check=True, capture_output=True,
                              text=True).stdout
    ins = [(int(m.group(1), 16), m.group(3), m.group(4))
           for m in map(INSTR.match, sass.splitlines()) if m]
    loops = []
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest)
        if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
            body = [o for a, o, _ in ins if int(target.group(1), 16) <= a <= addr]
            if any(o.startswith("HMMA") for o in body):
                loops.append(collections.Counter(body))
    assert loops, "no loop with mma instructions"
    return min(loops, key=lambda c: sum(c.values()))


@pytest.mark.parametrize("d, g, kv_heads, mean", [(128, 4, 8, True), (128, 8, 1, True),
                                                  (64, 3, 3, True), (128, 4, 8, False)])
def test_compiles_for_sm90_with_codes_decoded_into_mma_registers(d, g, kv_heads, mean):
    kernel = compile_sm90(d, g, kv_heads, mean)
    loop = tile_loop(kernel)
    ops = collections.Counter()
    for op, n in loop.items():
        ops[op.split(".")[0]] += n
    hmma = sum(n for op, n in loop.items() if op.startswith("HMMA.16816"))
    # S: D/16 k-steps x 2 token n-blocks; PV: D/8 n-blocks; the key mean: 2 x RH/16 x 2
    want = d // 16 * 2 + d // 8 + (2 * (d // 4 // 16) * 2 if mean else 0)
    assert hmma == want, (hmma, want, loop)
    assert ops["STS"] == ops["LDS"] == 0, f"shared memory in the tile loop: {loop}"
    assert ops["STL"] == ops["LDL"] == 0, f"local memory (spills) in the tile loop: {loop}"
    assert loop["LDG.E"] >= 2 * (d // 64) * 2, loop  # key words: 32-bit loads
    assert sum(loop.values()) < 946, f"{sum(loop.values())} SASS instructions per tile"

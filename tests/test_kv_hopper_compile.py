"""The Hopper tq4 decode (kernels/tq_decode_hopper.py) without a GPU: its coordinate permutations
against a torch emulation of the kernel's reshapes, and an sm_90 compile under the installed
Triton (Gluon has no interpreter; the GPU check is benchmarks/dev/kv_hopper_check.py).

The compile test asserts what the design promises: mma.sync tensor-core instructions, the decoded
codes reach the operands without shared memory (no STS/LDS in the tile loop), no register spills
in the loop, 32-bit loads of the key code words, and a loop of fewer SASS instructions than the
portable kernel's 946 per 64-token tile (RESULTS.md, decode fifth pass).
"""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton.experimental.gluon._runtime")

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
    ka = _emulate(codes, hop.k_order(d), [1, 16, d])[0]  # [token, k-slot]
    va = _emulate(codes, hop.v_order(d), [1, d, 16])[0]  # [m-slot, token]
    kperm = hop.slot_coordinates(d, hop.k_order(d))
    vperm = hop.slot_coordinates(d, hop.v_order(d))
    assert sorted(kperm) == list(range(d)) and sorted(vperm) == list(range(d))
    assert torch.equal(ka, torch.tensor(kperm)[None, :] + 1000 * torch.arange(16)[:, None])
    assert torch.equal(va, torch.tensor(vperm)[:, None] + 1000 * torch.arange(16)[None, :])
    # The lane-held k-slots (bits 1, 2) are the load layout's lane-held words: thread c's key
    # codes are bytes [c D/8, (c + 1) D/8) of the token
    for k in range(d):
        assert kperm[k] // (d // 4) == (k >> 1) & 3
    for m in range(d):  # thread g's value codes: bytes [g D/16, (g + 1) D/16)
        assert vperm[m] // (d // 8) == m & 7


def test_hadamard_operands_are_permuted_blocks():
    mu = top_pairs(torch.randn(1, 128), None, FORMATS["tq4"].key_mean_pairs, 64)
    t = attach(LayerTables(FORMATS["tq4"], 128, 0, 0, "cpu", torch.bfloat16, 1, key_mean=mu,
                           rope_inv_freq=torch.ones(64)))
    h_k, h_v = hop.hadamard_operands(t)
    kperm = hop.slot_coordinates(128, hop.k_order(128))
    vperm = hop.slot_coordinates(128, hop.v_order(128))
    assert torch.equal(h_k, t.h_cols["kb"][:, kperm])
    assert torch.equal(h_v, t.h_rows["vb"][vperm])
    assert t.hopper_asm["k"] == t.lut4_asm["k"]  # the portable kernel's lookup at d = 128


CONFIGS = [dict(d=128, g=4, kv_heads=8), dict(d=128, g=8, kv_heads=1),
           dict(d=64, g=3, kv_heads=3), dict(d=128, g=4, kv_heads=8, mean=False),
           dict(d=128, g=4, kv_heads=8, maxnreg=168), dict(d=128, g=4, kv_heads=8, prefetch=True)]


@pytest.fixture(scope="module")
def compiled():
    """tests/hopper_compile.py's stats of each config, compiled in a process of its own (one
    that imported Triton under TRITON_INTERPRET=1 cannot compile Gluon)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    run = subprocess.run([sys.executable, str(Path(__file__).parent / "hopper_compile.py"),
                          json.dumps(CONFIGS)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(zip(map(json.dumps, CONFIGS), json.loads(run.stdout.strip().splitlines()[-1])))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_compiles_for_sm90_with_codes_decoded_into_mma_registers(compiled, cfg):
    st = compiled[json.dumps(cfg)]
    loop = collections.Counter(st["loop"])
    d, g, mean = cfg["d"], cfg["g"], cfg.get("mean", True)
    ops = collections.Counter()
    for op, n in loop.items():
        ops[op.split(".")[0]] += n
    hmma = sum(n for op, n in loop.items() if op.startswith("HMMA.16816"))
    # S^T: D/16 k-steps x R/8 row n-blocks; O^T: D/16 m-blocks x R/8; the key mean:
    # 2 x RH/16 x R/8 (R = 8 rows at G <= 4 with the fallback, else 16)
    nb = 1 if g <= 4 else 2
    want = d // 16 * nb * 2 + (2 * (d // 4 // 16) * nb if mean else 0)
    assert hmma == want, (hmma, want, loop)
    assert ops["STS"] == ops["LDS"] == 0, f"shared memory in the tile loop: {loop}"
    assert ops["STL"] == ops["LDL"] == 0, f"local memory (spills) in the tile loop: {loop}"
    assert loop["LDG.E"] >= 2 * (d // 64) * 2, loop  # key words: 32-bit loads
    assert st["loop_total"] < 946, f"{st['loop_total']} SASS instructions per tile"

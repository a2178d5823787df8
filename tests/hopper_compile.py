"""Compile the Hopper tq4/tq3/tq5 decode (kernels/tq_decode_hopper.py) for sm_90 without a GPU and
count the SASS of its tile loop. Run as a script by tests/test_kv_hopper_compile.py in a process of its
own: a process that imported Triton under TRITON_INTERPRET=1 (test_kv_kernels does) cannot
compile Gluon (its reductions are interpreter functions there).

    python tests/hopper_compile.py '[{"d": 128, "g": 4, "kv_heads": 8}]'   # prints JSON
    python tests/hopper_compile.py --launch '{"fmt": "tq3"}'

(tests/compile_jobs.py runs the tests' jobs in one process.)
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from vllm_gds.kernels import tq_decode_hopper as hop
from vllm_gds.kvcache.calibration_file import top_pairs
from vllm_gds.kvcache.formats import FORMATS
from vllm_gds.kvcache.hopper_tables import attach
from vllm_gds.kvcache.tables import LayerTables

TYPES = {"q_ptr": "*bf16", "cache_ptr": "*u8", "block_table_ptr": "*i32", "seq_lens_ptr": "*i32",
         "query_start_ptr": "*i32", "signs_ptr": "*fp32", "key_scale_ptr": "*fp32",
         "key_mean_ptr": "*fp32", "mean_pairs_ptr": "*i32", "mean_theta_ptr": "*fp32", "mean_step_ptr": "*fp32",
         "mean_mu_ptr": "*fp32", "mean_table_ptr": "*fp16", "hk_ptr": "*bf16",
         "part_ptr": "*fp32", "out_ptr": "*bf16", "hvt_ptr": "*bf16", "value_mean_ptr": "*fp32", "count_ptr": "*i32", **{f"lut{i}": "i32" for i in range(4)}, "lut_zero": "i32", "qk_scale": "fp32"}
# as torch tensors specialize them at run time: every tensor's address (16-byte aligned by torch's
# allocator) and the strides that are multiples of 16 at the served shapes
DIVISIBLE = tuple(n for n, t in TYPES.items() if t.startswith("*")) + (
    "stride_blk", "stride_bt", "stride_qt")
INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def tables(d, mean=True, fallback=True, fmt="tq4"):
    kw = {}
    if mean:
        mu = top_pairs(torch.randn(1, d), None, FORMATS[fmt].key_mean_pairs, d // 2)
        kw = dict(key_mean=mu, rope_inv_freq=torch.ones(d // 2))
    t = attach(LayerTables(FORMATS[fmt], d, 0, 0, "cpu", torch.bfloat16, 1, **kw))
    t.fallback = fallback
    return t


def compile_sm90(d=128, g=4, kv_heads=8, mean=True, fallback=True, num_warps=4, maxnreg=None,
                 fmt="tq4", **launch):
    """The kernel as decode_launch launches it: maxnreg None is its MAXNREG, 0 no limit."""
    maxnreg = hop.MAXNREG if maxnreg is None else maxnreg
    t = tables(d, mean, fallback, fmt)
    slot = t.layout.slot_bytes
    cx = hop.kernel_constexprs(t, g, 16, kv_heads * slot, slot, num_warps, **launch)
    fn = hop._tq_decode_hopper_kernel
    sig = {n: "constexpr" if n in cx else TYPES.get(n, "i32") for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in DIVISIBLE}
    options = {"num_warps": num_warps}
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(GluonASTSource(fn, sig, constexprs=cx, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def _tool(kernel, *args) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(kernel.asm["cubin"])
        return subprocess.run([str(BIN / "cuobjdump"), *args, str(path)], check=True,
                              capture_output=True, text=True).stdout


def stats(kernel) -> dict:
    """Op counts of the innermost loop with tensor-core MMAs (the tile loop), registers, stack."""
    ins = [(int(m.group(1), 16), m.group(3), m.group(4))
           for m in map(INSTR.match, _tool(kernel, "-sass").splitlines()) if m]
    loops = []
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest)
        if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
            body = [o for a, o, _ in ins if int(target.group(1), 16) <= a <= addr]
            if any(o.startswith("HMMA") for o in body):
                loops.append(collections.Counter(body))
    usage = _tool(kernel, "-res-usage")
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    loop = min(loops, key=lambda c: sum(c.values())) if loops else collections.Counter()
    return {"loop": dict(loop), "loop_total": sum(loop.values()), "registers": regs,
            "stack": stack, "total": len(ins), "ptx_mma": kernel.asm["ptx"].count("mma.sync")}


class _CompileOnlyDriver:
    """Stands in for the CUDA driver (there is none here) so that a JIT launch's binding,
    specialization and compile run as on the GPU machine (kernel.warmup compiles, no launch)."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def warmup_launch(d=128, q_heads=32, kv_heads=8, fmt="tq4", splits=4, **launch) -> list[str]:
    """tq_decode_hopper's launch (kernels.tq_decode_hopper.decode_launch) bound and compiled by the
    JIT as a launch would be, with CPU tensors of a small batch. Returns the names of the compiled
    kernels and the kernel's FINISH."""
    from triton.runtime import driver

    t = tables(d, fmt=fmt)
    page, blocks, seqs = 16, 8, 2
    cache = torch.zeros(blocks, page, kv_heads, t.layout.slot_bytes, dtype=torch.uint8)
    q = torch.zeros(seqs, q_heads, d, dtype=torch.bfloat16)
    bt = torch.zeros(seqs, blocks // seqs, dtype=torch.int32)
    sl = torch.full((seqs,), 40, dtype=torch.int32)
    qsl = torch.arange(seqs + 1, dtype=torch.int32)
    out = torch.empty_like(q)
    driver.set_active(_CompileOnlyDriver())
    try:
        grid, args, kw = hop.decode_launch(q, cache, bt, sl, qsl, t, d ** -0.5, splits, out,
                                           **launch)
        kernel = hop._tq_decode_hopper_kernel.warmup(*args, grid=grid, **kw)
    finally:
        driver._active = None  # back to the (lazily created) real one
    return [kernel.name, kw["FINISH"]]


def result(argv: list[str]):
    """The command line's JSON: `--launch JSON` warmup_launch, else each config's stats."""
    if argv[0] == "--launch":
        return warmup_launch(**json.loads(argv[1]))
    return [stats(compile_sm90(**cfg)) for cfg in json.loads(argv[0])]


if __name__ == "__main__":
    print(json.dumps(result(sys.argv[1:])))

"""Compile the store kernel's served launch (tq_store's own plan for a CUDA bf16 call at the
Llama-3-8B shape) for sm_90 without a GPU and count the SASS of its head loop. Run as a script
by tests/test_kv_store_compile.py in a process of its own (the CPU tests import Triton under
TRITON_INTERPRET=1, which cannot compile for a GPU target; tests/compile_jobs.py runs the tests'
jobs in one process).

    python tests/store_compile.py tq4 [old]    # prints JSON; old: StoreTuning(codes=0,
                                               # prefetch=False, exact_rot=False)
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
from triton.compiler import ASTSource

from vllm_gds.kernels.tq_store import StoreTuning, _Launch
from vllm_gds.kernels.tq_store_kernel import _tq_store_kernel
from vllm_gds.kernels.tq_streams import stream_constexprs
from vllm_gds.kvcache.calibration_file import top_pairs
from vllm_gds.kvcache.formats import FORMATS
from vllm_gds.kvcache.tables import LayerTables

INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
TYPES = {"key_ptr": "*bf16", "value_ptr": "*bf16", "cache_ptr": "*u8", "slot_mapping_ptr": "*i64",
         "positions_ptr": "*i64", "rope_partner_ptr": "*i32", "bucket_ptr": "*i64",
         "kfa16": "*fp16", "kfb16": "*fp16", "vfa16": "*fp16", "vfb16": "*fp16", "kia16": "*fp16",
         "kib16": "*fp16", "kfax": "*bf16", "kfbx": "*bf16", "vfax": "*bf16", "vfbx": "*bf16",
         "hc16": "*fp16", "hsx": "*bf16"}


def served_tables(name: str, heads: int = 8, d: int = 128) -> LayerTables:
    """Tables with a calibration like a served model's (kv_bench's), on the CPU."""
    g = torch.Generator().manual_seed(0)
    key_scale = torch.rand(heads, d, generator=g) + 0.5
    cal = dict(key_mean=top_pairs(torch.randn(heads, d, generator=g), key_scale,
                                  FORMATS[name].key_mean_pairs, d // 2),
               key_scale=key_scale, value_mean=torch.randn(heads, d, generator=g) * 0.1,
               key_weight=torch.rand(heads, d, generator=g),
               rope_inv_freq=1.0 / 500000.0 ** (torch.arange(0, d, 2).float() / d))
    return LayerTables(FORMATS[name], d, 0, 0, "cpu", torch.bfloat16, heads, **cal)


def compile_served(name: str, tuning=None, heads: int = 8, d: int = 128):
    tables = served_tables(name, heads, d)
    slot = tables.layout.slot_bytes
    plan = _Launch(tables, 1, torch.bfloat16, True, heads, True, 16, heads * slot, slot, 4,
                   True, tuning)
    kw = dict(plan.kwargs)
    num_warps, num_stages, maxnreg = kw.pop("num_warps"), kw.pop("num_stages"), kw.pop("maxnreg", None)
    constexprs = {k: v for k, v in kw.items() if k in _tq_store_kernel.arg_names}
    constexprs.update(stream_constexprs(tables.constexprs))
    sig = {}
    for arg in _tq_store_kernel.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in TYPES:
            sig[arg] = TYPES[arg]
        elif arg.endswith("_ptr") or arg[-2:] in ("32", "16"):
            sig[arg] = "*fp32"
        else:
            sig[arg] = "i32"
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg:
        options["maxnreg"] = maxnreg
    src = ASTSource(_tq_store_kernel, sig, constexprs=constexprs)
    return plan, triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def loop_stats(kernel) -> dict:
    """Opcode counts of the largest loop body (the head loop)."""
    binp = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([str(binp), "-sass", str(path)], check=True, capture_output=True,
                              text=True).stdout
    ins = [(int(m.group(1), 16), m.group(3), m.group(4))
           for m in map(INSTR.match, sass.splitlines()) if m]
    best = collections.Counter()
    for addr, op, rest in ins:
        t = re.search(r"0x([0-9a-f]+)", rest)
        if op == "BRA" and t and int(t.group(1), 16) < addr:
            body = collections.Counter(o.split(".")[0] for a, o, _ in ins
                                       if int(t.group(1), 16) <= a <= addr)
            if sum(body.values()) > sum(best.values()):
                best = body
    return dict(best)


def result(argv: list[str]) -> dict:
    name = argv[0] if argv else "tq4"
    old = len(argv) > 1 and argv[1] == "old"
    plan, kernel = compile_served(
        name, StoreTuning(codes=0, prefetch=False, exact_rot=False) if old else None)
    ptx = kernel.asm["ptx"]
    return {"codes": plan.kwargs["CODES"], "prefetch": plan.kwargs["PREFETCH"],
            "exact_rot": plan.kwargs["EXACT_ROT"], "chunk": plan.kwargs["CHUNK"],
            "gathers_inline": ptx.count("ld.global.nc.b64"), "loop": loop_stats(kernel),
            "triton": triton.__version__}


if __name__ == "__main__":
    print(json.dumps(result(sys.argv[1:])))

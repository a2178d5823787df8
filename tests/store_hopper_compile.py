"""Compile the Hopper store (kernels/tq_store_hopper.py) for sm_90 without a GPU, as tq_store
would launch it at the Llama-3-8B shape, and count the SASS of its head loop. Run as a script by
tests/test_kv_store_compile.py in a process of its own (the CPU tests import Triton under
TRITON_INTERPRET=1, which cannot compile Gluon; tests/compile_jobs.py runs the tests' jobs in
one process).

    python tests/store_hopper_compile.py tq4 [--num-warps 4] [--maxnreg N] [--dump FILE]
        [--vsmem 0|1] [--async-kv 0|1] [--kv16 0|1] [--slut 0|1]
        [--fastdiv 0|1]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

sys.path.insert(0, str(Path(__file__).parent))
from hopper_compile import _tool, stats  # noqa: E402
from store_compile import served_tables  # noqa: E402

from vllm_gds.kernels import tq_store_hopper as hop  # noqa: E402
from vllm_gds.kernels.tq_store import _store_constants  # noqa: E402

TYPES = {"key_ptr": "*bf16", "value_ptr": "*bf16", "cache_ptr": "*u8", "slot_mapping_ptr": "*i64",
         "positions_ptr": "*i64", "hs_ptr": "*bf16", "hcp_ptr": "*fp16",
         "ktab_ptr": "*i32", "vtab_ptr": "*i32"}
DIVISIBLE = ("key_ptr", "value_ptr", "cache_ptr", "slot_mapping_ptr", "positions_ptr", "hs_ptr",
             "hcp_ptr", "ktab_ptr", "vtab_ptr", "stride_kt", "stride_kh",
             "stride_vt", "stride_vh", "stride_blk")


def compile_hopper(name="tq4", heads=8, d=128, num_warps=4, maxnreg=None, heads_per_program=None,
                   dtype=torch.bfloat16, vsmem=hop.VSMEM,
                   async_kv=hop.ASYNC, kv16=hop.KV16, slut=hop.SLUT, fastdiv=hop.FASTDIV,
                   remat=hop.REMAT, kvptx=hop.KVPTX):
    tables = served_tables(name, heads, d)
    c = _store_constants(tables, 1, dtype)
    hc = hop.constants(tables, dtype, c)
    T = 64
    key = torch.zeros(T, heads, d, dtype=dtype)
    cache = torch.zeros(T // 16 + 1, 16, heads, tables.layout.slot_bytes, dtype=torch.uint8)
    slots = torch.zeros(T, dtype=torch.int64)
    grid, args, cx = hop.store_launch(key, key, cache, slots, tables, slots, c, hc, 4,
                                      num_warps=num_warps, heads=heads_per_program,
                                      maxnreg=maxnreg, vsmem=vsmem,
                                      async_kv=async_kv, kv16=kv16, slut=slut,
                                      fastdiv=fastdiv, remat=remat,
                                      kvptx=kvptx)
    fn = hop._tq_store_hopper_kernel
    options = {"num_warps": cx.pop("num_warps")}
    if "maxnreg" in cx:
        options["maxnreg"] = cx.pop("maxnreg")
    sig = {}
    types = dict(TYPES)
    if dtype == torch.float16:
        types.update(key_ptr="*fp16", value_ptr="*fp16", hs_ptr="*fp16")
    for n, a in zip(fn.arg_names, list(args) + [None] * len(cx)):
        if n in cx:
            sig[n] = "constexpr"
        elif n in types:
            sig[n] = types[n]
        elif n.endswith("_ptr"):
            sig[n] = "*fp32"
        else:
            sig[n] = "i32"
    # as a launch with torch tensors specializes them: every pointer 16-byte aligned
    div = [n for n in fn.arg_names if sig[n].startswith("*")] + list(DIVISIBLE)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in set(div)}
    src = GluonASTSource(fn, sig, constexprs=cx, attrs=attrs)
    return cx, triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def result(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("name", nargs="?", default="tq4")
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--maxnreg", type=int)
    ap.add_argument("--heads-per-program", type=int)
    ap.add_argument("--dump", type=Path)
    ap.add_argument("--fp16", action="store_true", help="float16 keys and values")
    ap.add_argument("--vsmem", type=int, choices=(0, 1), default=int(hop.VSMEM),
                    help="the heads' per-column vectors staged in shared memory")
    ap.add_argument("--kv16", type=int, choices=(0, 1), default=int(hop.KV16),
                    help="keys and values by 16-byte loads (kperm's input order)")
    ap.add_argument("--fastdiv", type=int, choices=(0, 1), default=int(hop.FASTDIV),
                    help="the norms' sqrt and divisions without the slow-path branches")
    ap.add_argument("--slut", type=int, choices=(0, 1), default=int(hop.SLUT),
                    help="the code search by uniform buckets in shared memory")
    ap.add_argument("--async-kv", type=int, choices=(0, 1), default=int(hop.ASYNC),
                    help="keys and values by cp.async into shared memory, one head ahead")
    ap.add_argument("--remat", type=int, choices=(0, 1), default=int(hop.REMAT),
                    help="SLUT's bases and ASYNC's row pointers worked out per head")
    ap.add_argument("--kvptx", type=int, choices=(0, 1), default=int(hop.KVPTX),
                    help="ASYNC's buffers declared in PTX (no CTA barriers in the head loop)")
    a = ap.parse_args(argv)
    cx, k = compile_hopper(a.name, num_warps=a.num_warps, maxnreg=a.maxnreg,
                           heads_per_program=a.heads_per_program,
                           dtype=torch.float16 if a.fp16 else torch.bfloat16,
                           vsmem=bool(a.vsmem),
                           async_kv=bool(a.async_kv), kv16=bool(a.kv16), slut=bool(a.slut),
                           fastdiv=bool(a.fastdiv), remat=bool(a.remat),
                           kvptx=bool(a.kvptx))
    st = stats(k)
    sass = _tool(k, "-sass")
    if a.dump:
        a.dump.write_text(sass)
        a.dump.with_suffix(".ttgir").write_text(k.asm["ttgir"])
    st["per_code"] = st["loop_total"] * 32 * a.num_warps / (16 * a.num_warps * 2 * 128)
    st["shared"] = k.metadata.shared  # Triton's (dynamic); PTX-declared tables are static
    st["static_shared"] = int(re.search(r"SHARED:(\d+)", _tool(k, "-res-usage")).group(1))
    # launchable: Triton raises the dynamic limit only past 48 KB of its own (SLUT's tables are
    # static, declared in PTX: tq_store_hopper._slut_fits keeps them out of the window between)
    st["slut"] = cx["SLUT"]
    st["smem_ok"] = st["shared"] > 49152 or st["shared"] + st["static_shared"] <= 49152
    st["local"] = len(re.findall(r"\b(LDL|STL)\b", sass))
    st["ld_v4"] = k.asm["ptx"].count("ld.global.nc.v4.b32")
    # the code search's lookups in PTX: global (bucket_table) or shared (SLUT: slut_asm)
    st["lookups"] = st["ld_v4"] + k.asm["ptx"].count("mad.lo.u32 a, a, 128")
    st["triton"] = triton.__version__
    st["shift"] = (cx["K_SHIFT"], cx["V_SHIFT"])
    return st


if __name__ == "__main__":
    print(json.dumps(result(sys.argv[1:])))

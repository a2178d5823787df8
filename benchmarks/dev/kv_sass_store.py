"""sm_90 SASS of the store kernel (no GPU needed): python benchmarks/dev/kv_sass_store.py [--dump DIR]

Compiles tq_store's kernel for the Llama-3-8B shape (head 128, tq4 / tq3; with the key mean,
raw-key fallback and value mean, and uncalibrated; tq_store's default launch first) and prints
instruction counts, registers and spills; per code = SASS instructions of one head's loop body /
(tokens x 2 x head size) x threads. --only FORMAT,cal|plain,BLOCK_T,WARPS compiles one.
"""
import argparse
import re
import subprocess
import tempfile
from pathlib import Path

import _source_tree  # noqa: F401  this tree's vllm_gds importable
import torch
from kv_sass import BIN, compile_sm90, sass_stats

from vllm_gds.kvcache.tables import LayerTables
from vllm_gds.kernels.tq_store_kernel import _tq_store_kernel
from vllm_gds.kernels.tq_streams import stream_constexprs
from vllm_gds.kvcache.formats import FORMATS

PTRS = {"key_ptr": "*bf16", "value_ptr": "*bf16", "cache_ptr": "*u8", "slot_mapping_ptr": "*i64",
        "positions_ptr": "*i64", "rope_partner_ptr": "*i32", "bucket_ptr": "*i64"}


def store_kernel(name="tq4", calibrated=True, block_t=64, num_warps=4, heads=8):
    d = 128
    types = dict(PTRS)
    for arg in _tq_store_kernel.arg_names:
        if arg.endswith("_ptr") and arg not in types:
            types[arg] = "*fp32"
    for arg in ("kfa32", "kfb32", "vfa32", "vfb32", "kia32", "kib32"):
        types[arg] = "*fp32"
    for arg in ("kfa16", "kfb16", "vfa16", "vfb16", "kia16", "kib16"):
        types[arg] = "*fp16"
    for arg in ("kfax", "kfbx", "vfax", "vfbx"):
        types[arg] = "*bf16"
    types["rot_vm_ptr"] = "*fp32"
    types["hc32"] = "*fp32"
    types["hc16"] = "*fp16"
    types["hs32"] = "*fp32"
    types["hsx"] = "*bf16"
    t = LayerTables(FORMATS[name], d, 0, 0, "cpu", torch.bfloat16, 1)
    cx = dict(PAGE=16, STRIDE_TOK=8 * t.layout.slot_bytes, STRIDE_HEAD=t.layout.slot_bytes,
              BLOCK_T=block_t, HEADS=heads if calibrated else 1, SPLIT=1, EXACT16=True,
              KCAL=calibrated, FALLBACK=calibrated, ABS_NORM=False, MEAN=calibrated,
              VMEAN=calibrated, ALIGN=4, SAME_KV_ROT=True, CODES=0, WIDE=calibrated,
              **stream_constexprs(t.constexprs))
    cx.update({k: v for k, v in EXTRA.items() if k != "CB"})
    if not calibrated:  # as tq_store launches without the raw-key fallback
        cx.update(SYM=0, SCR=0, CHUNK=0, NEOX=0, CODES=0, PREFETCH=0, EXACT_ROT=0)
    cx.update(KB_CB=(), VB_CB=(), NO_CB=())
    from vllm_gds.kernels.tq_store import _store_constants
    const = _store_constants(t, 1, torch.bfloat16)
    if cx["CODES"] == 3 and calibrated:  # the bucketed search's constants, as tq_store's
        cx.update(KB_CB=const["bk_kb"][0] + (1,), VB_CB=const["bk_vb"][0] + (1,))
    elif EXTRA.get("CB") and calibrated:  # the codebooks as immediates, as tq_store launches them
        cx.update(KB_CB=const["cb_kb"], VB_CB=const["cb_vb"])
    divisible = [a for a in _tq_store_kernel.arg_names if a in types and types[a].startswith("*")]
    divisible += ["stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_blk"]
    return compile_sm90(_tq_store_kernel, types, cx, num_warps=num_warps, divisible=divisible,
                        num_stages=STAGES,
                        maxnreg=(128 if calibrated and cx["CHUNK"] else None) if MAXNREG is None
                        else (MAXNREG or None))


def resources(kernel) -> str:
    """Registers and spill stores/loads as ptxas reports them (cuobjdump -res-usage)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(kernel.asm["cubin"])
        out = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", str(path)], check=True,
                             capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", out)
    return f"regs {m.group(1)} stack {m.group(2)} local {m.group(3)}" if m else out.strip()


CONFIGS = {True: [(16, 4), (32, 8)], False: [(64, 8), (64, 4)]}  # tq_store's defaults first
STAGES = 1  # as tq_store launches
MAXNREG = None  # --maxnreg (StoreTuning.maxnreg; 0: no limit; default: tq_store's)
EXTRA = {"ERR": 1, "SYM": 1, "CB": 1, "SCR": 1, "CHUNK": 1, "NEOX": 1, "CODES": 3, "PREFETCH": 1, "EXACT_ROT": 1}  # more constexprs (--set NAME=VALUE,...), tq_store's defaults


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", type=Path)
    ap.add_argument("--only", help="one config: FORMAT,cal|plain,BLOCK_T,WARPS (e.g. tq4,cal,32,4)")
    ap.add_argument("--set", help="constexprs NAME=INT,... (e.g. ERR=0,CODES=1)")
    ap.add_argument("--maxnreg", type=int)
    args = ap.parse_args()
    global MAXNREG
    MAXNREG = args.maxnreg
    for kv in (args.set.split(",") if args.set else []):
        name, value = kv.split("=")
        EXTRA[name] = int(value)
    runs = [(n, c, b, w) for n in ("tq4", "tq3") for c in (True, False) for b, w in CONFIGS[c]]
    if args.only:
        n, c, b, w = args.only.split(",")
        runs = [(n, c == "cal", int(b), int(w))]
    for name, calibrated, block_t, nw in runs:
        if True:
            if True:
                k = store_kernel(name, calibrated, block_t, nw)
                total, loop, sass = sass_stats(k)
                ops = sum(total.values()) if not calibrated else sum(loop.values())
                per = ops * 32 * nw / (block_t * 2 * 128)
                mma = sum(v for op, v in total.items() if "MMA" in op)
                ptx = k.asm["ptx"]
                spill = "ld.local" in ptx or "st.local" in ptx
                print(f"{name} calibrated={calibrated} block_t={block_t} warps={nw}: "
                      f"{resources(k)}, local {spill}, shared {k.metadata.shared} B, "
                      f"{'loop' if calibrated else 'kernel'} {ops} SASS = {per:.1f} per code, "
                      f"MMA {mma}; top: "
                      + ", ".join(f"{o} {v}" for o, v in (loop if calibrated else total).most_common(10)))
                if args.dump:
                    args.dump.mkdir(parents=True, exist_ok=True)
                    stem = f"{name}_{'cal' if calibrated else 'plain'}_{block_t}_{nw}"
                    (args.dump / f"{stem}.sass").write_text(sass)
                    (args.dump / f"{stem}.ttgir").write_text(k.asm["ttgir"])


if __name__ == "__main__":
    main()

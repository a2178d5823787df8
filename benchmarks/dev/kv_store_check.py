"""The store kernel, old launch against new, in one run (issue 16's store target):

    python3 benchmarks/dev/kv_store_check.py --out $OUT          # GPU: 32K tokens, Llama-3-8B shape
    python3 benchmarks/dev/kv_store_check.py --cpu               # the same rows, tiny, interpreter

"old" is the served launch before the bucketed code search, the prefetch and the exact 16-bit
rotation (StoreTuning(codes=0, prefetch=False, exact_rot=False): the same sm_90 SASS as the
kernel before them, see benchmarks/RESULTS.md), "new" the served launch now, beside launch
variants of the new kernel.
Every row's bytes are checked against the torch reference at the timed size first
(kv_bench.store_check: keys around the RoPE'd key mean, a tenth far off, random positions < 2^17,
every 97th slot -1, other slots poisoned); then each is timed (do_bench median) against the device
copy of the same run. Prints a table last; writes kv_store_check.json under --out (default $OUT).
"""
import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

if "--cpu" in sys.argv:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

from _source_tree import ROOT  # noqa: F401  this tree's vllm_gds and benchmarks/ importable

import torch
import triton
import kv_bench as kb

OLD = dict(codes=0, prefetch=False, exact_rot=False)
# (label, format, mode, StoreTuning fields)
ROWS = [
    ("old", "tq4", "mean", OLD),
    ("new", "tq4", "mean", {}),
    ("new, with prefetch", "tq4", "mean", dict(prefetch=True)),
    ("new, compare chain", "tq4", "mean", dict(codes=0)),
    ("new, transform first (no exact_rot)", "tq4", "mean", dict(exact_rot=False)),
    ("new, maxnreg 168", "tq4", "mean", dict(maxnreg=168)),
    ("new, no register limit", "tq4", "mean", dict(maxnreg=0)),
    ("new, 16 x 2 warps, maxnreg 128", "tq4", "mean", dict(num_warps=2)),
    ("new, 16 x 2 warps, maxnreg 168", "tq4", "mean", dict(num_warps=2, maxnreg=168)),
    ("new, 16 x 2 warps, no limit", "tq4", "mean", dict(num_warps=2, maxnreg=0)),
    ("new, 64 x 4 warps, no limit", "tq4", "mean", dict(block_t=64, maxnreg=0)),
    ("new, 32 x 2 warps, no limit", "tq4", "mean", dict(block_t=32, num_warps=2, maxnreg=0)),
    ("new, 16 x 1 warp, no limit", "tq4", "mean", dict(num_warps=1, maxnreg=0)),
    ("old", "tq4", "no mean", OLD),
    ("new", "tq4", "no mean", {}),
    ("old", "tq3", "mean", OLD),
    ("new", "tq3", "mean", {}),
    ("old", "tq5", "mean", OLD),
    ("new", "tq5", "mean", {}),
    ("new (unchanged path)", "tq4", "uncalibrated", {}),
]


def _tuning(launch, cpu):
    from vllm_gds.kernels import StoreTuning
    # the interpreter's bfloat16 dot is wrong: float32 dots there (split 0)
    return StoreTuning(**dict(launch, **({"split": 0} if cpu else {})))


def check(name, mode, launch, device, tokens, cpu):
    """kv_bench.store_check with this launch: (fraction of bytes differing, others untouched)."""
    import functools
    import vllm_gds.kernels as K
    orig = K.tq_store
    K.tq_store = functools.partial(orig, tuning=_tuning(launch, cpu))
    try:
        return kb.store_check(torch, name, mode, device, tokens=tokens)
    finally:
        K.tq_store = orig


def timed(name, mode, launch, device, tokens, cpu):
    """(ms, GB/s moved) of tq_store at this launch: bf16 K and V read, slots and mapping."""
    from vllm_gds.kernels import tq_store
    calibrated, mean = kb.STORE_MODES[mode]
    tables, cache, k, v, slots, positions, moved = kb.store_timing_inputs(
        torch, name, device, tokens, calibrated, mean)
    tuning = _tuning(launch, cpu)
    fn = lambda: tq_store(k, v, cache, slots, tables, positions, tuning=tuning)  # noqa: E731
    if cpu:
        fn()
        t0 = time.perf_counter()
        fn()
        t = (time.perf_counter() - t0) * 1e3
    else:
        t = kb.bench(fn, triton)
    return t, moved / (t * 1e-3) / 1e9


def run_row(row, measure, res, out, started, budget, key="rows", say=""):
    """measure(row) fills the row unless the time budget (seconds since `started`) is spent; an
    error is kept in the row. Each row is printed, appended to res[key] and the JSON rewritten at
    once, so a run cut short keeps what it measured."""
    if time.time() - started > budget:
        row["error"] = "skipped: time budget"
    else:
        try:
            measure(row)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
    print(f"{time.time() - started:6.1f}s {say}{row}", flush=True)
    res[key].append(row)
    out.write_text(json.dumps(res, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    ap.add_argument("--cpu", action="store_true", help="tiny, under TRITON_INTERPRET=1 (set here)")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--budget", type=float, default=400.0, help="seconds; later rows skipped")
    args = ap.parse_args()
    device = "cpu" if args.cpu else "cuda"
    tokens = args.tokens or (48 if args.cpu else 32768)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "kv_store_check.json"
    started = time.time()
    if args.cpu:
        res = {"info": "cpu (interpreter)", "copy_gbs": None}
    else:
        res = {"info": torch.cuda.get_device_name(), "copy_gbs": kb.copy_bandwidth(torch, triton, device)}
    res.update(tokens=tokens, rows=[])
    copy = res["copy_gbs"]
    print(f"{res['info']}: copy {copy or 0:.0f} GB/s, {tokens} tokens", flush=True)
    for label, name, mode, launch in ROWS:
        def measure(row):
            frac, untouched = check(name, mode, launch, device, tokens, args.cpu)
            row.update(byte_mismatch=frac, untouched_ok=untouched)
            t, gbs = timed(name, mode, launch, device, tokens, args.cpu)
            row.update(ms=t, gbs=gbs, of_copy=gbs / copy if copy else None)
        run_row(dict(label=label, format=name, mode=mode, launch=launch), measure, res, out, started,
                args.budget)
    base = {(r["format"], r["mode"]): r["ms"] for r in res["rows"] if r["label"] == "old" and "ms" in r}
    print(f"\n{res['info']}, copy {copy or 0:.0f} GB/s, {tokens} new tokens, Llama-3-8B shape")
    print(f"{'launch':36} {'format':6} {'mode':12} {'bytes differ':>12} {'ms':>8} {'copy':>6} {'vs old':>6}")
    for r in res["rows"]:
        head = f"{r['label']:36} {r['format']:6} {r['mode']:12}"
        if "error" in r:
            print(f"{head} ERROR {r['error'][:70]}")
            continue
        old = base.get((r["format"], r["mode"]))
        share = f"{r['of_copy']:6.1%}" if r["of_copy"] else "     -"
        speed = f"{old / r['ms']:5.2f}x" if old else "     -"
        flag = "" if r["untouched_ok"] else " OTHER SLOTS WRITTEN"
        print(f"{head} {r['byte_mismatch']:12.2e} {r['ms']:8.3f} {share} {speed}{flag}")


if __name__ == "__main__":
    main()

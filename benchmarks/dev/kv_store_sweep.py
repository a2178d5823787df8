"""Store kernel launch sweep on the GPU (kv_bench's inputs):

    python3 benchmarks/dev/kv_store_sweep.py [--out DIR] [--budget SECONDS]

Optionally with an older kernel file as a baseline in the same run (rows "prev"; it must still
import against today's kernels/), e.g. the one the fourth pass compared with:

    git show b44572f:kernels/tq_store.py > /tmp/tq_store_prev.py
    python3 benchmarks/dev/kv_store_sweep.py --prev /tmp/tq_store_prev.py

32K new tokens at the Llama-3-8B shape; each format/calibration over tiles, warps and the code
search (StoreTuning's codes); the device copy in the same run; bytes against the reference
(kv_bench.store_check) for several launches. Prints a table last and writes kv_store_sweep.json
under --out (default $OUT, else benchmarks/results/; benchmarks/results/kv_store_sweep.json is
the fourth pass in benchmarks/RESULTS.md, run with the b44572f baseline)."""
import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from _source_tree import ROOT  # this tree's vllm_gds and benchmarks/ importable

import torch
import triton
import kv_bench as kb

N = None
# (label, format, mode, StoreTuning fields); "prev" runs the kernel file given with --prev
# (a baseline in the same run; those rows are left out without it). Fourth pass: the
# fallback path's variants (StoreTuning's sym, imm_codebooks, via_memory, chunks) and launches
# (its err switch, the fallback's errors from decoded keys, went with the rotated errors).
# The run in benchmarks/RESULTS.md ("Store kernel, fourth pass"; results/kv_store_sweep.json) as
# StoreTuning now spells it: it ran before chunks (with maxnreg 128) became the
# default, so chunks=False / maxnreg=0 (no limit) name the launches that were then the default.
PREV_PLAN = [("prev", "tq4", "mean", {}), ("prev", "tq4", "uncalibrated", {}),
             ("prev", "tq3", "mean", {})]
PLAN = []
OLD = dict(chunks=False)
for launch in [OLD, dict(OLD, maxnreg=168), dict(OLD, block_t=16, num_warps=8),
               dict(OLD, block_t=16, num_warps=8, maxnreg=128), dict(OLD, via_memory=False),
               dict(sym=False), dict(OLD, imm_codebooks=False),
               dict(sym=False, imm_codebooks=False),
               dict(chunks=True, maxnreg=0), dict(chunks=True, maxnreg=128),
               dict(chunks=True, maxnreg=168)]:
    PLAN.append(("new", "tq4", "mean", launch))
PLAN += [("new", "tq4", "no mean", OLD), ("new", "tq4", "no mean", dict(chunks=True, maxnreg=0)),
         ("new", "tq3", "mean", OLD), ("new", "tq3", "mean", dict(chunks=True, maxnreg=0)),
         ("new", "tq4", "uncalibrated", {})]
CHECKS = [("tq4", "mean", OLD), ("tq4", "mean", dict(chunks=True, maxnreg=0)),
          ("tq4", "mean", dict(OLD, via_memory=False)),
          ("tq4", "mean", dict(OLD, block_t=16, num_warps=8)),
          ("tq3", "mean", OLD), ("tq3", "mean", dict(chunks=True, maxnreg=0)),
          ("tq4", "no mean", OLD), ("tq4", "uncalibrated", {})]
LAUNCH_KEYS = ("block_t", "num_warps", "codes", "maxnreg", "sym", "imm_codebooks",
               "via_memory", "chunks")


def load_prev(path):
    """tq_store of an older kernel file, loaded as vllm_gds.kernels.tq_store_prev (so its
    relative imports find today's kernels/ modules)."""
    import importlib.util

    import vllm_gds.kernels  # noqa: F401  the parent package first

    spec = importlib.util.spec_from_file_location("vllm_gds.kernels.tq_store_prev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.tq_store


PREV = None  # tq_store of --prev


def _store_fn(label, launch):
    """tq_store(k, v, cache, slots, tables, positions) with these launch settings (the older
    file takes them as keyword arguments, today's as a StoreTuning)."""
    if label == "prev":
        return lambda *a: PREV(*a[:5], positions=a[5], **launch)
    from vllm_gds.kernels import StoreTuning, tq_store
    tuning = StoreTuning(**launch)
    return lambda *a: tq_store(*a, tuning=tuning)


def bandwidth(label, name, mode, launch, tokens=32768):
    tq_store = _store_fn(label, launch)
    calibrated, mean = kb.STORE_MODES[mode]
    tables, cache, k, v, slots, positions, moved = kb.store_timing_inputs(
        torch, name, "cuda", tokens, calibrated, mean)
    t = kb.bench(lambda: tq_store(k, v, cache, slots, tables, positions), triton)
    return t, moved / (t * 1e-3) / 1e9


def check(name, mode, launch):
    """kv_bench.store_check with these launch settings (StoreTuning fields)."""
    import functools
    import vllm_gds.kernels as K
    orig = K.tq_store
    K.tq_store = functools.partial(orig, tuning=K.StoreTuning(**launch))
    try:
        return kb.store_check(torch, name, mode, "cuda")
    finally:
        K.tq_store = orig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path,
                    default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    ap.add_argument("--budget", type=float, default=250.0,
                    help="seconds; launches not started by then are skipped (listed as such)")
    ap.add_argument("--prev", type=Path, help="an older tq_store.py to time beside today's "
                    "(e.g. from git show b44572f:kernels/tq_store.py); rows 'prev'")
    args = ap.parse_args()
    global PREV
    if args.prev:
        PREV = load_prev(args.prev)
    args.out.mkdir(parents=True, exist_ok=True)
    import time
    started = time.time()
    res = {"info": torch.cuda.get_device_name(), "copy_gbs": kb.copy_bandwidth(torch, triton, "cuda"),
           "store": [], "check": []}
    copy = res["copy_gbs"]
    print(f"copy {copy:.0f} GB/s", flush=True)
    def run_checks(checks):
        for name, mode, launch in checks:
            if time.time() - started > args.budget + 30:
                print(f"check {name} {mode} {launch}: skipped (time budget)", flush=True)
                continue
            try:
                frac, ok = check(name, mode, launch)
                res["check"].append(dict(format=name, mode=mode, launch=launch,
                                         byte_mismatch=frac, untouched_ok=ok))
                print(f"check {name} {mode} {launch}: {frac:.2e} bytes differ, untouched {ok}",
                      flush=True)
            except Exception:
                print(f"check {name} {mode} FAILED\n{traceback.format_exc()}", flush=True)
            (args.out / "kv_store_sweep.json").write_text(json.dumps(res, indent=1))

    run_checks(CHECKS[:2])
    for label, name, mode, launch in (PREV_PLAN if PREV else []) + PLAN:
        row = dict(kernel=label, format=name, mode=mode, **launch)
        if time.time() - started > args.budget:
            row["error"] = "skipped: time budget"
            res["store"].append(row)
            continue
        try:
            t, gbs = bandwidth(label, name, mode, launch)
            row.update(ms=t, gbs=gbs, of_copy=gbs / copy)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(f"{time.time() - started:6.1f}s {row}", flush=True)
        res["store"].append(row)
        (args.out / "kv_store_sweep.json").write_text(json.dumps(res, indent=1))
    run_checks(CHECKS[2:])
    print(f"\n{'kernel':6} {'format':6} {'mode':13} {'launch':40} {'ms':>8} {'GB/s':>6} copy")
    for r in res["store"]:
        launch = {k: v for k, v in r.items() if k in LAUNCH_KEYS}
        head = f"{r['kernel']:6} {r['format']:6} {r['mode']:13} {str(launch):40}"
        if "error" in r:
            print(f"{head} ERROR {r['error'][:80]}")
        else:
            print(f"{head} {r['ms']:8.4f} {r['gbs']:6.0f} {r['of_copy']:.1%}")

if __name__ == "__main__":
    main()

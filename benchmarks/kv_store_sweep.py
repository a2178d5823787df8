"""Store kernel launch sweep on the GPU (kv_bench's inputs), with the previous kernel as a
baseline in the same run:

    git show b44572f:kernels/tq_store.py > kernels/tq_store_prev.py   # not committed
    ln -sfn ../kernels vllm_gds/kernels && PYTHONPATH=$PWD python3 benchmarks/kv_store_sweep.py

32K new tokens at the Llama-3-8B shape; each format/calibration over tiles, warps and the code
search (tq_store's codes=); the device copy in the same run; bytes against the reference
(kv_bench.store_check) for several launches. Prints a table last and writes kv_store_sweep.json
under --out (benchmarks/kv_store_sweep_4.json: the fourth pass in benchmarks/RESULTS.md;
benchmarks/kv_store_sweep.json: the third)."""
import argparse
import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import triton  # noqa: E402
import kv_bench as kb  # noqa: E402

N = None
# (label, format, mode, launch keyword arguments); "prev" runs kernels/tq_store_prev.py where the
# command put the previous commit's kernel there (a baseline in the same run). Fourth pass: the
# fallback path's variants (tq_store's sym, err, imm_codebooks, via_memory, chunks) and launches.
# The run in benchmarks/RESULTS.md ("Store kernel, fourth pass"; kv_store_sweep_4.json) as
# tq_store's launch arguments now spell it: it ran before chunks (with maxnreg 128) became the
# default, so chunks=False / maxnreg=0 (no limit) name the launches that were then the default.
PLAN = [("prev", "tq4", "mean", {}), ("prev", "tq4", "uncalibrated", {}),
        ("prev", "tq3", "mean", {})]
OLD = dict(chunks=False)
for launch in [OLD, dict(OLD, maxnreg=168), dict(OLD, block_t=16, num_warps=8),
               dict(OLD, block_t=16, num_warps=8, maxnreg=128), dict(OLD, via_memory=False),
               dict(sym=False), dict(OLD, imm_codebooks=False),
               dict(err=0, sym=False, imm_codebooks=False),
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
LAUNCH_KEYS = ("block_t", "num_warps", "codes", "maxnreg", "sym", "err", "imm_codebooks",
               "via_memory", "chunks")


def _store_fn(label):
    if label == "prev":
        from vllm_gds.kernels.tq_store_prev import tq_store
    else:
        from vllm_gds.kernels import tq_store
    return tq_store


def bandwidth(label, name, mode, launch, tokens=32768):
    from vllm_gds.kvcache.formats import get_format
    from vllm_gds.kvcache.tables import LayerTables
    tq_store = _store_fn(label)
    calibrated, mean = kb.STORE_MODES[mode]
    hq, hk, d = kb.SHAPES["Llama-3-8B"]
    dev = "cuda"
    if calibrated:
        tables = kb.our_tables(torch, name, hk, d, dev, mean)
    else:
        tables = LayerTables(get_format(name), d, 0, 0, dev, torch.bfloat16, hk)
    cache = torch.empty(tokens // kb.PAGE + 1, kb.PAGE, hk, tables.layout.slot_bytes, device=dev,
                        dtype=torch.uint8)
    k = torch.randn(tokens, hk, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(tokens, hk, d, device=dev, dtype=torch.bfloat16)
    slots = torch.randperm(tokens, device=dev)
    positions = torch.arange(tokens, device=dev)
    t = kb.bench(lambda: tq_store(k, v, cache, slots, tables, positions=positions, **launch),
                 triton)
    moved = 2 * k.numel() * 2 + tokens * hk * tables.layout.slot_bytes + slots.numel() * 8
    return t, moved / (t * 1e-3) / 1e9


def check(name, mode, launch):
    """kv_bench.store_check with these launch arguments."""
    import functools
    import vllm_gds.kernels as K
    orig = K.tq_store
    K.tq_store = functools.partial(orig, **launch)
    try:
        return kb.store_check(torch, name, mode, "cuda")
    finally:
        K.tq_store = orig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--budget", type=float, default=250.0,
                    help="seconds; launches not started by then are skipped (listed as such)")
    args = ap.parse_args()
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
    for label, name, mode, launch in PLAN:
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

"""Decode split counts (issue 16): time tq4 decode at several `splits` per shape, three ways.

- graph: one CUDA graph of R calls, each on its own copy of the cache (R copies >= 200 MB, so the
  L2 holds none of them between calls), replayed; ms per call. Pure device time, what vLLM's
  CUDA-graph decode sees.
- bench: triton.testing.do_bench median of one call, 3 times (kv_bench's timing; do_bench zeroes a
  256 MB buffer before each call, so it never measures an L2-resident cache, but a call whose host
  launch takes longer than that memset shows host time).
- host: microseconds of Python + launch per call (200 calls, no sync between them).
- attn / reduce: device microseconds of each kernel per call (torch.profiler, 10 eager calls).

    PYTHONPATH=$PWD python3 benchmarks/dev/kv_split_sweep.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import _source_tree  # noqa: F401  this tree's vllm_gds and benchmarks/ importable
import kv_bench

SHAPES = [  # name, hq, hk, d, batch, ctx
    ("Llama-3-70B TP8", 8, 1, 128, 1, 32768),
    ("Llama-3-70B TP8", 8, 1, 128, 8, 32768),
    ("Llama-3-70B TP8", 8, 1, 128, 32, 4096),
    ("Llama-3-70B TP8", 8, 1, 128, 8, 131072),
    ("Llama-3-8B", 32, 8, 128, 1, 32768),
    ("Llama-3-8B", 32, 8, 128, 8, 32768),
    ("SmolLM2-135M", 9, 3, 64, 1, 32768),
]
# --fixed: one or two tiles per sequence, the cost of a program that reads (almost) nothing
FIXED_SHAPES = [
    ("Llama-3-70B TP8", 8, 1, 128, 1, 128),
    ("Llama-3-70B TP8", 8, 1, 128, 32, 128),
    ("Llama-3-8B", 32, 8, 128, 1, 128),
    ("Llama-3-8B", 32, 8, 128, 32, 128),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--format", default="tq4")
    ap.add_argument("--fixed", action="store_true", help="add FIXED_SHAPES (tiny contexts)")
    ap.add_argument("--only", default="", help="substring of 'shape bxctx' to run")
    ap.add_argument("--group", type=int, default=0,
                    help="the Hopper decode's MERGE_GROUP for this run (0: the served one)")
    args = ap.parse_args()
    import torch
    import triton

    from vllm_gds.kernels import AttentionTuning, default_splits, tq_attention

    device = torch.device("cuda")
    if args.group:  # read when a plan is made (each shape's tables are new)
        from vllm_gds.kernels import tq_decode_hopper

        tq_decode_hopper.MERGE_GROUP = args.group
    kv_bench.warm_up(torch, device)
    rows = []
    out_path = args.out / "kv_split_sweep.json"
    shapes = SHAPES + (FIXED_SHAPES if args.fixed else [])
    for shape, hq, hk, d, b, ctx in shapes:
        if args.only and args.only not in f"{shape} {b}x{ctx}":
            continue
        tables = kv_bench.our_tables(torch, args.format, hk, d, device)
        num_blocks, bt = kv_bench.paged_layout(torch, b, ctx, device)
        cache = kv_bench.fill_ours(torch, tables, num_blocks, hk, d, device)
        nbytes = cache.numel()
        reps = max(1, min(64, -(-200_000_000 // nbytes)))
        caches = [cache] + [cache.clone() for _ in range(reps - 1)]
        q = torch.randn(b, hq, d, device=device, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        qsl = torch.arange(b + 1, device=device, dtype=torch.int32)
        sl = torch.full((b,), ctx, device=device, dtype=torch.int32)
        dflt = default_splits(b, hk, device, hopper=tables.hopper_codes is not None)
        tiles = ctx // 64
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        per_wave = [n * sms // (b * hk) for n in (1, 2, 3)]  # programs = 1, 2, 3 per SM
        cands = sorted({s for s in (dflt // 4, dflt // 2, dflt * 2, dflt * 4, *per_wave)
                        if (s <= tiles or ctx <= 256) and s * b * hk <= 8 * 132 * 4 and s >= 1} | {dflt})
        for splits in cands:
            def call(c=cache, s=AttentionTuning(splits=splits)):
                tq_attention(q, c, bt, sl, qsl, tables, d ** -0.5, out, max_query_len=1, tuning=s)

            try:
                call()
                torch.cuda.synchronize()
                bench = [triton.testing.do_bench(call, warmup=20, rep=80, return_mode="median")
                         for _ in range(3)]
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(200):
                    call()
                host_us = (time.perf_counter() - t0) / 200 * 1e6
                torch.cuda.synchronize()
                graph = []
                kv_bench.graph_time(torch, [lambda c=c: call(c) for c in caches], runs=graph)
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for c in caches[:10]:
                        call(c)
                    torch.cuda.synchronize()
                attn = red = 0.0
                for ev in prof.key_averages():
                    t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
                    if "_tq_reduce_kernel" in ev.key:
                        red += t
                    elif "_tq_attention_kernel" in ev.key or "_tq_decode_hopper" in ev.key:
                        attn += t
                n = min(10, len(caches))
                row = dict(shape=shape, batch=b, ctx=ctx, splits=splits, default=splits == dflt,
                           group=args.group or None,
                           programs=b * hk * splits, graph_ms=sorted(graph)[2],
                           graph_spread=[min(graph), max(graph)], bench_ms=bench,
                           host_us=host_us, attn_us=attn / n, reduce_us=red / n, copies=reps,
                           cache_mb=nbytes / 1e6)
            except Exception as e:  # one bad launch must not end the sweep
                row = dict(shape=shape, batch=b, ctx=ctx, splits=splits, error=repr(e)[:300])
            rows.append(row)
            print(json.dumps(row), flush=True)
            out_path.write_text(json.dumps(rows, indent=1))
        del caches, cache
        torch.cuda.empty_cache()
    print("\n| shape | b x ctx | splits | programs | graph ms | do_bench ms (3) | host us | attn us | reduce us |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['batch']}x{r['ctx'] // 1024}K | {r['splits']} | ERROR {r['error'][:60]} |")
            continue
        mark = "*" if r["default"] else ""
        print(f"| {r['shape']} | {r['batch']}x{r['ctx'] // 1024}K | {r['splits']}{mark} | {r['programs']} "
              f"| {r['graph_ms']:.4f} | {' '.join(f'{x:.3f}' for x in r['bench_ms'])} "
              f"| {r['host_us']:.0f} | {r['attn_us']:.1f} | {r['reduce_us']:.1f} |")


if __name__ == "__main__":
    main()

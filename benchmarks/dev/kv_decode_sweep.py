"""Decode launch and calibration sweep of tq4 on one GPU (issue 5): what the key-mean term, the
raw-key fallback and the launch parameters cost. Llama-3-8B attention shape (32 query heads, 8 KV
heads, head 128); BF16 = torch SDPA on a contiguous cache, timed in the same run.

    python3 benchmarks/dev/kv_decode_sweep.py      # writes $OUT/kv_decode_sweep.json (default benchmarks/results/)

Variants: the key mean on all 64 RoPE pairs, on the 32 (tq4 as served), 16 or 8 pairs of largest
mean energy per head (calibration_file.top_pairs), or none; the raw-key fallback on or off. Each
variant's cache is filled once per shape and timed under every launch (block_n, num_warps,
num_stages, maxnreg, split factor, the key mean's per-tile rotation step, page-wise addresses,
the raw keys folded into the spare rows of the score dots).
Every launch is checked against the gather path with neither of the last two on the same cache
(the mean's cos/sin computed exactly every tile, raw keys scored by their own dots). Prints a table of ms and ratios to BF16 last.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import triton

from _source_tree import ROOT  # this tree's vllm_gds and benchmarks/ importable
import kv_bench as kb

SHAPES = [(32, 4096), (64, 8192), (8, 32768)]
LAUNCHES = [  # block_n, num_warps, num_stages, maxnreg, split factor, mean step, paged, fold;
    # the first is the default
    (64, 4, 2, 128, 1, True, True, True), (64, 4, 1, 128, 1, True, True, True),
    (64, 4, 1, 128, 1, True, True, False), (64, 4, 2, 128, 2, True, True, True),
    (64, 4, 2, 120, 1, True, True, True), (64, 4, 3, 128, 1, True, True, True),
]
VARIANTS = [  # name, key-mean pairs kept (None: all, 0: no mean), fallback
    ("mean64+fb", None, True), ("mean64", None, False), ("mean8+fb", 8, True), ("mean8", 8, False),
    ("mean32+fb", 32, True), ("mean16+fb", 16, True), ("nomean+fb", 0, True), ("nomean", 0, False),
]


def tables_for(pairs, fallback, hk, d, device):
    from vllm_gds.kvcache.calibration_file import top_pairs
    from vllm_gds.kvcache.formats import get_format
    from vllm_gds.kvcache.tables import LayerTables

    fmt = dataclasses.replace(get_format("tq4"), key_raw_fallback=fallback)
    cal = kb.calibration(torch, hk, d, mean=pairs != 0)
    if pairs:
        cal["key_mean"] = top_pairs(cal["key_mean"], None, pairs / (d // 2), d // 2, least=1)
    return LayerTables(fmt, d, 0, 0, device, torch.bfloat16, hk, **cal)


def fill(tables, num_blocks, hk, d, device, chunk=1 << 16):
    """The cache of num_blocks pages of random keys and values (16-token store tiles)."""
    from vllm_gds.kernels import StoreTuning, tq_store

    cache = torch.empty(num_blocks, kb.PAGE, hk, tables.layout.slot_bytes, dtype=torch.uint8,
                        device=device)
    for start in range(0, num_blocks * kb.PAGE, chunk):
        n = min(chunk, num_blocks * kb.PAGE - start)
        k = torch.randn(n, hk, d, device=device, dtype=torch.bfloat16)
        v = torch.randn(n, hk, d, device=device, dtype=torch.bfloat16)
        slots = torch.arange(start, start + n, device=device, dtype=torch.int64)
        tq_store(k, v, cache, slots, tables, slots, tuning=StoreTuning(block_t=16))
    return cache


LAUNCH_KEYS = ("block_n", "warps", "stages", "maxnreg", "split_factor", "mean_step", "paged", "fold")


def compiled(fn):
    """The attention kernels compiled so far, oldest first (Triton's cache; [] where another
    Triton keeps it elsewhere)."""
    import importlib

    mod = importlib.import_module(fn.__module__)
    try:
        return [k for c in mod._tq_attention_kernel.device_caches.values() for k in c[0].values()]
    except Exception:
        return []


def main():
    from vllm_gds.kernels import AttentionTuning, default_splits, tq_attention

    global VARIANTS, LAUNCHES  # a subset: KV_SWEEP_VARIANTS=mean64+fb,mean8 KV_SWEEP_LAUNCHES=0,2
    if os.environ.get("KV_SWEEP_VARIANTS"):
        VARIANTS = [v for v in VARIANTS if v[0] in os.environ["KV_SWEEP_VARIANTS"].split(",")]
    global SHAPES  # KV_SWEEP_SHAPES=1x32768,8x131072
    if os.environ.get("KV_SWEEP_SHAPES"):
        SHAPES = [tuple(map(int, x.split("x"))) for x in os.environ["KV_SWEEP_SHAPES"].split(",")]
    if os.environ.get("KV_SWEEP_SPLITS"):  # launches: the default at these split factors
        LAUNCHES = [LAUNCHES[0][:4] + (float(f),) + LAUNCHES[0][5:]
                    for f in os.environ["KV_SWEEP_SPLITS"].split(",")] + [
            (128, 8, 2, 128, 1.0, True, True, True)]
    if os.environ.get("KV_SWEEP_LAUNCHES"):
        LAUNCHES = [LAUNCHES[int(i)] for i in os.environ["KV_SWEEP_LAUNCHES"].split(",")]

    device = torch.device("cuda")
    hq, hk, d = 32, 8, 128
    props = torch.cuda.get_device_properties(device)
    print(json.dumps({"card": props.name, "torch": torch.__version__, "triton": triton.__version__}))
    kb.warm_up(torch, device)
    rows = []
    regs_of = {}  # registers and spilled bytes per launch, from its first compile
    for b, ctx in SHAPES:
        sdpa, _ = kb.time_sdpa(torch, triton, b, ctx, hq, hk, d, device)
        num_blocks, bt = kb.paged_layout(torch, b, ctx, device)
        q = torch.randn(b, hq, d, device=device, dtype=torch.bfloat16)
        qsl = torch.arange(b + 1, device=device, dtype=torch.int32)
        seq_lens = torch.full((b,), ctx, device=device, dtype=torch.int32)
        for vname, pairs, fallback in VARIANTS:
            tables = tables_for(pairs, fallback, hk, d, device)
            cache = fill(tables, num_blocks, hk, d, device)
            plain = AttentionTuning(fast=False, mean_step=False, paged=False, fold=False)
            ref = tq_attention(q, cache, bt, seq_lens, qsl, tables, d**-0.5, max_query_len=1,
                               tuning=plain).float()
            for bn, nw, st, mr, sf, mst, pg, fd in LAUNCHES:
                splits = max(1, int(default_splits(b, hk, device) * sf))
                out = torch.empty_like(q)
                launch = AttentionTuning(splits=splits, block_n=bn, num_warps=nw, num_stages=st,
                                         maxnreg=mr, mean_step=mst, paged=pg, fold=fd)

                def run():
                    tq_attention(q, cache, bt, seq_lens, qsl, tables, d**-0.5, out,
                                 max_query_len=1, tuning=launch)
                try:
                    before = len(compiled(tq_attention))
                    ms = kb.bench(run, triton)
                    err = float((out.float() - ref).norm() / ref.norm())
                    new = compiled(tq_attention)[before:]  # none: compiled for an earlier shape
                    regs, spills = ((new[-1].n_regs, new[-1].n_spills) if new
                                    else regs_of.get((vname, bn, nw, st, mr, sf, mst, pg, fd), (None, None)))
                    regs_of[(vname, bn, nw, st, mr, sf, mst, pg, fd)] = (regs, spills)
                except Exception as e:  # a launch the compiler refuses: say so, go on
                    ms, err = float("nan"), str(e).splitlines()[0][:80]
                    regs = spills = None
                row = dict(batch=b, ctx=ctx, variant=vname, block_n=bn, warps=nw, stages=st,
                           maxnreg=mr, split_factor=sf, mean_step=mst, paged=pg,
                           fold=fd, regs=regs, spills=spills, ms=ms, sdpa_ms=sdpa, err=err)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del cache
            torch.cuda.empty_cache()
    out = Path(os.environ.get("OUT", ROOT / "benchmarks" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_decode_sweep.json").write_text(json.dumps(rows, indent=1))
    print("\nbest launch per variant and shape (ms, x BF16 SDPA), default launch beside it")
    print("| variant | " + " | ".join(f"{b}x{c // 1024}K best | launch | default" for b, c in SHAPES) + " |")
    for vname, _, _ in VARIANTS:
        cells = []
        for b, ctx in SHAPES:
            rs = [r for r in rows if r["variant"] == vname and r["batch"] == b and r["ctx"] == ctx
                  and r["ms"] == r["ms"]]
            best = min(rs, key=lambda r: r["ms"])
            dflt = rs[0]
            cells.append(f"{best['ms']:.3f} ({best['ms'] / best['sdpa_ms']:.2f}x) | "
                         f"{best['block_n']}/{best['warps']}/{best['stages']}/{best['maxnreg']}/"
                         f"{best['split_factor']}/{best['mean_step']:d}/{best['paged']:d}/{best['fold']:d} | "
                         f"{dflt['ms']:.3f}")
        print(f"| {vname} | " + " | ".join(cells) + " |")
    print("\nevery launch (block_n/warps/stages/maxnreg/split factor/mean step/paged/fold): ms, "
          "registers/spilled bytes")
    for vname, _, _ in VARIANTS:
        for launch in LAUNCHES:
            cells = []
            for b, ctx in SHAPES:
                r = next(r for r in rows if r["variant"] == vname and r["batch"] == b
                         and r["ctx"] == ctx and tuple(r[k] for k in LAUNCH_KEYS) == launch)
                cells.append(f"{r['ms']:.3f} ({r['regs']}/{r['spills']})")
            print(f"| {vname} | {'/'.join(format(x, 'g') for x in launch)} | " + " | ".join(cells) + " |")
    print("SDPA BF16 ms: " + ", ".join(f"{b}x{c // 1024}K {next(r['sdpa_ms'] for r in rows if r['batch'] == b and r['ctx'] == c):.3f}"
                                       for b, c in SHAPES))
    print("max rel err fast vs gather path: " + str(max(r["err"] for r in rows if isinstance(r["err"], float))))


if __name__ == "__main__":
    main()

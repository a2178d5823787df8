"""Check and time the Hopper decode (kernels/tq_decode_hopper.py; tq4, or --format tq3 / tq5) on the GPU
machine, in one run:

    python3 benchmarks/dev/kv_hopper_check.py --out $OUT

1. The register tricks alone (kv_hopper_probe.py): decoded operands and the P transpose.
2. Small shapes against tests/kv_reference-style exact attention over the reference decoding
   (the store kernel's bytes, fresh random inputs, NaN-poisoned outputs), head 128 and 64, ragged
   lengths, splits 1 and several, with and without the key mean, with and without the fallback.
3. Every served shape at full size (Llama-3-8B, Llama-3-70B TP8, SmolLM2-135M): the cache filled by
   the real store kernel (keys around RoPE_p(key mean), a tenth far off, so the raw fallback takes
   some), the fast path's output against the portable tq_attention's (same cache, same query),
   NaN check; then times with triton.testing.do_bench (median) and as CUDA graphs (device time,
   caches rotated out of the L2): the fast path's variants, the portable kernel, torch SDPA BF16.
Each shape is caught on its own (the traceback's head is printed, the run goes on). A short table
comes last; everything goes to $OUT/kv_hopper_check.json. Needs torch + Triton >= 3.6, no vLLM.
--sweep: the launch sweep at four shapes instead (graph times), for finding what limits the kernel.
Over 400 lines: one command that checks and times everything (the GPU runs are few).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import _source_tree  # noqa: F401  this tree's vllm_gds importable, benchmarks/ on sys.path
import torch
import triton

import kv_bench as kb

SHAPES = {
    "Llama-3-8B": ((32, 8, 128), [(32, 4096), (64, 8192), (8, 32768), (1, 32768), (8, 131072)]),
    "Llama-3-70B TP8": ((8, 1, 128), [(32, 4096), (64, 8192), (1, 32768), (8, 131072)]),
    "SmolLM2-135M": ((9, 3, 64), [(32, 4096), (8, 32768), (1, 32768)]),
}
# The fast path's launch variants, checked and timed at every shape (keyword arguments of
# tq_decode_hopper, split_factor: times the default split count): the default (tq_decode_hopper's
# PREFETCH and MAXNREG); no register limit; no prefetch; P transposed by the compiler's
# layout conversion instead of movmatrix; the lookup on bytes (two fewer permutes per 8 codes;
# spills with prefetch, so without); 2x and 4x the default splits; 8 warps a program; the key
# mean's operand rotated by every warp in its registers instead of once through shared memory.
VARIANTS = {"fast": {}, "fast_nolimit": {"maxnreg": 0}, "fast_nopf": {"prefetch": False},
            "fast_shfl": {"trans_asm": False}, "fast_bytes": {"codes": 2, "prefetch": False},
            "fast_x2": {"split_factor": 2}, "fast_x4": {"split_factor": 4},
            "fast_w8": {"num_warps": 8}, "fast_meanreg": {"mean_smem": False}}


def log(msg):
    print(msg, flush=True)


def tb_head(n=12):
    lines = traceback.format_exc().strip().splitlines()
    return "\n".join(lines[:4] + ["  ..."] + lines[-n:]) if len(lines) > n + 4 else "\n".join(lines)


FORMAT = ["tq4"]  # --format: the cache format checked (tq4, or tq3 / tq5: head 128 only)


def tables_for(hk, d, device, mean=True, fallback=True):
    from vllm_gds.kvcache.hopper_tables import attach

    t = attach(kb.our_tables(torch, FORMAT[0], hk, d, device, mean))
    if not fallback:
        t.fallback = False
    return t


def rope_mean(tables, positions):
    """RoPE_p(key mean) [n, hk, d] on the GPU (float32; data generation only)."""
    ang = positions.double()[:, None] * tables.rope_theta.double()[None, :]
    c, s = ang.cos().float(), ang.sin().float()
    mu = tables.key_mean  # [hk, d], attention scaling applied
    partner = mu[:, tables.rope_partner.long()] * tables.rope_sign
    return mu[None] * c[:, None, :] + partner[None] * s[:, None, :]


def fill(tables, bt, hk, d, device, chunk=1 << 16):
    """A paged cache [blocks, PAGE, hk, slot] written by tq_store at the tokens' real positions:
    keys 0.3 randn + RoPE_p(key mean), a tenth 4x far off; values randn (bf16 inputs)."""
    from vllm_gds.kernels import tq_store

    page = kb.PAGE
    num_blocks = int(bt.max()) + 1
    per_seq = bt.shape[1]
    where = torch.empty(num_blocks, dtype=torch.long, device=device)
    where[bt.flatten().long()] = torch.arange(bt.numel(), device=device) % per_seq
    cache = torch.full((num_blocks, page, hk, tables.layout.slot_bytes), 0xAB, dtype=torch.uint8,
                       device=device)
    total = num_blocks * page
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        slots = torch.arange(start, start + n, device=device)
        pos = where[slots // page] * page + slots % page
        k = torch.randn(n, hk, d, device=device) * (1 + 3 * (torch.rand(n, hk, 1, device=device)
                                                             < 0.1))
        if tables.has_mean:
            k = 0.3 * k + rope_mean(tables, pos)
        v = torch.randn(n, hk, d, device=device)
        tq_store(k.bfloat16(), v.bfloat16(), cache, slots, tables, positions=pos)
    return cache


def portable(q, cache, bt, sl, qsl, tables, out, splits=None):
    from vllm_gds.kernels.tq_attention import AttentionTuning, tq_attention

    # hopper=False: the served launch would take the Hopper kernel itself on sm_90
    return tq_attention(q, cache, bt, sl, qsl, tables, q.shape[-1] ** -0.5, out, max_query_len=1,
                        tuning=AttentionTuning(splits=splits, hopper=False))


def fast(q, cache, bt, sl, qsl, tables, out, split_factor=1, splits=None, **kw):
    from vllm_gds.kernels.tq_attention import default_splits
    from vllm_gds.kernels.tq_decode_hopper import tq_decode_hopper

    if splits is None:
        splits = default_splits(sl.shape[0], cache.shape[2], q.device, hopper=True)
    return tq_decode_hopper(q, cache, bt, sl, qsl, tables, q.shape[-1] ** -0.5, out,
                            splits=splits * split_factor, **kw)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------------------------
# 1. Small shapes against the exact reference


def reference_case(hq, hk, d, seq_lens, splits, mean, fallback, device):
    """Fast path and portable kernel vs exact attention over the reference decoding."""
    from vllm_gds.kernels import tq_store
    from vllm_gds.kvcache.formats import get_format
    from vllm_gds.kvcache.quantizer import KVLayerQuantizer

    page = kb.PAGE
    tables = tables_for(hk, d, device, mean, fallback)
    cal = kb.served_calibration(torch, FORMAT[0], hk, d, mean)
    cal = {k: v for k, v in cal.items() if v is not None}
    lq = KVLayerQuantizer(get_format(FORMAT[0]), d, 0, 0, **cal)
    if not fallback:
        lq.fallback = False
    num_blocks, bt, slot_map, positions = kb.ragged_pages(torch, seq_lens, device, page)
    T = positions.numel()
    k = torch.randn(T, hk, d, device=device) * (1 + 3 * (torch.rand(T, 1, 1, device=device) < 0.1))
    if mean:
        k = 0.3 * k + lq.key_mean_at(positions.cpu()).to(device)
    v = torch.randn(T, hk, d, device=device)
    cache = torch.full((num_blocks, page, hk, tables.layout.slot_bytes), 0xAB, dtype=torch.uint8,
                       device=device)
    tq_store(k.bfloat16(), v.bfloat16(), cache, slot_map, tables, positions=positions)
    got = cache.view(-1, hk, tables.layout.slot_bytes)[slot_map]
    kd, vd = kb.decode_slots(torch, lq, tables.layout, got, positions)
    q = torch.randn(len(seq_lens), hq, d, device=device, dtype=torch.bfloat16)
    qsl = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=device)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    refs, start = [], 0
    for i, s in enumerate(seq_lens):
        kk = kd[start : start + s].double().repeat_interleave(hq // hk, 1)
        vv = vd[start : start + s].double().repeat_interleave(hq // hk, 1)
        sc = torch.einsum("hd,khd->hk", q[i].double(), kk) * d ** -0.5
        refs.append(torch.einsum("hk,khd->hd", sc.softmax(-1), vv))
        start += s
    ref = torch.stack(refs)
    o_port = portable(q, cache, bt, sl, qsl, tables, torch.full_like(q, float("nan")),
                      splits=splits)
    raw = float((got[:, :, tables.layout.key.norm_offset + 1] >= 0x80).float().mean())
    res = {"err_portable_vs_ref": rel(o_port, ref), "raw_key_share": raw}
    for var, kw in VARIANTS.items():
        try:
            o = fast(q, cache, bt, sl, qsl, tables, torch.full_like(q, float("nan")),
                     splits=splits, **kw)
            torch.cuda.synchronize()
            res[f"{var}_vs_ref"] = rel(o, ref)
            res[f"{var}_vs_portable"] = rel(o, o_port)
            res[f"{var}_nan"] = bool(o.isnan().any())
        except Exception:
            log(f"  {var} FAILED\n{tb_head()}")
            res[f"{var}_error"] = traceback.format_exc().splitlines()[-1]
    return res


PROBES = [(128, 8, 4, True), (128, 16, 4, True), (64, 8, 4, True), (128, 8, 2, True),
          (128, 8, 4, False)]  # (head size, score rows, codes per element, movmatrix)

REF_CASES = [  # (hq, hk, d, seq_lens, splits, mean, fallback)
    (32, 8, 128, [4096, 1000, 37, 2500], 1, True, True),
    (32, 8, 128, [4096, 1000, 37, 2500], 8, True, True),
    (8, 1, 128, [3000, 17, 1], 16, True, True),
    (9, 3, 64, [2048, 5, 700], 4, True, True),
    (32, 8, 128, [1500, 64], 2, False, True),
    (32, 8, 128, [1500, 64], 2, True, False),
    (16, 1, 128, [900, 33], 2, True, False),  # G = 16 without the fallback
]


# ----------------------------------------------------------------------------------------------
# 2. Full size: fast vs portable, and times


SWEEP_SHAPES = "Llama-3-8B:64x8192,Llama-3-8B:1x32768,Llama-3-70B TP8:1x32768,Llama-3-70B TP8:32x4096"


def sweep_variants() -> dict:
    """--sweep: warps x prefetch x register limit x split factor (graph times only)."""
    out = {}
    for nw in (4, 8):
        for pf in (True, False):
            for reg in (None, 0):
                for sf in (1, 2, 4):
                    name = f"w{nw}_{'pf' if pf else 'nopf'}_{'auto' if reg is None else 'nolim'}_x{sf}"
                    out[name] = {"num_warps": nw, "prefetch": pf, "maxnreg": reg, "split_factor": sf}
    return out


def full_shape(name, hq, hk, d, b, ctx, device, graphs, do_bench=True):
    row = {"shape": name, "batch": b, "ctx": ctx}
    tables = tables_for(hk, d, device)
    _, bt = kb.paged_layout(torch, b, ctx, device)
    cache = fill(tables, bt, hk, d, device)
    q = torch.randn(b, hq, d, device=device, dtype=torch.bfloat16)
    qsl = torch.arange(b + 1, device=device, dtype=torch.int32)
    sl = torch.full((b,), ctx, device=device, dtype=torch.int32)
    sl[0] = ctx - 5  # one ragged sequence
    o_port = portable(q, cache, bt, sl, qsl, tables, torch.full_like(q, float("nan")))
    for var, kw in VARIANTS.items():
        try:
            o = fast(q, cache, bt, sl, qsl, tables, torch.full_like(q, float("nan")), **kw)
            torch.cuda.synchronize()
            row[f"{var}_err_vs_portable"] = rel(o, o_port)
            row[f"{var}_nan"] = bool(o.isnan().any())
        except Exception:
            log(f"  {var} FAILED\n{tb_head()}")
            row[f"{var}_error"] = traceback.format_exc().splitlines()[-1]
    row["portable_nan"] = bool(o_port.isnan().any())
    out = torch.empty_like(q)
    row["portable_ms"] = kb.bench(lambda: portable(q, cache, bt, sl, qsl, tables, out), triton)
    for var, kw in VARIANTS.items():
        if f"{var}_error" in row or not do_bench:
            continue
        row[f"{var}_ms"] = kb.bench(lambda: fast(q, cache, bt, sl, qsl, tables, out, **kw), triton)
    try:
        row["sdpa_ms"], row["sdpa_backend"] = kb.time_sdpa(torch, triton, b, ctx, hq, hk, d, device)
    except Exception:
        log(f"  sdpa FAILED\n{tb_head()}")
    if graphs:
        caches = [cache] + [cache.clone() for _ in range(kb.copies_for(cache.numel()) - 1)]
        try:
            row["portable_graph_ms"] = kb.graph_time(torch, [
                lambda c=c: portable(q, c, bt, sl, qsl, tables, out) for c in caches])
        except Exception:
            log(f"  portable graph FAILED\n{tb_head()}")
        for var, kw in VARIANTS.items():
            if f"{var}_error" in row:
                continue
            try:
                row[f"{var}_graph_ms"] = kb.graph_time(torch, [
                    lambda c=c, kw=kw: fast(q, c, bt, sl, qsl, tables, out, **kw) for c in caches])
            except Exception:
                log(f"  {var} graph FAILED\n{tb_head()}")
        del caches
        try:
            row["sdpa_graph_ms"] = kb.graph_sdpa(torch, b, ctx, hq, hk, d, device,
                                                 row.get("sdpa_backend"))
        except Exception:
            log(f"  sdpa graph FAILED\n{tb_head()}")
    del cache
    torch.cuda.empty_cache()
    return row


def table(rows):
    """Two short tables: the default launch and the best variant against SDPA and the portable
    kernel; every variant's CUDA-graph time."""
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    def r(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}"

    def best(row, suffix):
        got = [(row[f"{v}_{suffix}"], v) for v in VARIANTS if row.get(f"{v}_{suffix}") is not None]
        return min(got) if got else (None, "-")

    names = list(VARIANTS)
    out = ["| shape | b x ctx | SDPA | portable | fast | fast/SDPA | best (variant) | graph: SDPA "
           "| portable | fast | best (variant) | best/SDPA | err vs portable | NaN |",
           "|" + " --- |" * 14]
    var = ["| shape | b x ctx | " + " | ".join(names) + " |", "|" + " --- |" * (2 + len(names))]
    for row in rows:
        g = row.get
        head = f"| {row['shape']} | {row['batch']}x{row['ctx'] // 1024}K |"
        if "error" in row:
            out.append(f"{head} FAILED: {row['error']} |")
            continue
        b_ms, b_name = best(row, "ms")
        g_ms, g_name = best(row, "graph_ms")
        errs = [g(f"{v}_err_vs_portable") for v in names if g(f"{v}_err_vs_portable") is not None]
        err = f"{max(errs):.2e}" if errs else "FAILED"
        nan = any(bool(g(f"{v}_nan")) for v in names)
        out.append(f"{head} {f(g('sdpa_ms'))} | {f(g('portable_ms'))} | {f(g('fast_ms'))} | "
                   f"{r(g('fast_ms'), g('sdpa_ms'))} | {f(b_ms)} ({b_name}) | {f(g('sdpa_graph_ms'))} | "
                   f"{f(g('portable_graph_ms'))} | {f(g('fast_graph_ms'))} | {f(g_ms)} ({g_name}) "
                   f"| {r(g_ms, g('sdpa_graph_ms'))} | {err} | {nan} |")
        var.append(f"{head} " + " | ".join(
            g(f"{v}_error") and "FAILED" or f(g(f"{v}_graph_ms")) for v in names) + " |")
    return out + ["", "CUDA-graph ms of each variant:"] + var


def sweep_table(rows, top=6):
    """Per shape: SDPA and portable graph times, then the launches ranked by graph time."""
    out = []
    for row in rows:
        head = f"{row['shape']} {row['batch']}x{row['ctx'] // 1024}K"
        if "error" in row:
            out.append(f"{head}: FAILED {row['error']}")
            continue
        got = sorted((row[f"{v}_graph_ms"], v) for v in VARIANTS if f"{v}_graph_ms" in row)
        bad = [v for v in VARIANTS if f"{v}_error" in row or row.get(f"{v}_nan")]
        sdpa = row.get("sdpa_graph_ms")
        rank = ", ".join(f"{v} {t:.4f}" + (f" ({t / sdpa:.2f}x)" if sdpa else "")
                         for t, v in got[:top])
        out.append(f"{head}: SDPA {sdpa} portable {row.get('portable_graph_ms')} | best: {rank}"
                   + (f" | slowest {got[-1][1]} {got[-1][0]:.4f}" if got else "")
                   + (f" | FAILED/NaN: {bad}" if bad else ""))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--only", default="", help="substring of the shape names to run")
    ap.add_argument("--variants", default="", help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--no-reference", action="store_true", help="skip the small reference cases")
    ap.add_argument("--no-probe", action="store_true", help="skip kv_hopper_probe")
    ap.add_argument("--shapes", default="",
                    help="'model:BxCTX,...' (model as in SHAPES), instead of every shape")
    ap.add_argument("--format", default="tq4", choices=("tq4", "tq3", "tq5"),
                    help="the cache format (tq3, tq5: head 128 only, so no SmolLM2 shape)")
    ap.add_argument("--sweep", action="store_true",
                    help="launch sweep (sweep_variants), graph times only, at --shapes (default "
                         f"{SWEEP_SHAPES!r}); no reference cases (each launch is still checked "
                         "against the portable kernel at full size)")
    args = ap.parse_args(argv)
    FORMAT[0] = args.format
    only128 = args.format in ("tq3", "tq5")
    if only128:
        VARIANTS.pop("fast_bytes", None)  # 4-bit codes only
    if args.sweep:
        VARIANTS.clear()
        VARIANTS.update(sweep_variants())
        args.shapes = args.shapes or SWEEP_SHAPES
        args.no_reference = True
    if args.variants:
        keep = args.variants.split(",")
        for name in list(VARIANTS):
            if name not in keep:
                del VARIANTS[name]
    device = torch.device("cuda")
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "triton": triton.__version__, "format": args.format}
    log(json.dumps(info))
    results = {"info": info, "probe": [], "reference": [], "full": []}
    suffix = "" if args.format == "tq4" else "_" + args.format
    path = Path(args.out) / f"kv_hopper_check{suffix}.json"

    def save():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))

    from kv_hopper_probe import probe

    c128 = {"tq3": 3, "tq5": 5}.get(args.format)
    probes = [(128, 8, c128, True), (128, 16, c128, True), (128, 8, c128, False)] if only128 \
        else PROBES
    for d, rows, codes, trans in [] if args.no_probe else probes:  # kv_hopper_probe.py
        entry = {"case": f"d{d} rows {rows} codes {codes} movmatrix {trans}"}
        try:
            torch.manual_seed(d + rows)
            entry |= probe(tables_for(1, d, device), rows, codes, trans)
        except Exception:
            log(f"probe {entry['case']} FAILED\n{tb_head()}")
            entry["error"] = traceback.format_exc().splitlines()[-1]
        log(f"probe {entry}")
        results["probe"].append(entry)
    t0 = time.time()
    for case in [] if args.no_reference else [c for c in REF_CASES
                                               if c[2] == 128 or not only128]:
        torch.manual_seed(len(results["reference"]))
        hq, hk, d, seq_lens, splits, mean, fallback = case
        entry = {"case": f"{hq}q/{hk}kv/d{d} lens {seq_lens} splits {splits} mean {mean} "
                         f"fallback {fallback}"}
        try:
            entry |= reference_case(hq, hk, d, seq_lens, splits, mean, fallback, device)
        except Exception:
            log(f"reference {entry['case']} FAILED\n{tb_head()}")
            entry["error"] = traceback.format_exc().splitlines()[-1]
        log(f"reference {entry}")
        results["reference"].append(entry)
        save()
    log(f"reference checks: {time.time() - t0:.0f} s")
    kb.warm_up(torch, device)
    todo = [(name, b, ctx) for name, (_, batches) in SHAPES.items() for b, ctx in batches
            if args.only in name and (SHAPES[name][0][2] == 128 or not only128)]
    if args.shapes:
        todo = []
        for item in args.shapes.split(","):
            name, bc = item.rsplit(":", 1)
            b, ctx = bc.split("x")
            todo.append((name, int(b), int(ctx)))
    for name, b, ctx in todo:
        hq, hk, d = SHAPES[name][0]
        t1 = time.time()
        torch.manual_seed(b * 7 + ctx)
        try:
            row = full_shape(name, hq, hk, d, b, ctx, device, not args.no_graphs,
                             do_bench=not args.sweep)
        except Exception:
            log(f"{name} {b}x{ctx} FAILED\n{tb_head()}")
            row = {"shape": name, "batch": b, "ctx": ctx,
                   "error": traceback.format_exc().splitlines()[-1]}
            torch.cuda.empty_cache()
        row["seconds"] = round(time.time() - t1, 1)
        log(json.dumps(row))
        results["full"].append(row)
        save()
    lines = ["", f"kv_hopper_check {info['device']} torch {info['torch']} triton {info['triton']}",
             "Probe (max abs difference of the decoded operands and of P through the transpose; "
             "0 = exact):"]
    for e in results["probe"]:
        lines.append(f"  {e['case']}: " + (e.get("error") or ", ".join(
            f"{k} {e[k]:.3g}" for k in ("keys", "values", "p_transpose"))))
    lines.append("Reference (small shapes, relative error vs exact attention over the reference "
                 "decoding):")
    for e in results["reference"]:
        if "error" in e:
            lines.append(f"  {e['case']}: {e['error']}")
            continue
        parts = [f"portable {e['err_portable_vs_ref']:.2e}"]
        for var in VARIANTS:
            if f"{var}_error" in e:
                parts.append(f"{var} FAILED")
            else:
                parts.append(f"{var} {e[f'{var}_vs_ref']:.2e}"
                             + (" NaN" if e[f"{var}_nan"] else ""))
        lines.append(f"  {e['case']} (raw keys {e['raw_key_share']:.2f}): " + ", ".join(parts))
    lines.append("Full size, ms (do_bench median; graph: CUDA-graph device time, caches rotated):")
    lines += sweep_table(results["full"]) if args.sweep else table(results["full"])
    results["table"] = lines
    save()
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())

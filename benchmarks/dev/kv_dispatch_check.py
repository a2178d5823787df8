"""Check the served decode's dispatch (kernels/tq_attention.py) on the GPU machine, in one run:

    python3 benchmarks/dev/kv_dispatch_check.py --out $OUT [--only tq5]

Per shape: the served tq_attention (no tuning) three times (the first call goes through Triton,
the later ones through CachedLaunch's relaunch), each into a NaN-poisoned output, against the
portable kernel (AttentionTuning(hopper=False)) and tq_decode_hopper (where it runs); the same
served call captured in a CUDA graph and replayed; the plan's decision; the host time of one
call (no sync: what the CPU spends launching) for both paths. The log lines of the
"vllm_gds.kernels" logger are printed; a short table comes last; $OUT/kv_dispatch_check.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import _source_tree  # noqa: F401  this tree's vllm_gds importable, benchmarks/ on sys.path
import torch

import kv_bench as kb
import kv_hopper_check as hc

# (name, format, (hq, hk, d), batch, ctx)
SHAPES = [
    ("8B 32x4K", "tq4", (32, 8, 128), 32, 4096),
    ("8B 1x32K", "tq4", (32, 8, 128), 1, 32768),
    ("70B TP8 32x4K", "tq4", (8, 1, 128), 32, 4096),
    ("70B TP8 1x32K", "tq4", (8, 1, 128), 1, 32768),  # 64 splits: 8 merge groups
    ("SmolLM2 8x4K", "tq4", (9, 3, 64), 8, 4096),
    ("8B 8x4K tq3", "tq3", (32, 8, 128), 8, 4096),
    ("8B 8x4K tq5", "tq5", (32, 8, 128), 8, 4096),
    ("70B TP8 8x4K tq5", "tq5", (8, 1, 128), 8, 4096),
]


def host_us(fn, n=200):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def check(name, fmt, hq, hk, d, b, ctx, device):
    from vllm_gds.kernels import AttentionTuning, tq_attention
    from vllm_gds.kernels.tq_decode_hopper import tq_decode_hopper, why_unsupported

    ta = sys.modules["vllm_gds.kernels.tq_attention"]
    tables = hc.tables_for(hk, d, device) if fmt == "tq4" else kb.our_tables(torch, fmt, hk, d,
                                                                                 device)
    _, bt = kb.paged_layout(torch, b, ctx, device)
    cache = hc.fill(tables, bt, hk, d, device)
    q = torch.randn(b, hq, d, device=device, dtype=torch.bfloat16)
    qsl = torch.arange(b + 1, dtype=torch.int32, device=device)
    sl = torch.full((b,), ctx, dtype=torch.int32, device=device)
    scale = d ** -0.5

    def served(out):
        return tq_attention(q, cache, bt, sl, qsl, tables, scale, out, max_query_len=1)

    portable_tuning = AttentionTuning(hopper=False)

    def portable(out):
        return tq_attention(q, cache, bt, sl, qsl, tables, scale, out, max_query_len=1,
                            tuning=portable_tuning)

    nan = lambda: torch.full_like(q, float("nan"))  # noqa: E731
    o_port = portable(nan())
    row = {"shape": name, "format": fmt, "why_unsupported": why_unsupported(q, cache, tables)}
    errs = []
    for i in range(3):
        o = served(nan())
        errs.append(hc.rel(o, o_port))
        row[f"nan_{i}"] = bool(o.isnan().any())
    row["served_vs_portable"] = max(errs)
    plans = ta._LAUNCHES._by_tables[id(tables)]
    row["hopper"] = [bool(p.hopper) for k, p in plans.items() if k[-1] is None and k[0]]
    if row["why_unsupported"] is None:
        o_fast = tq_decode_hopper(q, cache, bt, sl, qsl, tables, scale, nan())
        row["served_vs_tq_decode_hopper"] = hc.rel(served(nan()), o_fast)
    out = nan()
    served(out)  # warm (compiled) before capture
    g = torch.cuda.CUDAGraph()
    out.fill_(float("nan"))
    with torch.cuda.graph(g):
        served(out)
    g.replay()
    torch.cuda.synchronize()
    row["graph_vs_portable"] = hc.rel(out, o_port)
    keep = torch.empty_like(q)
    row["host_us_served"] = host_us(lambda: served(keep))
    row["host_us_portable"] = host_us(lambda: portable(keep))
    if b == 1 and row["why_unsupported"] is None:
        row["splits"] = check_splits(q, cache, bt, sl, qsl, tables, scale, o_port, nan)
    return row


# Split counts of the in-kernel merge: one group, a part-filled last group, 2 to 32 groups (the
# groups' merge in one to four steps)
SPLITS = (2, 8, 12, 40, 64, 128, 256)


def check_splits(q, cache, bt, sl, qsl, tables, scale, o_port, nan):
    """{splits: (worst rel. error against the portable kernel over two eager calls and two graph
    replays, NaN seen)}: the merge's counters must be back at zero after every launch."""
    from vllm_gds.kernels import AttentionTuning, tq_attention

    res = {}
    for n in SPLITS:
        tuning = AttentionTuning(splits=n)

        def call(out, tuning=tuning):
            return tq_attention(q, cache, bt, sl, qsl, tables, scale, out, max_query_len=1,
                                tuning=tuning)

        outs = [call(nan()), call(nan())]
        out = nan()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            call(out)
        for _ in range(2):
            out.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            outs.append(out.clone())
        res[n] = (max(hc.rel(o, o_port) for o in outs), any(bool(o.isnan().any()) for o in outs))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--only", default="", help="substring of the shape names to run, e.g. tq5")
    args = ap.parse_args()
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
            print("LOG:", record.getMessage(), flush=True)

    logger = logging.getLogger("vllm_gds.kernels")
    logger.setLevel(logging.INFO)
    logger.addHandler(Keep())
    device = torch.device("cuda")
    import vllm_gds.kernels  # noqa: F401

    ta = sys.modules["vllm_gds.kernels.tq_attention"]
    info = {"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "gluon_error": ta.GLUON_ERROR}
    print(info, flush=True)
    rows = []
    for shape in [s for s in SHAPES if args.only in s[0]]:
        try:
            rows.append(check(shape[0], shape[1], *shape[2], *shape[3:], device))
        except Exception:
            print(f"{shape[0]} FAILED\n{traceback.format_exc()}", flush=True)
            rows.append({"shape": shape[0], "failed": traceback.format_exc(limit=3)})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "kv_dispatch_check.json").write_text(
        json.dumps({"info": info, "log": lines, "rows": rows}, indent=1, default=str))
    print("\nshape | fmt | hopper | served/portable | served/hopper | graph/portable | NaN | "
          "host us served/portable")
    for r in rows:
        if "failed" in r:
            print(f"{r['shape']} | FAILED")
            continue
        nan = any(r[f"nan_{i}"] for i in range(3))
        print(f"{r['shape']} | {r['format']} | {r['hopper']} | {r['served_vs_portable']:.1e} | "
              f"{r.get('served_vs_tq_decode_hopper', float('nan')):.1e} | "
              f"{r['graph_vs_portable']:.1e} | {nan} | "
              f"{r['host_us_served']:.1f}/{r['host_us_portable']:.1f}")
        for n, (err, nan) in r.get("splits", {}).items():
            print(f"  {r['shape']} splits {n}: served/portable {err:.1e}, NaN {nan}")
    print("log lines:", *lines, sep="\n  ")


if __name__ == "__main__":
    main()

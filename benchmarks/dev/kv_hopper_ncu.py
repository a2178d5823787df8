"""Nsight Compute facts of the served Hopper decode and store (GPU, ncu on PATH): per launch, device
time, registers, warps an SM, issue activity and the top warp stall reasons, for the cases given.

    python3 benchmarks/dev/kv_hopper_ncu.py --cases tq4:70b:1x32768 tq3:70b:1x32768 --out $OUT
    python3 benchmarks/dev/kv_hopper_ncu.py --cases store:tq4:32768 --out $OUT   # the served store
    python3 benchmarks/dev/kv_hopper_ncu.py --cases store:tq4:32768 --report --out $OUT

--report: the first case's second launch once more under `ncu --set full` (its report, the
details page as text and the SASS source page as CSV under $OUT), printing the details' pipe and
shared-memory lines and the SASS instructions and opcodes with the most warp stall samples.

Runs itself under ncu (each case's decode called twice: compile, then the profiled call), prints a
short table per kernel (the decode and the reduce) and writes the raw CSV and JSON to $OUT.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import _source_tree  # noqa: F401  this tree's vllm_gds importable, benchmarks/ on sys.path

SHAPES = {"8b": (32, 8, 128), "70b": (8, 1, 128)}
METRICS = [
    "gpu__time_duration.sum",
    "launch__registers_per_thread",
    "launch__grid_size",
    "sm__warps_active.avg.per_cycle_active",
    "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "smsp__inst_executed.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "lts__t_sectors_srcunit_tex_op_read.sum",
    "smsp__average_warp_latency_per_inst_issued.ratio",
]
STALLS = ["long_scoreboard", "short_scoreboard", "wait", "math_pipe_throttle", "mio_throttle",
          "barrier", "no_instruction", "not_selected", "selected", "dispatch_stall",
          "lg_throttle", "tex_throttle", "branch_resolving", "membar", "drain", "sleeping",
          "imc_miss", "misc"]
STALL_METRICS = [f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio" for s in STALLS]


def target(cases):
    import torch

    import kv_bench as kb
    from vllm_gds.kernels import tq_attention

    dev = torch.device("cuda")
    for case in cases:
        if case.startswith("store:"):  # store:FORMAT:TOKENS, kv_bench.store_bandwidth's inputs
            from vllm_gds.kernels import tq_store
            _, name, tokens = case.split(":")
            tables, cache, k, v, slots, positions, _ = kb.store_timing_inputs(
                torch, name, dev, int(tokens))
            for _ in range(2):
                tq_store(k, v, cache, slots, tables, positions)
            torch.cuda.synchronize()
            print(f"CASE {case} done", flush=True)
            continue
        name, shape, bc = case.split(":")
        b, ctx = map(int, bc.split("x"))
        hq, hk, d = SHAPES[shape]
        tables = kb.our_tables(torch, name, hk, d, dev, True)
        nb, bt = kb.paged_layout(torch, b, ctx, dev)
        cache = kb.fill_ours(torch, tables, nb, hk, d, dev)
        q = torch.randn(b, hq, d, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        qsl = torch.arange(b + 1, device=dev, dtype=torch.int32)
        sl = torch.full((b,), ctx, device=dev, dtype=torch.int32)
        for _ in range(2):
            tq_attention(q, cache, bt, sl, qsl, tables, d ** -0.5, out, max_query_len=1)
        torch.cuda.synchronize()
        print(f"CASE {case} done", flush=True)
        del cache


def _num(x: str, missing: float = 0.0) -> float:
    """ncu's number (thousands separated by commas), or `missing` where the field is not one."""
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return missing


def report(case: str, out: Path, top: int = 40) -> int:
    """One launch of `case` (its second: compiled) under `ncu --set full`; prints what it says."""
    kernel = "regex:tq_store" if case.startswith("store:") else "regex:tq_decode_hopper"
    rep = out / "kv_ncu_report"
    run = subprocess.run(["ncu", "--set", "full", "--import-source", "no", "--kernel-name", kernel,
                          "--launch-skip", "1", "--launch-count", "1", "-f", "-o", str(rep),
                          sys.executable, __file__, "--target", "--cases", case],
                         capture_output=True, text=True)
    print(run.stdout[-1500:], run.stderr[-1500:])
    rep = rep.with_suffix(".ncu-rep")
    if not rep.exists():
        return 1
    details = subprocess.run(["ncu", "-i", str(rep), "--page", "details", "--print-units", "base"],
                             capture_output=True, text=True).stdout
    (out / "kv_ncu_details.txt").write_text(details)
    keys = ("Duration", "Registers", "Achieved Occupancy", "Issue Slots Busy", "Issued Ipc",
            "Shared", "Bank", "Pipe", "Stall", "Warp Cycles", "Eligible", "No Eligible",
            "Executed Ipc", "L1/TEX Hit", "Memory Throughput", "Block Limit")
    for line in details.splitlines():
        if any(k in line for k in keys):
            print(line.rstrip()[:150])
    src = subprocess.run(["ncu", "-i", str(rep), "--page", "source", "--csv", "--print-source",
                          "sass"], capture_output=True, text=True).stdout
    (out / "kv_ncu_sass.csv").write_text(src)
    lines = src.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"Address"')), None)
    if start is None:
        print(src[-2000:])
        return 1
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    cols = [c for c in (list(rows[0]) if rows else []) if c]
    sample = next((c for c in cols if "Sampling" in c and "All" in c), None)
    if sample is None:
        print("columns:", cols[:40])
        return 1
    stall_cols = [c for c in cols if c.startswith("stall_") and "Not Issued" not in c]
    total = sum(_num(r[sample]) for r in rows) or 1.0
    reasons = {c: sum(_num(r[c]) for r in rows) for c in stall_cols}
    print("warp stall reasons (share of samples):")
    for c, v in sorted(reasons.items(), key=lambda x: -x[1])[:10]:
        print(f"  {c:28s} {v / total:6.1%}")
    ops = {}
    for r in rows:
        words = (r.get("Source") or "").split()
        op = " ".join(words[:2]) if words and words[0].startswith("@") else " ".join(words[:1])
        ops[op] = ops.get(op, 0.0) + _num(r[sample])
    print(f"warp stall samples {total:.0f}; by opcode (share):")
    for op, v in sorted(ops.items(), key=lambda x: -x[1])[:25]:
        print(f"  {op:28s} {v / total:6.1%}")
    print(f"top {top} instructions (share, then the stall reasons over 15% of the row):")
    for r in sorted(rows, key=lambda r: -_num(r[sample]))[:top]:
        v = _num(r[sample])
        why = ", ".join(f"{c[6:]} {_num(r[c]) / max(v, 1):.0%}" for c in stall_cols
                        if _num(r[c]) > 0.15 * v)
        print(f"  {r.get('Address', '')} {v / total:6.2%} {(r.get('Source') or '')[:60]:60s} {why[:120]}")
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["tq4:70b:1x32768", "tq3:70b:1x32768"])
    ap.add_argument("--target", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--report", action="store_true", help="a full ncu report of the first case")
    args = ap.parse_args()
    if args.target:
        return target(args.cases)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        return report(args.cases[0], out)
    cmd = ["ncu", "--csv", "--page", "raw", "--print-units", "base", "--kernel-name", "regex:tq_decode_hopper|tq_reduce|tq_store",
           "--metrics", ",".join(METRICS + STALL_METRICS), sys.executable, __file__, "--target",
           "--cases", *args.cases]
    run = subprocess.run(cmd, capture_output=True, text=True)
    (out / "kv_hopper_ncu.csv").write_text(run.stdout)
    (out / "kv_hopper_ncu.err").write_text(run.stderr)
    lines = run.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        print(run.stdout[-3000:], run.stderr[-3000:])
        return 1
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))[1:]  # [0]: the units
    json.dump(rows, open(out / "kv_hopper_ncu.json", "w"), indent=1)
    # two launches per case and kernel: keep the second (compiled, warm)
    per_case = {}
    for r in rows:
        per_case.setdefault(r["Kernel Name"][:24], []).append(r)
    print("case order:", " ".join(args.cases))
    print("| kernel | # | us | regs | grid | warps/SM | issue % | inst | dram % | "
          "top stalls (warps per issue) |")
    for kname, rs in per_case.items():
        for i, r in enumerate(rs):
            def f(m):
                return _num(r.get(m, ""), float("nan"))
            st = sorted(((f(m), s) for m, s in zip(STALL_METRICS, STALLS)), reverse=True)[:4]
            print(f"| {kname} | {i} | {f('gpu__time_duration.sum') / 1e3:.1f} | "
                  f"{f('launch__registers_per_thread'):.0f} | {f('launch__grid_size'):.0f} | "
                  f"{f('sm__warps_active.avg.per_cycle_active'):.1f} | "
                  f"{f('smsp__issue_active.avg.pct_of_peak_sustained_active'):.0f} | "
                  f"{f('smsp__inst_executed.sum'):.3g} | "
                  f"{f('dram__throughput.avg.pct_of_peak_sustained_elapsed'):.0f} | "
                  + ", ".join(f"{s} {v:.1f}" for v, s in st) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

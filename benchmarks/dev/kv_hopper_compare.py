"""Side by side: kv_hopper_check.py's JSON of several formats (run it once per --format first), per
shape the do_bench ms of each format's variants, the format ratio (default tq3 / tq4) and the
largest error against the portable kernel and, over the small cases, the exact reference.

    python3 benchmarks/dev/kv_hopper_compare.py --out $OUT [--formats tq4,tq3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def load(out: Path, fmt: str) -> dict:
    path = out / f"kv_hopper_check{'' if fmt == 'tq4' else '_' + fmt}.json"
    if not path.exists():
        sys.exit(f"{path} missing: run benchmarks/dev/kv_hopper_check.py --format {fmt} first")
    return json.loads(path.read_text())


def variants(rows: list) -> list[str]:
    return sorted({k[:-3] for r in rows for k in r if k.endswith("_ms") and k.startswith("fast")})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--formats", default="tq4,tq3",
                    help="base first; ratios are the last / the first")
    args = ap.parse_args(argv)
    fmts = args.formats.split(",")
    res = {f: load(Path(args.out), f) for f in fmts}
    for f, r in res.items():
        refs = [e for e in r["reference"] if "error" not in e]
        errs = {k: max(e[k] for e in refs if k in e) for k in
                {k for e in refs for k in e if k.endswith("_vs_ref") or k == "err_portable_vs_ref"}}
        nan = any(v for e in refs for k, v in e.items() if k.endswith("_nan"))
        print(f"{f} small cases vs exact ({len(refs)} of {len(r['reference'])} ran): "
              + ", ".join(f"{k} {v:.2e}" for k, v in sorted(errs.items()))
              + (" NaN" if nan else ""))
    base = res[fmts[0]]["full"]
    names = [(f, v) for f in fmts for v in variants(res[f]["full"])]
    print("| shape | " + " | ".join(f"{f} {v}" for f, v in names)
          + f" | {fmts[-1]}/{fmts[0]} fast | max err vs portable |")
    for row in base:
        key = (row["shape"], row["batch"], row["ctx"])
        rows = {f: next((r for r in res[f]["full"] if (r["shape"], r["batch"], r["ctx"]) == key),
                        {}) for f in fmts}
        ms = [rows[f].get(f"{v}_ms") for f, v in names]
        a, b = rows[fmts[0]].get("fast_ms"), rows[fmts[-1]].get("fast_ms")
        errs = [r[k] for r in rows.values() for k in r if k.endswith("_err_vs_portable")]
        nan = any(r[k] for r in rows.values() for k in r if k.endswith("_nan"))
        print(f"| {key[0]} {key[1]}x{key[2] // 1024}K | "
              + " | ".join("-" if m is None else f"{m:.4f}" for m in ms)
              + f" | {'-' if not (a and b) else f'{b / a:.2f}'} | "
              + (f"{max(errs):.1e}" if errs else "FAILED") + (" NaN" if nan else "") + " |")


if __name__ == "__main__":
    main()

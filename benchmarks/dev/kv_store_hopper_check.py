"""The Gluon store (kernels/tq_store_hopper.py) against the portable one, in one GPU run:

    python3 benchmarks/dev/kv_store_hopper_check.py --out $OUT     # 32K tokens, Llama-3-8B shape

Per format (tq4, tq3, tq5 with the key mean as served; tq4 without the mean; tq4 at 4000 and 200
tokens too, where tq_store picks other launch shapes): (1) bytes: the Hopper
and the portable launch on the same fresh random inputs (keys around the RoPE'd mean, a tenth far
off, random positions < 2^17, every 97th slot -1, poisoned caches), slots and bytes that differ,
in which part of the slot (key codes, key norm, value codes, value norm), the raw keys each
chose, and the first differing slot's bytes;
(2) both against the torch reference (kv_bench.store_check, as kv_store_check.py); (3) time (do_bench
median) of the portable launch, the Hopper launch and its variants (warps, heads per program,
maxnreg), and at 4096 and 256 tokens, against the device copy of the same run. Prints the Hopper-path log line, a table last;
writes kv_store_hopper_check.json under --out.
"""
import argparse
import logging
import os
import time
from pathlib import Path

from _source_tree import ROOT  # noqa: F401  this tree's vllm_gds and benchmarks/ importable

import torch
import triton
import kv_bench as kb
from kv_store_check import check, run_row, timed

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

PORTABLE = dict(hopper=False)
HOPPER = dict(hopper=True)
# (label, format, mode, StoreTuning fields); the first Hopper row of a format is the served one
ROWS = [
    ("portable", "tq4", "mean", PORTABLE),
    ("hopper", "tq4", "mean", HOPPER),
    ("portable", "tq3", "mean", PORTABLE),
    ("hopper", "tq3", "mean", HOPPER),
    ("portable", "tq5", "mean", PORTABLE),
    ("hopper", "tq5", "mean", HOPPER),
    ("portable", "tq4", "no mean", PORTABLE),
    ("hopper", "tq4", "no mean", HOPPER),
    ("hopper 2 warps", "tq4", "mean", dict(hopper=True, num_warps=2)),
    ("hopper 8 warps", "tq4", "mean", dict(hopper=True, num_warps=8)),
    ("hopper 4 heads/program", "tq4", "mean", dict(hopper=True, heads_per_program=4)),
    ("hopper 2 warps 4 heads", "tq4", "mean", dict(hopper=True, num_warps=2, heads_per_program=4)),
    ("hopper maxnreg 168", "tq4", "mean", dict(hopper=True, maxnreg=168)),
    ("hopper 2 warps maxnreg 200", "tq4", "mean", dict(hopper=True, num_warps=2, maxnreg=200)),
    ("hopper 2 warps maxnreg 168", "tq4", "mean", dict(hopper=True, num_warps=2, maxnreg=168)),
    # fewer tokens (a prefill chunk, a decode step's batch): the launch shape chosen per call
    ("portable 4096 tokens", "tq4", "mean", PORTABLE, 4096),
    ("hopper 4096 tokens", "tq4", "mean", HOPPER, 4096),
    ("portable 256 tokens", "tq4", "mean", PORTABLE, 256),
    ("hopper 256 tokens", "tq4", "mean", HOPPER, 256),
]


def versus(name, mode, device, tokens):
    """Hopper vs portable bytes on the same inputs: (bytes differing, slots differing, slots,
    other slots untouched by both)."""
    from vllm_gds.kernels import StoreTuning, tq_store

    hk = kb.SHAPES["Llama-3-8B"][1]
    # kv_bench.store_check's inputs, another seed
    tables, _, k, v, slots, positions = kb.store_inputs(torch, name, mode, device, tokens, seed=5)
    caches = []
    for hop in (False, True):
        cache = kb.poisoned_cache(torch, tables, tokens, device)
        tq_store(k, v, cache, slots, tables, positions=positions, tuning=StoreTuning(hopper=hop))
        caches.append(cache.view(-1, hk, tables.layout.slot_bytes))
    ok = slots >= 0
    a, b = caches[0][slots[ok]], caches[1][slots[ok]]  # written slots only
    diff = a != b
    untouched = torch.ones(caches[0].shape[0], dtype=torch.bool, device=device)
    untouched[slots[ok]] = False
    poison = bool((caches[1][untouched] == 0xAB).all() and (caches[0][untouched] == 0xAB).all())
    # where they differ, to say which part is wrong if one is: key codes, key norm (its sign:
    # the raw-key flag), value codes, value norm
    lay = tables.layout
    kn, vn = lay.key.norm_offset, lay.value.norm_offset
    parts = {"key codes": diff[..., :kn], "key norm": diff[..., kn:kn + 2],
             "value codes": diff[..., kn + 2:vn], "value norm": diff[..., vn:vn + 2]}
    raw = [int(((c[..., kn + 1] >> 7) & 1).sum()) for c in (a, b)]
    where = {name: int(d.any(-1).sum()) for name, d in parts.items()}
    first = None
    if diff.any():
        i = int(diff.any(-1).flatten().nonzero()[0])
        first = dict(slot=i // hk, head=i % hk, portable=a.flatten(0, 1)[i].tolist(),
                     hopper=b.flatten(0, 1)[i].tolist())
    return (diff.float().mean().item(), int(diff.any(-1).sum().item()), int(ok.sum()) * hk, poison,
            where, raw, first)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later rows skipped")
    args = ap.parse_args()
    device, tokens = "cuda", args.tokens
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "kv_store_hopper_check.json"
    started = time.time()
    res = {"info": torch.cuda.get_device_name(), "triton": triton.__version__,
           "copy_gbs": kb.copy_bandwidth(torch, triton, device), "tokens": tokens, "rows": [],
           "versus": []}
    copy = res["copy_gbs"]
    print(f"{res['info']}, Triton {triton.__version__}: copy {copy:.0f} GB/s, {tokens} tokens",
          flush=True)
    for name, mode, t in (("tq4", "mean", tokens), ("tq4", "no mean", tokens), ("tq3", "mean", tokens),
                          ("tq5", "mean", tokens), ("tq4", "mean", 4000), ("tq4", "mean", 200)):
        def compare(r):
            frac, rows, n, poison, where, raw, first = versus(name, mode, device, t)
            r.update(bytes_differ=frac, slots_differ=rows, slots=n, untouched_ok=poison,
                     vectors_differ=where, raw_keys=raw, first=first)
        run_row(dict(format=name, mode=mode, tokens=t), compare, res, out, started, float("inf"),
                key="versus", say="hopper vs portable ")
    for label, name, mode, launch, *few in ROWS:
        n_tok = few[0] if few else tokens

        def measure(row):
            if label in ("portable", "hopper") or label.endswith(" tokens"):
                frac, untouched = check(name, mode, launch, device, n_tok, False)
                row.update(byte_mismatch=frac, untouched_ok=untouched)
            t, gbs = timed(name, mode, launch, device, n_tok, False)
            row.update(ms=t, gbs=gbs, of_copy=gbs / copy)
        run_row(dict(label=label, format=name, mode=mode, launch=launch, tokens=n_tok), measure, res,
                out, started, args.budget)
    base = {(r["format"], r["mode"], r["tokens"]): r["ms"] for r in res["rows"]
            if r["label"].startswith("portable") and "ms" in r}
    print(f"\n{res['info']}, Triton {triton.__version__}, copy {copy:.0f} GB/s, {tokens} new "
          "tokens, Llama-3-8B shape (8 KV heads, head 128)")
    print(f"{'format':6} {'mode':8} {'tokens':>6} {'hopper vs portable: bytes / slots differ':>42}")
    for r in res["versus"]:
        if "error" in r:
            print(f"{r['format']:6} {r['mode']:8} {r['tokens']:6} ERROR {r['error'][:80]}")
        else:
            print(f"{r['format']:6} {r['mode']:8} {r['tokens']:6} {r['bytes_differ']:20.2e} "
                  f"{r['slots_differ']:8d} of {r['slots']}{'' if r['untouched_ok'] else ' OTHER SLOTS WRITTEN'}"
                  f"  raw keys (portable, hopper) {r['raw_keys']}  {r['vectors_differ']}")
    print(f"{'launch':26} {'format':6} {'mode':8} {'vs reference':>12} {'ms':>8} {'copy':>6} {'speed-up':>8}")
    for r in res["rows"]:
        head = f"{r['label']:26} {r['format']:6} {r['mode']:8}"
        if "error" in r:
            print(f"{head} ERROR {r['error'][:70]}")
            continue
        ref = f"{r['byte_mismatch']:12.2e}" if "byte_mismatch" in r else f"{'':12}"
        old = base.get((r["format"], r["mode"], r["tokens"]))
        print(f"{head} {ref} {r['ms']:8.3f} {r['of_copy']:6.1%} "
              f"{(old / r['ms']) if old else 0:7.2f}x")


if __name__ == "__main__":
    main()

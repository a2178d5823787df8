"""Where a short Hopper decode call's time goes (issue 16): the decode kernel's own source with
clock stamps at its phase boundaries, on the GPU machine.

    python3 benchmarks/dev/kv_decode_phases.py --out $OUT

A copy of kernels/tq_decode_hopper.py is made with one more argument (a stamp buffer) and
%clock64 reads (each after a value of the phase it closes: the asm takes that value as an input,
so it cannot issue before it) at the kernel's phase boundaries, plus %globaltimer at each
program's start and end. Phases: prologue (query transform, key-mean constants), the tile loop,
the partial rows stored and the group's counter, the group's merge, the groups' counter, the last
merge, the finish. The served kernel is untouched; the copy's stamps cost a reduction each, so the
instrumented call is a little slower than the plain one (both timed). Source variants (text edits
of the kernel, timed beside the served source) are kv_decode_variants.py's.

Per launch variant (warps, splits, merge group) and shape: the plain call's CUDA-graph time
(kv_bench.graph_time), do_bench time (cold L2: what kv_bench reports and the targets judge) and
the device time with the L2 flushed before each call, without the host (cold_graph_time),
the instrumented call's, the kernel's span (first program's start to last program's end,
globaltimer), each phase's median over the programs that ran it (ns, from the program's clocks
scaled by its own globaltimer span), the phases of the program that finished the rows last (the
critical path) and when the prologue's values arrived (PROLOGUE_MARKS); the same stamps again
from one call after an L2 flush ("cold"). Short tables last; JSON to $OUT/kv_decode_phases.json.

    python3 benchmarks/dev/kv_decode_phases.py --sass    # no GPU

The source variants compiled for sm_90 on the CPU (tests/hopper_compile.py's compile): per
variant and launch, the tile loop's SASS, the instructions and CTA barriers from the loop's end
to the first counter atomic (or to the end), registers, stack and the total.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import _source_tree  # noqa: F401  this tree's vllm_gds and benchmarks/ importable
import kv_bench as kb
from kv_decode_variants import (RULE, SOURCE_VARIANTS, WHT_ARGS, cluster_launcher, replace_once,
                                variant_source, wht_tables)

STAMPS = 16  # int64 slots a program: clocks 0..7, globaltimer start / end at 8, 9, clocks
# 10..12 in the prologue (PROLOGUE_MARKS)
PHASES = ["prologue", "loop", "partial+count", "group merge", "groups count", "last merge",
          "finish"]
# Times from the program's start (clock 0) at which the prologue's values were in registers: the
# query (10), the transform's H (11), the transformed query (1, the prologue's end) and the first
# tile's key codes (12, waited for just before the tile loop: the probed call issues the next
# tile's loads that much later)
PROLOGUE_MARKS = {"query": 10, "H": 11, "query transformed": 1, "first tile's codes": 12}

HELPERS = '''

@gluon.jit
def _clk(x):
    """%clock64 once x (a 1-D tensor) is available, the program's latest."""
    t = gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [(x != 0).to(gl.int32)],
                                  dtype=gl.int64, is_pure=False, pack=1)
    return gl.max(t, axis=0)


@gluon.jit
def _gtime(x):
    t = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [(x != 0).to(gl.int32)],
                                  dtype=gl.int64, is_pure=False, pack=1)
    return gl.max(t, axis=0)


@gluon.jit
def _stamp(stamp_ptr, k, x):
    pid = (gl.program_id(0) * gl.num_programs(1) + gl.program_id(1)) * gl.num_programs(2) \\
        + gl.program_id(2)
    gl.store(stamp_ptr + pid * 16 + k, _clk(x))


@gluon.jit
def _gstamp(stamp_ptr, k, x):
    pid = (gl.program_id(0) * gl.num_programs(1) + gl.program_id(1)) * gl.num_programs(2) \\
        + gl.program_id(2)
    gl.store(stamp_ptr + pid * 16 + k, _gtime(x))

'''

# The stamps: (anchor, text inserted after it), each anchor found exactly once in the source
STAMP_AFTER = [
    ("out_ptr, stride_ot, stride_oh, hvt_ptr, value_mean_ptr, count_ptr,",
     " stamp_ptr,"),
    ("    split = gl.program_id(2)\n",
     "    _st0 = gl.arange(0, 32 * NW, gl.BlockedLayout([1], [32], [NW], [0])) + split\n"
     "    _gstamp(stamp_ptr, 8, _st0)\n    _stamp(stamp_ptr, 0, _st0)\n"),
    (("    h = _h_operand(hk_ptr, LB2, D, NW)\n", "    h = x  # wht: no H (the stamps' anchor)\n"),
     "    _stamp(stamp_ptr, 10, gl.sum(x, 1))\n"
     "    _stamp(stamp_ptr, 11, gl.sum(h.to(gl.float32), 1))\n"),
    ("    m_i = gl.full([NW, R], -1.0e30, gl.float32, STAT)\n",
     "    _stamp(stamp_ptr, 1, gl.sum(gl.sum(qb.to(gl.float32), 2), 1))\n"),
    ("    l_i = gl.sum(l_t, axis=1)\n",
     "    _stamp(stamp_ptr, 2, gl.sum(gl.sum(o, 2), 1))\n"),
    (('            done = gl.atomic_add(counts + group, 1, sem="acq_rel", scope="gpu")\n',
      "            done = split % GROUP\n"),
     "            _stamp(stamp_ptr, 3, _st0 + done)\n"),
    (("                                       1, G, D, HALF, WP, V_PART, NW)\n",
      "                                       V_PART, NW)\n"),
     "                _stamp(stamp_ptr, 4, gl.sum(o_t, 1))\n"),
    ('                    top = gl.atomic_add(counts + groups, 1, sem="acq_rel", scope="gpu")\n',
     "                    _stamp(stamp_ptr, 5, _st0 + top)\n"),
    ("                                               G, D, HALF, WP, V_PART, NW)\n",
     "                        _stamp(stamp_ptr, 6, gl.sum(o_t, 1))\n"),
    ("                            mean_v, L2, G, D, HALF)\n",
     "                    _stamp(stamp_ptr, 7, _st0)\n"),
]
KERNEL_END = "\n\n" + RULE + "# Launcher"  # each program's end time goes before it
# the first tile's codes waited for (stamp 12) just before the tile loop
LOOP = "    for tile in range(tile_lo, "
FIRST_CODES = ("    if PREFETCH:\n"
               "        _stamp(stamp_ptr, 12, gl.sum(gl.sum(kw.to(gl.float32), 2), 1))\n")


def load_module(src: str, name: str):
    """src imported from a temporary file as vllm_gds.kernels.<name>, so that its relative
    imports (the host side, tq_decode_hopper_host) resolve to this tree's."""
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"vllm_gds.kernels.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def instrumented_module(variant: str = "served", stamps: bool = True):
    """The copy of tq_decode_hopper (a source variant), with the stamps or without, imported from a
    temporary file."""
    name = f"tq_decode_hopper_{variant}" + ("_stamped" if stamps else "")
    return load_module(instrumented_source(variant, stamps), name)


def instrumented_source(variant: str = "served", stamps: bool = True) -> str:
    """instrumented_module's source."""
    src = variant_source(variant)
    if not stamps:
        return src
    for anchor, text in STAMP_AFTER:
        if isinstance(anchor, tuple):  # alternatives: the first the source holds
            anchor = next((a for a in anchor if a in src), anchor[0])
        src = replace_once(src, anchor, anchor + text, "stamps")
    src = replace_once(src, KERNEL_END, "\n    _gstamp(stamp_ptr, 9, _st0)" + KERNEL_END, "stamps")
    src = replace_once(src, LOOP, FIRST_CODES + LOOP, "stamps")
    return replace_once(src, "\n" + RULE + "# The kernel", HELPERS + "\n" + RULE + "# The kernel",
                        "stamps")


def phases_of(st, splits, group):
    """The kernel's span, start skew, per-phase ns (median over the programs that ran the phase)
    and the phases of the program that finished the rows last, from stamps [programs, 16]; a
    phase is the time from the previous stamp the program took to the one that closes it."""
    per = {p: [] for p in PHASES}
    pro = {p: [] for p in PROLOGUE_MARKS}
    spans, crit = [], None
    for row in st.tolist():
        clk, g0, g1 = row[:8], row[8], row[9]
        marks = [(k, clk[k]) for k in range(8) if clk[k]]
        ns_per_clk = (g1 - g0) / max(1, marks[-1][1] - marks[0][1])
        spans.append((g0, g1))
        for p, k in PROLOGUE_MARKS.items():
            if row[k]:
                pro[p].append((row[k] - clk[0]) * ns_per_clk)
        phases = {PHASES[b - 1]: (tb - ta) * ns_per_clk
                  for (_, ta), (b, tb) in zip(marks, marks[1:])}
        for p, ns in phases.items():
            per[p].append(ns)
        if clk[7] and (crit is None or g1 > crit[1]):
            crit = (phases, g1, g0)
    first = min(s for s, _ in spans)
    out = dict(span_ns=max(e for _, e in spans) - first,
               start_skew_ns=max(s for s, _ in spans) - first, groups=-(-splits // group),
               median_ns={p: round(statistics.median(x)) for p, x in per.items() if x},
               prologue_marks_ns={p: round(statistics.median(x)) for p, x in pro.items() if x})
    if crit is not None:
        out["critical_ns"] = {p: round(ns) for p, ns in crit[0].items()}
        out["critical_start_ns"] = crit[2] - first
    return out


def _source_label(row) -> str:
    """A row's source variant and its launch keywords, for the tables."""
    return row["source"] + "".join(f" {k}={v}" for k, v in row.get("launch", {}).items())


def _phase_cells(phases) -> str:
    """The critical program's phases (us) and the prologue marks (us), table cells of a
    phases_of result."""
    crit = phases.get("critical_ns") or {}
    return (" | ".join(f"{crit[p] / 1e3:.2f}" if p in crit else "" for p in PHASES) + " | "
            + " / ".join(f"{v / 1e3:.2f}" for v in phases["prologue_marks_ns"].values()))


def cold_graph_time(torch, flush, call, caches):
    """ms of device time per call with the L2 flushed before each (do_bench's memset), without
    the host: a CUDA graph of (memset, call) pairs less one of the memsets alone (do_bench times
    the host launch too where it is longer than the memset, bimodal here: 19 against 51 us)."""
    def pair(c):
        flush.zero_()
        call(c)
    calls = caches[:8] * (8 // len(caches[:8]))
    both = kb.graph_time(torch, [lambda c=c: pair(c) for c in calls])
    return both - kb.graph_time(torch, [flush.zero_ for _ in calls])


def cold_sdpa(torch, flush, b, ctx, hq, hk, d, device):
    """cold_graph_time of SDPA (cuDNN, as kv_bench.graph_sdpa) on the same shape."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(b, hq, 1, d, device=device, dtype=torch.bfloat16)
    kvs = [(torch.randn(b, hk, ctx, d, device=device, dtype=torch.bfloat16),
            torch.randn(b, hk, ctx, d, device=device, dtype=torch.bfloat16)) for _ in range(2)]
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return cold_graph_time(torch, flush, lambda kv: F.scaled_dot_product_attention(
            q, kv[0], kv[1], enable_gqa=True), kvs)


def sass_table() -> None:
    """--sass: each source variant's compile numbers (no GPU; run where TRITON_INTERPRET is off)."""
    import re

    sys.path.insert(0, str(_source_tree.ROOT / "tests"))
    import hopper_compile as hc

    served, types = hc.hop._tq_decode_hopper_kernel, dict(hc.TYPES)
    configs = [dict(g=8, kv_heads=1, finish=2, prefetch=True),
               dict(g=4, kv_heads=8, finish=2, prefetch=True),
               dict(g=8, kv_heads=1, finish=1, prefetch=True),
               dict(g=8, kv_heads=1, finish=2, prefetch=True, num_warps=8)]
    print("| variant | launch | tile loop | loop end -> counter | CTA barriers there | registers "
          "| stack | total |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    try:
        for variant in SOURCE_VARIANTS:
            module = instrumented_module(variant, False)
            hc.hop._tq_decode_hopper_kernel = module._tq_decode_hopper_kernel
            hc.TYPES.update(types)
            if variant in WHT_ARGS:  # int32 tables in H's places
                hc.TYPES.update(hk_ptr="*i32", hvt_ptr="*i32")
            for cfg in configs:
                k = hc.compile_sm90(**cfg)
                st = hc.stats(k)
                ops = [line.split(";")[0] for line in hc._tool(k, "-sass").splitlines()
                       if re.search(r"/\*[0-9a-f]{4}\*/", line)]
                back = [i for i, o in enumerate(ops) if (m := re.search(
                    r"/\*([0-9a-f]+)\*/.*BRA 0x([0-9a-f]+)", o)) and int(m[2], 16) < int(m[1], 16)]
                end = next((i for i, o in enumerate(ops) if "ATOMG" in o), len(ops))
                tail = ops[back[0]:end] if back else []
                print(f"| {variant} | {cfg} | {st['loop_total']} | {len(tail)} | "
                      f"{sum('BAR.SYNC' in o for o in tail)} | {st['registers']} | {st['stack']} "
                      f"| {st['total']} |", flush=True)
    finally:
        hc.hop._tq_decode_hopper_kernel = served
        hc.TYPES.update(types)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--formats", default="tq4,tq3")
    ap.add_argument("--sass", action="store_true", help="compile numbers only (no GPU)")
    args = ap.parse_args()
    if args.sass:
        return sass_table()
    import torch
    import triton

    from vllm_gds.kernels import tq_decode_hopper as tdh
    from vllm_gds.kernels.tq_attention import default_splits
    from vllm_gds.kvcache.hopper_tables import attach

    device = torch.device("cuda")
    kb.warm_up(torch, device)
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)  # do_bench's L2 flush
    mods = {}
    # (format, shape, hq, hk, d, batch, ctx, [(source, warps, split factor, merge group, launch)])
    # (measured, in SOURCE_VARIANTS for --sass and to run again: warp_reduce, kv_end_zero, groups
    # of 16 and 8 warps on 2026-12-07 01:44; merge_wide and interleave at 07:45; kv_end_first,
    # loads_first and codes_late at 08:17; prefetch2 for tq4 at 08:21)
    # (two tiles ahead for tq3 at its head-128 shapes on 2026-12-07 09:22: served at G > 4)
    # (the codes of tiles further ahead asked into the L2 on 2026-12-07 09:33: slower everywhere)
    # (8 warps a program and twice the splits on 2026-12-07 09:37: no faster anywhere; the
    # prologue's chains shortened (timing-only variants) at 09:41: no faster)
    # (merge groups of 4 and 16 with the warp merge at 09:51: slower, 8 stays)
    # the merge groups as clusters of 8 CTAs: the group's counter a cluster barrier, the
    # group's merge spread over its 8 programs (cluster_cols), the partials through distributed
    # shared memory (cluster_dsmem); shapes whose splits are a multiple of 8
    # (2026-12-07 11:50: slower at every shape timed, 70B TP8 1x32K tq4 cold 16.2 -> 18.2-19.2 us)
    # one merge level: the last G programs to arrive merge one query head each (head_merge; SC 64
    # or 128 partial rows a step), at the shapes with more than one merge group
    # (2026-12-07 11:55: correct, no faster: 70B TP8 1x32K tq4 cold 16.2 -> 17.2 / 16.7 us)
    # (the transforms' H by 16-byte loads, partial rows 16-byte aligned, 11:58-12:00: served since;
    # 70B TP8 1x32K tq4 graph 14.4 -> 13.4 us, tq3 13.9 -> 12.5)
    # the transforms as Walsh-Hadamard butterflies in registers, no H loaded (wht); the partial
    # rows' o / l in float16 (part16); both; the query row as the sequence's index (q_seq), with wht
    # (2026-12-07 15:00: wht, part16, wht_part16, q_seq, wht_qseq, norms_ahead,
    # wht_part16_norms, ring, ring2 and wht_part16_ring timed, none faster; wht's prologue 1.1 us
    # shorter at 70B TP8 1x32K and its tile loop as much longer)
    # the ring's first copies issued after H is loaded (ring_late, ring2_late)
    hm = [(v, 4, 1, 0, {}) for v in ("served", "ring_late", "ring2_late")]
    runs = [(fmt, "Llama-3-70B TP8", 8, 1, 128, 1, 32768, hm) for fmt in ("tq4", "tq3")]
    runs += [("tq4", "Llama-3-8B", 32, 8, 128, 1, 32768, hm),
             ("tq4", "Llama-3-70B TP8", 8, 1, 128, 8, 32768, hm),
             ("tq4", "Llama-3-70B TP8", 8, 1, 128, 32, 4096, hm)]
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    out_path = args.out / "kv_decode_phases.json"
    served_group = tdh.MERGE_GROUP
    for fmt, shape, hq, hk, d, b, ctx, variants in runs:
        if fmt not in args.formats.split(","):
            continue
        tables = attach(kb.our_tables(torch, fmt, hk, d, device))
        num_blocks, bt = kb.paged_layout(torch, b, ctx, device)
        cache = kb.fill_ours(torch, tables, num_blocks, hk, d, device)
        reps = max(1, min(64, -(-200_000_000 // cache.numel())))
        caches = [cache] + [cache.clone() for _ in range(reps - 1)]
        q = torch.randn(b, hq, d, device=device, dtype=torch.bfloat16)
        qsl = torch.arange(b + 1, device=device, dtype=torch.int32)
        sl = torch.full((b,), ctx, device=device, dtype=torch.int32)
        dflt = default_splits(b, hk, device, hopper=True)
        served_out = None
        if any(v[0] in WHT_ARGS for v in variants):
            wht = wht_tables(d, tables.hopper_codes, device)
        for source, nw, factor, group, launch in variants:
            splits, group = int(dflt * factor), group or served_group
            for stamped in (False, True):
                if (source, stamped) not in mods:
                    mods[source, stamped] = instrumented_module(source, stamped)
            plain_mod, mod = mods[source, False], mods[source, True]
            tdh.MERGE_GROUP = group
            tables.__dict__.pop("_hopper_launch", None)
            row = dict(format=fmt, shape=shape, batch=b, ctx=ctx, source=source, warps=nw,
                       splits=splits, group=group, launch=launch)
            try:
                out = torch.empty_like(q)
                ref = torch.empty_like(q)
                stamps = torch.zeros(b * hk * splits, STAMPS, dtype=torch.int64, device=device)
                # one counter buffer (left zero by every launch): decode_launch's own would
                # put a memset in the graph before every call
                counts = torch.zeros(tdh.counter_count(b, hk, splits), dtype=torch.int32,
                                     device=device)

                runners = {}

                def run(kernel, c, dst, *extra):
                    grid, a, kw = tdh.decode_launch(q, c, bt, sl, qsl, tables, d ** -0.5,
                                                    splits, dst, num_warps=nw,
                                                    counts=counts, **launch)
                    if source in WHT_ARGS:  # the gather and scatter tables in H's places
                        names = kernel.arg_names
                        a = list(a)
                        a[names.index("hk_ptr")], a[names.index("hvt_ptr")] = wht
                    if not source.startswith("cluster"):
                        kernel[grid](*a, *extra, **kw)
                        return
                    if kernel not in runners:
                        runners[kernel] = cluster_launcher(kernel, grid, (*a, *extra), kw)
                    runners[kernel](*a, *extra)

                def plain(c=cache):
                    run(plain_mod._tq_decode_hopper_kernel, c, out)

                def probed(c=cache):
                    run(mod._tq_decode_hopper_kernel, c, ref, stamps)

                plain()
                probed()
                torch.cuda.synchronize()
                row["max_abs_diff_probed"] = (out.float() - ref.float()).abs().max().item()
                if served_out is None:
                    served_out = out.clone()
                row["max_abs_diff_served"] = (out.float() - served_out.float()).abs().max().item()
                row["nan"] = bool(out.isnan().any())
                if counts.any() or row["max_abs_diff_served"] > 0.05 or row["nan"]:
                    raise RuntimeError("counters left non-zero or output off: not timed")
                row["graph_ms"] = kb.graph_time(torch, [lambda c=c: plain(c) for c in caches])
                row["do_bench_ms"] = kb.bench(plain, triton)  # cold L2, as kv_bench
                row["cold_graph_ms"] = cold_graph_time(torch, flush, plain, caches)
                row["probed_graph_ms"] = kb.graph_time(
                    torch, [lambda c=c: probed(c) for c in caches])
                stamps.zero_()
                probed()
                torch.cuda.synchronize()
                row.update(phases_of(stamps.cpu(), splits, group))
                stamps.zero_()
                flush.zero_()  # the L2 cold, as do_bench leaves it before each call
                probed()
                torch.cuda.synchronize()
                row["cold"] = phases_of(stamps.cpu(), splits, group)
            except Exception as e:  # one bad launch must not end the run
                row["error"] = repr(e)[:400]
            rows.append(row)
            print(json.dumps(row), flush=True)
            out_path.write_text(json.dumps(rows, indent=1))
        if b == 1:
            rows.append(dict(format="bf16-sdpa", shape=shape, batch=b, ctx=ctx,
                             graph_ms=kb.graph_sdpa(torch, b, ctx, hq, hk, d, device, None),
                             do_bench_ms=kb.time_sdpa(torch, triton, b, ctx, hq, hk, d, device)[0],
                             cold_graph_ms=cold_sdpa(torch, flush, b, ctx, hq, hk, d, device)))
        del caches, cache
        torch.cuda.empty_cache()
    tdh.MERGE_GROUP = served_group
    out_path.write_text(json.dumps(rows, indent=1))
    print("\n| fmt | shape | bxctx | source | warps | splits | group | graph us | do_bench us "
          "| cold graph us | probed us | span us | " + " | ".join(PHASES)
          + " (critical program, us) | "
          + " / ".join(PROLOGUE_MARKS) + " (median program, us from its start) |")
    print("|" + " --- |" * (13 + len(PHASES)))
    for r in rows:
        head = f"| {r['format']} | {r['shape']} | {r['batch']}x{r['ctx'] // 1024}K |"
        if "error" in r:
            print(head + f" ERROR {r['error'][:80]} |")
            continue
        if "warps" not in r:
            print(head + f" | | | | {r['graph_ms'] * 1e3:.1f} | {r['do_bench_ms'] * 1e3:.1f} | "
                  f"{r['cold_graph_ms'] * 1e3:.1f} |")
            continue
        print(head + f" {_source_label(r)} | {r['warps']} | {r['splits']} | {r['group']} | "
              f"{r['graph_ms'] * 1e3:.1f} | {r['do_bench_ms'] * 1e3:.1f} | "
              f"{r['cold_graph_ms'] * 1e3:.1f} | {r['probed_graph_ms'] * 1e3:.1f} | "
              f"{r['span_ns'] / 1e3:.1f} | {_phase_cells(r)} |")
    print("\nThe same, one stamped call after an L2 flush (cold, as do_bench):\n| fmt | shape | "
          "bxctx | source | span us | " + " | ".join(PHASES) + " | " + " / ".join(PROLOGUE_MARKS)
          + " |")
    print("|" + " --- |" * (7 + len(PHASES)))
    for r in rows:
        if "cold" not in r:
            continue
        print(f"| {r['format']} | {r['shape']} | {r['batch']}x{r['ctx'] // 1024}K | "
              f"{_source_label(r)} w{r['warps']} s{r['splits']} g{r['group']} | "
              f"{r['cold']['span_ns'] / 1e3:.1f} | {_phase_cells(r['cold'])} |")


if __name__ == "__main__":
    main()

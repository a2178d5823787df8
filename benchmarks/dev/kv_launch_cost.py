"""Host-side cost of the KV kernels' launchers (CPU only, no GPU): python benchmarks/dev/kv_launch_cost.py

Times the Python part of tq_attention and tq_store as the backend calls them, with the Triton
kernels replaced by a recorder (the launcher's module globals), on "meta" tensors: the GPU code
path (bf16 tables, the register lookup, no interpreter) without a device. What this leaves out is
Triton's own launch (binding and specializing the arguments, the driver call), which a GPU run
adds on top (measure that with kv_bench's eager vs CUDA-graph times).
--record FILE writes the launches' grids, arguments and constexprs as JSON (to compare two trees'
launchers: the same dict means the same compiled kernel for the same kernel source).
--gpu (one GPU): the same calls on CUDA tensors, first with the real kernels (the time to enqueue
a call: launcher plus Triton's launch; and the wall time per call), then with the recorder (the
launcher alone), in one process; JSON to $OUT/kv_launch_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import _source_tree  # noqa: F401  this tree's vllm_gds importable
import torch

from vllm_gds.kvcache.calibration_file import top_pairs
from vllm_gds.kvcache.formats import FORMATS
from vllm_gds.kvcache.tables import LayerTables

KERNELS = ("_tq_attention_kernel", "_tq_reduce_kernel", "_tq_store_kernel")


class Recorder:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **kwargs) records the launch."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.log is not None:
                self.log.append((self.name, grid, args, kwargs))
        return launch


def _stub(log):
    """The kernels replaced by a recorder: the launchers' CachedLaunch objects (they hold the
    kernel itself, so patching a module's kernel name does not reach them) and any module-level
    kernel launched the plain way."""
    import vllm_gds.kernels  # noqa: F401  every kernel module loaded before it is patched
    from vllm_gds.kernels import launch as launch_mod

    def record(self, grid, args, meta, compiled):
        if log is not None:
            log.append((getattr(self.fn, "__name__", repr(self.fn)), grid, args, meta))

    launch_mod.CachedLaunch.__call__ = record
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("vllm_gds.kernels"):
            for name in KERNELS:
                if name in vars(mod):
                    setattr(mod, name, Recorder(name, log))


def _tables(name, heads, d=128, device="meta"):
    mu = top_pairs(torch.randn(heads, d), None, FORMATS[name].key_mean_pairs, d // 2)
    device = "cpu" if device == "meta" else device
    return LayerTables(FORMATS[name], d, 0, 0, device, torch.bfloat16, heads, key_mean=mu,
                       rope_inv_freq=torch.ones(d // 2),
                       key_scale=torch.rand(heads, d) + 0.5, value_mean=torch.randn(heads, d))


def _cases(batch, hq, hk, d, name="tq4", device="meta"):
    """(label, call) of the served launches at one shape: decode (off CUDA: 1 split; decode/4:
    4 splits and the reduce, as served at small batches), a prefill chunk, the store."""
    from vllm_gds.kernels import AttentionTuning, tq_attention, tq_store

    dev = torch.device(device)
    tables = _tables(name, hk, d, device)
    slot = tables.layout.slot_bytes
    cache = torch.zeros(256, 16, hk, slot, dtype=torch.uint8, device=dev)
    bt = torch.zeros(batch, 256, dtype=torch.int32, device=dev)  # 4K tokens, all in block 0
    seq_lens = torch.full((batch,), 4096, dtype=torch.int32, device=dev)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    q = torch.zeros(batch, hq, d, dtype=torch.bfloat16, device=dev)
    out = torch.empty_like(q)
    qp = torch.zeros(512, hq, d, dtype=torch.bfloat16, device=dev)
    outp = torch.empty_like(qp)
    pqsl = torch.zeros(batch + 1, dtype=torch.int32, device=dev)
    pqsl[1:] = 512  # the whole chunk in the first sequence
    k = torch.zeros(batch, hk, d, dtype=torch.bfloat16, device=dev)
    slots = torch.arange(batch, dtype=torch.int64, device=dev)
    split4 = AttentionTuning(splits=4)
    return [
        ("decode", lambda: tq_attention(q, cache, bt, seq_lens, qsl, tables, d ** -0.5, out,
                                        max_query_len=1)),
        ("decode/4", lambda: tq_attention(q, cache, bt, seq_lens, qsl, tables, d ** -0.5, out,
                                          max_query_len=1, tuning=split4)),
        ("prefill", lambda: tq_attention(qp, cache, bt, seq_lens, pqsl, tables, d ** -0.5, outp,
                                         max_query_len=512)),
        ("store", lambda: tq_store(k, k, cache, slots, tables, positions=slots)),
    ]


def _plain(x):
    if isinstance(x, torch.Tensor):
        return f"tensor{tuple(x.shape)}:{x.dtype}:{tuple(x.stride())}"
    if isinstance(x, (tuple, list)):
        return [_plain(v) for v in x]
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    return repr(x)


SHAPES = {"8B batch 32": (32, 32, 8), "8B batch 1": (1, 32, 8), "70B-TP8 batch 1": (1, 8, 1)}


def _time(call, calls, sync=None):
    """(microseconds to issue a call, microseconds per call until done)."""
    for _ in range(10):
        call()
    if sync:
        sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    issued = time.perf_counter() - t0
    if sync:
        sync()
    return issued / calls * 1e6, (time.perf_counter() - t0) / calls * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--record", help="write the recorded launches (JSON) here")
    ap.add_argument("--gpu", action="store_true", help="CUDA tensors; real kernels, then stubbed")
    args = ap.parse_args()
    device = "cuda" if args.gpu else "meta"
    calls = min(args.calls, 200) if args.gpu else args.calls  # stays within the launch queue
    log = [] if args.record else None
    cases = {shape: _cases(b, hq, hk, 128, device=device) for shape, (b, hq, hk) in SHAPES.items()}
    rows, recorded = {}, {}
    if args.gpu:
        for shape, labelled in cases.items():
            for label, call in labelled:
                rows[shape, label] = list(_time(call, calls, torch.cuda.synchronize))
    _stub(log)
    for shape, labelled in cases.items():
        for label, call in labelled:
            call()  # first call: tables' caches, launch plans
            if log is not None:
                log.clear()
                call()
                recorded[f"{shape} {label}"] = [
                    {"kernel": n, "grid": _plain(g), "args": _plain(a),
                     "kwargs": {k: _plain(v) for k, v in sorted(kw.items())}}
                    for n, g, a, kw in log]
            rows.setdefault((shape, label), []).append(_time(call, calls)[0])
    if args.record:
        with open(args.record, "w") as f:
            json.dump(recorded, f, indent=1)
    if args.gpu:
        out = Path(os.environ.get("OUT", _source_tree.ROOT / "benchmarks" / "results"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "kv_launch_cost.json").write_text(json.dumps(
            {"card": torch.cuda.get_device_name(), "rows": [
                dict(shape=s, launch=la, issue_us=r[0], wall_us=r[1], launcher_us=r[2])
                for (s, la), r in rows.items()]}, indent=1))
        print(f"{'shape':<18} {'launch':<9} {'issue us':>9} {'wall us':>8} {'launcher us':>12}")
        for (shape, label), (issue, wall, ours) in rows.items():
            print(f"{shape:<18} {label:<9} {issue:>9.1f} {wall:>8.1f} {ours:>12.1f}")
        return
    print(f"{'shape':<18} {'launch':<9} {'host us/call':>12}")
    for (shape, label), (us,) in rows.items():
        print(f"{shape:<18} {label:<9} {us:>12.1f}")


if __name__ == "__main__":
    main()

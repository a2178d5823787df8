"""Host-side cost of the KV kernels' launchers (CPU only, no GPU): python benchmarks/dev/kv_launch_cost.py

Times the Python part of tq_attention and tq_store as the backend calls them, with the Triton
kernels replaced by a recorder (the launcher's module globals), on "meta" tensors: the GPU code
path (bf16 tables, the register lookup, no interpreter) without a device. What this leaves out is
Triton's own launch (binding and specializing the arguments, the driver call), which a GPU run
adds on top (measure that with kv_bench's eager vs CUDA-graph times).
--record FILE writes the launches' grids, arguments and constexprs as JSON (to compare two trees'
launchers: the same dict means the same compiled kernel for the same kernel source).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

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
    import vllm_gds.kernels  # noqa: F401  every kernel module loaded before it is patched

    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("vllm_gds.kernels"):
            for name in KERNELS:
                if name in vars(mod):
                    setattr(mod, name, Recorder(name, log))


def _tables(name, heads, d=128):
    mu = top_pairs(torch.randn(heads, d), None, FORMATS[name].key_mean_pairs, d // 2)
    return LayerTables(FORMATS[name], d, 0, 0, "cpu", torch.bfloat16, heads, key_mean=mu,
                       rope_inv_freq=torch.ones(d // 2),
                       key_scale=torch.rand(heads, d) + 0.5, value_mean=torch.randn(heads, d))


def _cases(batch, hq, hk, d, name="tq4"):
    """(label, call) of the served launches at one shape: decode (off CUDA: 1 split; decode/4:
    4 splits and the reduce, as served at small batches), a prefill chunk, the store."""
    from vllm_gds.kernels import AttentionTuning, tq_attention, tq_store

    meta = torch.device("meta")
    tables = _tables(name, hk, d)
    slot = tables.layout.slot_bytes
    cache = torch.empty(256, 16, hk, slot, dtype=torch.uint8, device=meta)
    bt = torch.empty(batch, 16, dtype=torch.int32, device=meta)
    seq_lens = torch.empty(batch, dtype=torch.int32, device=meta)
    qsl = torch.empty(batch + 1, dtype=torch.int32, device=meta)
    q = torch.empty(batch, hq, d, dtype=torch.bfloat16, device=meta)
    out = torch.empty_like(q)
    qp = torch.empty(512, hq, d, dtype=torch.bfloat16, device=meta)
    outp = torch.empty_like(qp)
    k = torch.empty(batch, hk, d, dtype=torch.bfloat16, device=meta)
    slots = torch.empty(batch, dtype=torch.int64, device=meta)
    return [
        ("decode", lambda: tq_attention(q, cache, bt, seq_lens, qsl, tables, d ** -0.5, out,
                                        max_query_len=1)),
        ("decode/4", lambda: tq_attention(q, cache, bt, seq_lens, qsl, tables, d ** -0.5, out,
                                          max_query_len=1, tuning=AttentionTuning(splits=4))),
        ("prefill", lambda: tq_attention(qp, cache, bt, seq_lens, qsl, tables, d ** -0.5, outp,
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--record", help="write the recorded launches (JSON) here")
    args = ap.parse_args()
    log = [] if args.record else None
    _stub(log)
    rows, recorded = [], {}
    for shape, (b, hq, hk) in SHAPES.items():
        for label, call in _cases(b, hq, hk, 128):
            call()  # first call: tables' caches, plans
            if log is not None:
                log.clear()
                call()
                recorded[f"{shape} {label}"] = [
                    {"kernel": n, "grid": _plain(g), "args": _plain(a),
                     "kwargs": {k: _plain(v) for k, v in sorted(kw.items())}}
                    for n, g, a, kw in log]
            t0 = time.perf_counter()
            for _ in range(args.calls):
                call()
            rows.append((shape, label, (time.perf_counter() - t0) / args.calls * 1e6))
    if args.record:
        with open(args.record, "w") as f:
            json.dump(recorded, f, indent=1)
    print(f"{'shape':<18} {'launch':<8} {'host us/call':>12}")
    for shape, label, us in rows:
        print(f"{shape:<18} {label:<8} {us:>12.1f}")


if __name__ == "__main__":
    main()

"""Sweep of the read engine's settings on one GPU (issue 3): which engine, threads, task and ring
sizes, and which copy source load a warm checkpoint fastest. One process, one checkpoint written by
the project's shard writer, InstantTensor beside it as the yardstick, best of two runs per row.

    python3 benchmarks/dev/engine_sweep.py --gib 16
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import _source_tree  # noqa: F401  this tree's vllm_gds and benchmarks/ importable
from load_bench import load_instanttensor, load_vllm_gds, write_checkpoint

MiB = 1 << 20


def configs(args):
    yield "instanttensor", None, {}
    if args.kvikio_only:
        for threads in args.threads:
            for task in args.tasks_mib:
                yield f"kvikio t{threads} task {task} MiB", {"engine": "kvikio", "num_threads": threads,
                                                             "task_size": task * MiB}, {}
        return
    for threads, per_thread, task in ((12, 1, 8), (16, 1, 8), (16, 2, 4), (16, 2, 8), (16, 3, 8), (8, 2, 8)):
        options = {"engine": "pipeline", "num_threads": threads, "num_buffers": threads * per_thread,
                   "task_size": task * MiB}
        yield f"pipeline t{threads} x{per_thread} {task} MiB", options, {}
    options = {"engine": "pipeline", "num_threads": 16, "num_buffers": 32, "task_size": 8 * MiB}
    yield "pipeline t16 x2 8 MiB, switch interval 0.5 ms", options, {"switch": 0.0005}
    for threads in (8, 16, 32):
        for task in (4, 16, 64):
            yield f"kvikio t{threads} task {task} MiB", {"engine": "kvikio", "num_threads": threads,
                                                         "task_size": task * MiB}, {}
    for bounce in (4, 32):
        yield f"kvikio t16 task 16 MiB bounce {bounce} MiB", {"engine": "kvikio", "num_threads": 16,
                                                              "task_size": 16 * MiB}, {"bounce": bounce * MiB}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=16)
    ap.add_argument("--dir", default="/dev/shm/vllm-gds-sweep")
    ap.add_argument("--kvikio-only", action="store_true", help="only kvikio, over --threads x --tasks-mib")
    ap.add_argument("--threads", type=int, nargs="+", default=[16])
    ap.add_argument("--tasks-mib", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    from vllm_gds.io.reader import ReadOptions

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    root = Path(args.dir)
    shards = write_checkpoint(root, 0, 1, args.gib, 4, device)
    paths = [root / f.path for f in shards.files]
    nbytes = shards.nbytes
    rows = []
    for label, options, extra in configs(args):
        best, detail = 0.0, {}
        for _ in range(2):
            old_switch = sys.getswitchinterval()
            if "switch" in extra:
                sys.setswitchinterval(extra["switch"])
            bounce = None
            if "bounce" in extra:
                import kvikio.defaults
                bounce = kvikio.defaults.set({"bounce_buffer_size": extra["bounce"]})
                bounce.__enter__()
            try:
                torch.cuda.synchronize()
                start = time.perf_counter()
                if options is None:
                    tensors, detail, _ = load_instanttensor(paths, device)
                else:
                    tensors, detail, _ = load_vllm_gds(shards, root, device, ReadOptions(**options), False)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - start
            except Exception as e:  # a row that fails says so and the sweep goes on
                print(f"{label}: {type(e).__name__}: {e}", flush=True)
                seconds = float("inf")
                tensors = None
            finally:
                sys.setswitchinterval(old_switch)
                if bounce is not None:
                    bounce.__exit__(None, None, None)
            del tensors
            torch.cuda.empty_cache()
            best = max(best, nbytes / seconds / 1e9)
        setup = detail.get("setup_seconds")
        rows.append((label, best, setup))
        print(f"{label:55s} {best:6.2f} GB/s  ring setup {setup}", flush=True)
    it = rows[0][1]
    print(f"\n{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs, {nbytes / 2**30:.1f} GiB warm (tmpfs), "
          "best of 2")
    print("setting | GB/s | x InstantTensor | ring setup s")
    for label, gbps, setup in rows:
        print(f"{label} | {gbps:.2f} | {gbps / it:.2f} | {'' if setup is None else f'{setup:.3f}'}")


if __name__ == "__main__":
    main()

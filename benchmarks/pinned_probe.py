"""Probe for the read engine (issue 3): which pinned host memory makes "pread, then copy to the GPU"
fastest when the host-memory copy is the bottleneck (no GDS).

For each kind of pinned buffer (anonymous mmap + cudaHostRegister, as the pipeline uses today;
cudaHostAlloc; cudaHostAlloc write-combined) and thread count: T threads each read their own
contiguous range of one tmpfs file in 8 MiB chunks into two buffers of their own, (a) reads only,
(b) reads with an asynchronous host-to-device copy of each chunk on the thread's own stream into one
GPU tensor. Prints GB/s. Needs a GPU, torch and cuda-bindings (the GPU machine has them).

    python3 benchmarks/pinned_probe.py --gib 4 --threads 8 12 16
"""

import argparse
import ctypes
import mmap
import os
import threading
import time

import numpy as np
import torch
from cuda.bindings import runtime as cudart

CHUNK = 8 << 20


def _check(result):
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime error {err}")
    return result[1] if isinstance(result, tuple) and len(result) > 1 else None


class HostBuffer:
    """``size`` bytes of pinned host memory of one kind, as a writable memoryview and a pointer."""

    def __init__(self, kind: str, size: int):
        self.kind, self.size = kind, size
        if kind == "register":
            self._map = mmap.mmap(-1, size)
            self.ptr = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
            _check(cudart.cudaHostRegister(self.ptr, size, cudart.cudaHostRegisterDefault))
        else:
            flags = cudart.cudaHostAllocWriteCombined if kind == "alloc-wc" else cudart.cudaHostAllocDefault
            self.ptr = int(_check(cudart.cudaHostAlloc(size, flags)))
        array = (ctypes.c_uint8 * size).from_address(self.ptr)
        self.view = memoryview(np.ctypeslib.as_array(array)).cast("B")

    def close(self):
        if self.kind == "register":
            _check(cudart.cudaHostUnregister(self.ptr))
            self.view.release()
        else:
            _check(cudart.cudaFreeHost(self.ptr))


def _time_threads(work, threads: int) -> float:
    """Seconds until ``work(t)`` has run on ``threads`` threads and the GPU is idle; re-raises the
    first thread's error (a failed read must not pass for a fast one)."""
    errors = []

    def guarded(t: int) -> None:
        try:
            work(t)
        except BaseException as e:
            errors.append(e)

    start = time.perf_counter()
    workers = [threading.Thread(target=guarded, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return seconds


def run(path: str, size: int, kind: str, threads: int, copy: bool, dest: torch.Tensor) -> float:
    per_thread = size // threads // CHUNK * CHUNK
    buffers = [[HostBuffer(kind, CHUNK) for _ in range(2)] for _ in range(threads)]
    streams = [torch.cuda.Stream() for _ in range(threads)]
    fd = os.open(path, os.O_RDONLY)

    def work(t: int) -> None:
        events = [None, None]
        for i, offset in enumerate(range(t * per_thread, (t + 1) * per_thread, CHUNK)):
            slot = i % 2
            if events[slot] is not None:
                events[slot].synchronize()  # its previous copy is done: the buffer is free
            buf = buffers[t][slot]
            got = os.preadv(fd, [buf.view], offset)
            assert got == CHUNK, got
            if copy:
                stream = streams[t]
                _check(cudart.cudaMemcpyAsync(dest.data_ptr() + offset, buf.ptr, CHUNK,
                                              cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                              stream.cuda_stream))
                events[slot] = torch.cuda.Event()
                events[slot].record(stream)
        for event in events:
            if event is not None:
                event.synchronize()

    try:
        seconds = _time_threads(work, threads)
    finally:
        os.close(fd)
        for pair in buffers:
            for buf in pair:
                buf.close()
    return threads * per_thread / seconds / 1e9


def run_pageable(path: str, size: int, threads: int, dest: torch.Tensor) -> float:
    """No pread, no pinned buffer: each thread copies its range straight from the file's mapping
    (page cache) with cudaMemcpyAsync; the driver stages pageable memory itself."""
    fd = os.open(path, os.O_RDONLY)
    mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    array = np.frombuffer(mapping, dtype=np.uint8)
    base = array.ctypes.data
    per_thread = size // threads // CHUNK * CHUNK
    streams = [torch.cuda.Stream() for _ in range(threads)]

    def work(t: int) -> None:
        stream = streams[t]
        for offset in range(t * per_thread, (t + 1) * per_thread, CHUNK):
            _check(cudart.cudaMemcpyAsync(dest.data_ptr() + offset, base + offset, CHUNK,
                                          cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.cuda_stream))
        stream.synchronize()

    try:
        seconds = _time_threads(work, threads)
    finally:
        del array
        mapping.close()
        os.close(fd)
    return threads * per_thread / seconds / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=4)
    ap.add_argument("--threads", type=int, nargs="+", default=[8, 12, 16])
    ap.add_argument("--path", default="/dev/shm/pinned-probe.bin")
    args = ap.parse_args()
    size = int(args.gib * (1 << 30)) // CHUNK * CHUNK
    torch.cuda.set_device(0)
    with open(args.path, "wb") as f:
        block = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
        for _ in range(size // len(block)):
            f.write(block)
    dest = torch.empty(size, dtype=torch.uint8, device="cuda")
    rows = []
    try:
        for kind in ("register", "alloc", "alloc-wc"):
            for threads in args.threads:
                for copy in (False, True):
                    run(args.path, size, kind, threads, copy, dest)  # warm-up
                    gbps = run(args.path, size, kind, threads, copy, dest)
                    rows.append((kind, threads, "pread + H2D" if copy else "pread only", gbps))
                    print(f"{kind:9s} {threads:3d} threads  {rows[-1][2]:12s} {gbps:6.2f} GB/s", flush=True)
        for threads in args.threads:
            run_pageable(args.path, size, threads, dest)  # warm-up
            gbps = run_pageable(args.path, size, threads, dest)
            print(f"pageable  {threads:3d} threads  mmap + H2D   {gbps:6.2f} GB/s", flush=True)
            rows.append(("pageable", threads, "mmap + H2D", gbps))
    finally:
        os.unlink(args.path)
    print(f"\n{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs, {size / 2**30:.1f} GiB from tmpfs, "
          f"{CHUNK >> 20} MiB chunks, 2 buffers per thread")
    print("buffer     threads  pread only  pread + H2D  (GB/s)")
    for kind in ("register", "alloc", "alloc-wc"):
        for threads in args.threads:
            only = next(r[3] for r in rows if r[:3] == (kind, threads, "pread only"))
            both = next(r[3] for r in rows if r[:3] == (kind, threads, "pread + H2D"))
            print(f"{kind:9s}  {threads:7d}  {only:10.2f}  {both:11.2f}")


if __name__ == "__main__":
    main()

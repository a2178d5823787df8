"""Probes for the read engine (issue 3), all on one GPU, each printing a table last.

Just over 400 lines: a self-contained probe (it imports nothing of the project) carried to the GPU
machine as one file.

Default: for each kind of pinned buffer (anonymous mmap + cudaHostRegister; cudaHostAlloc;
cudaHostAlloc write-combined), source (``pread``; ``mmap``: memmove out of the file's mapping;
``mmap-populate``: the same after MADV_POPULATE_READ), chunk size and thread count: T threads
each read their own range of a file in chunks into two buffers of their own, (a) reads only,
(b) with an asynchronous host-to-device copy of each chunk on the thread's own stream.
``--mixed``: memmove readers from the front of a file and one thread pinning page-cache spans in
place from the back (do they get in each other's way?). ``--register-mib N``: how long making N
MiB of pinned memory takes, several ways. Needs a GPU, torch and cuda-bindings.

    python3 benchmarks/dev/pinned_probe.py --gib 4 --threads 8 12 16 --sources pread mmap
    python3 benchmarks/dev/pinned_probe.py --mixed --threads 0 16 --pin-mib 0 256
    python3 benchmarks/dev/pinned_probe.py --register-mib 384
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


_memmove = ctypes.memmove  # a ctypes foreign call: releases the GIL while it copies
MADV_POPULATE_READ = 22


def run(path: str, size: int, kind: str, threads: int, copy: bool, dest: torch.Tensor,
        source: str = "pread", chunk: int = CHUNK) -> float:
    """``source``: "pread" (the kernel copies out of the page cache) or "mmap" (the file's mapping,
    copied by memmove in user space: page faults instead of a syscall per chunk), "mmap-populate"
    (the same, each chunk's page tables filled by one MADV_POPULATE_READ first)."""
    per_thread = size // threads // chunk * chunk
    buffers = [[HostBuffer(kind, chunk) for _ in range(2)] for _ in range(threads)]
    streams = [torch.cuda.Stream() for _ in range(threads)]
    fd = os.open(path, os.O_RDONLY)
    mapping = base = None
    if source != "pread":
        mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        array = np.frombuffer(mapping, dtype=np.uint8)
        base = array.ctypes.data
    libc = ctypes.CDLL(None, use_errno=True)

    def work(t: int) -> None:
        events = [None, None]
        for i, offset in enumerate(range(t * per_thread, (t + 1) * per_thread, chunk)):
            slot = i % 2
            if events[slot] is not None:
                events[slot].synchronize()  # its previous copy is done: the buffer is free
            buf = buffers[t][slot]
            if source == "pread":
                got = os.preadv(fd, [buf.view], offset)
                assert got == chunk, got
            else:
                if source == "mmap-populate":
                    if libc.madvise(ctypes.c_void_p(base + offset), ctypes.c_size_t(chunk),
                                    MADV_POPULATE_READ) != 0:
                        raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_READ)")
                _memmove(buf.ptr, base + offset, chunk)
            if copy:
                stream = streams[t]
                _check(cudart.cudaMemcpyAsync(dest.data_ptr() + offset, buf.ptr, chunk,
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
        if mapping is not None:
            del array
            mapping.close()
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


def run_mixed(path: str, size: int, readers: int, pin_chunk: int, dest: torch.Tensor,
              chunk: int = CHUNK, buffers_per_reader: int = 3) -> tuple[float, float]:
    """Both ends of one file at once: ``readers`` threads memmove chunks from the front of the
    file's mapping into their pinned buffers and copy them to the GPU; one pinner thread registers
    ``pin_chunk`` spans from the back in place (read-only) and copies them with no CPU copy
    (``readers=0``: the pinner alone; ``pin_chunk=0``: no pinner). Returns (GB/s, share pinned)."""
    fd = os.open(path, os.O_RDONLY)
    mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    array = np.frombuffer(mapping, dtype=np.uint8)
    base = array.ctypes.data
    lock = threading.Lock()
    ends = {"front": 0, "back": size, "pinned": 0}
    buffers = [[HostBuffer("register", chunk) for _ in range(buffers_per_reader)] for _ in range(readers)]
    streams = [torch.cuda.Stream() for _ in range(readers + 1)]

    def claim(front: bool, want: int):
        with lock:
            room = ends["back"] - ends["front"]
            if room <= 0:
                return None
            n = min(want, room)
            if front:
                ends["front"] += n
                return ends["front"] - n, n
            ends["back"] -= n
            return ends["back"], n

    def reader(t: int) -> None:
        stream, events, i = streams[t], [None] * buffers_per_reader, 0
        while (got := claim(True, chunk)) is not None:
            offset, n = got
            slot = i % buffers_per_reader
            i += 1
            if events[slot] is not None:
                events[slot].synchronize()
            buf = buffers[t][slot]
            _memmove(buf.ptr, base + offset, n)
            _check(cudart.cudaMemcpyAsync(dest.data_ptr() + offset, buf.ptr, n,
                                          cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.cuda_stream))
            events[slot] = torch.cuda.Event()
            events[slot].record(stream)
        stream.synchronize()

    def pinner() -> None:
        stream, held = streams[-1], []
        while (got := claim(False, pin_chunk)) is not None:
            offset, n = got
            while len(held) >= 2:
                ptr, event = held.pop(0)
                event.synchronize()
                _check(cudart.cudaHostUnregister(ptr))
            _check(cudart.cudaHostRegister(base + offset, n, cudart.cudaHostRegisterReadOnly))
            _check(cudart.cudaMemcpyAsync(dest.data_ptr() + offset, base + offset, n,
                                          cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.cuda_stream))
            event = torch.cuda.Event()
            event.record(stream)
            held.append((base + offset, event))
            with lock:
                ends["pinned"] += n
        for ptr, event in held:
            event.synchronize()
            _check(cudart.cudaHostUnregister(ptr))

    def work(t: int) -> None:
        if t < readers:
            reader(t)
        else:
            pinner()

    try:
        seconds = _time_threads(work, readers + (1 if pin_chunk else 0))
    finally:
        del array
        mapping.close()
        os.close(fd)
        for pair in buffers:
            for buf in pair:
                buf.close()
    return size / seconds / 1e9, ends["pinned"] / size


def main_mixed(args, size, dest):
    rows = []
    for path in args.paths:
        _write(path, size)
        try:
            for readers in args.threads:
                for pin_mib in args.pin_mib:
                    for chunk_mib in args.chunks_mib:
                        if readers == 0 and pin_mib == 0:
                            continue
                        kw = dict(chunk=chunk_mib << 20, buffers_per_reader=args.buffers_per_reader)
                        run_mixed(path, size, readers, pin_mib << 20, dest, **kw)
                        gbps, share = run_mixed(path, size, readers, pin_mib << 20, dest, **kw)
                        rows.append((path, readers, pin_mib, chunk_mib, gbps, share))
                        print(*rows[-1], flush=True)
        finally:
            os.unlink(path)
    print(f"\n{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs, {size / 2**30:.1f} GiB per file, "
          f"{args.buffers_per_reader} buffers per reader, second of two runs")
    print("file | memmove readers | pin chunk MiB | reader chunk MiB | GB/s (file to GPU) | share pinned in place")
    for r in rows:
        print(" | ".join(str(v) for v in r[:4]), f"| {r[4]:.2f} | {r[5]:.2f}")


def register_costs(total_mib: int, piece_mib: int, threads: int) -> dict:
    """Seconds to make ``total_mib`` of pinned host memory, several ways (the pipeline pays this
    before its first copy)."""
    total, piece = total_mib << 20, piece_mib << 20
    out = {}

    def timed(name, make, free):
        start = time.perf_counter()
        handle = make()
        out[name] = time.perf_counter() - start
        free(handle)

    def mmap_register(touch: bool, huge: bool, parallel: bool):
        def make():
            m = mmap.mmap(-1, total)
            if huge:
                m.madvise(mmap.MADV_HUGEPAGE)
            base = ctypes.addressof(ctypes.c_char.from_buffer(m))
            if touch:
                ctypes.memset(base, 0, total)
            ptrs = [base + k for k in range(0, total, piece)]
            reg = lambda ptr: _check(cudart.cudaHostRegister(ptr, piece, cudart.cudaHostRegisterDefault))
            if parallel:
                workers = [threading.Thread(target=lambda ps: [reg(p) for p in ps], args=(ptrs[t::threads],))
                           for t in range(threads)]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
            else:
                for ptr in ptrs:
                    reg(ptr)
            return m, ptrs

        def free(handle):
            m, ptrs = handle
            for ptr in ptrs:
                _check(cudart.cudaHostUnregister(ptr))
            # the mapping goes with the ctypes views when collected
        return make, free

    for touch in (False, True):
        for huge in (False, True):
            for parallel in (False, True):
                name = (f"mmap{' +hugepage' if huge else ''}{' +prefault' if touch else ''} + register "
                        f"{piece_mib} MiB pieces{' on %d threads' % threads if parallel else ''}")
                timed(name, *mmap_register(touch, huge, parallel))
    timed("cudaHostAlloc, one call", lambda: _check(cudart.cudaHostAlloc(total, cudart.cudaHostAllocDefault)),
          lambda ptr: _check(cudart.cudaFreeHost(ptr)))
    timed(f"cudaHostAlloc, {piece_mib} MiB pieces",
          lambda: [_check(cudart.cudaHostAlloc(piece, cudart.cudaHostAllocDefault)) for _ in range(total // piece)],
          lambda ptrs: [_check(cudart.cudaFreeHost(p)) for p in ptrs])
    return out


def _write(path: str, size: int) -> None:
    with open(path, "wb") as f:
        block = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
        for _ in range(size // len(block)):
            f.write(block)
    with open(path, "rb") as f:  # warm: every page in the page cache
        while f.read(64 << 20):
            pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=4)
    ap.add_argument("--threads", type=int, nargs="+", default=[8, 12, 16])
    ap.add_argument("--kinds", nargs="+", default=["register", "alloc", "alloc-wc"])
    ap.add_argument("--sources", nargs="+", default=["pread"], choices=["pread", "mmap", "mmap-populate"])
    ap.add_argument("--chunks-mib", type=int, nargs="+", default=[CHUNK >> 20])
    ap.add_argument("--paths", nargs="+", default=["/dev/shm/pinned-probe.bin"],
                    help="files to create and read (tmpfs, or a disk file system's warm page cache)")
    ap.add_argument("--pageable", action="store_true", help="also the driver-staged pageable copy")
    ap.add_argument("--mixed", action="store_true",
                    help="memmove readers from the front and an in-place pinner from the back (run_mixed)")
    ap.add_argument("--pin-mib", type=int, nargs="+", default=[0, 256])
    ap.add_argument("--buffers-per-reader", type=int, default=3)
    ap.add_argument("--register-mib", type=int, default=0, help="time ways of making this much pinned memory")
    args = ap.parse_args()
    size = int(args.gib * (1 << 30)) // (64 << 20) * (64 << 20)
    torch.cuda.set_device(0)
    dest = torch.empty(size, dtype=torch.uint8, device="cuda")
    if args.mixed:
        return main_mixed(args, size, dest)
    if args.register_mib:
        register_costs(args.register_mib, 8, 16)  # warm-up: the driver's first registrations
        costs = register_costs(args.register_mib, 8, 16)
        print(f"\n{torch.cuda.get_device_name(0)}: making {args.register_mib} MiB of pinned memory")
        for name, seconds in costs.items():
            print(f"{name:60s} {seconds * 1e3:8.1f} ms  {args.register_mib / 1024 / seconds:6.2f} GiB/s")
        return
    rows = []
    for path in args.paths:
        _write(path, size)
        try:
            for kind in args.kinds:
                for source in args.sources:
                    for chunk_mib in args.chunks_mib:
                        for threads in args.threads:
                            for copy in (False, True):
                                kw = dict(source=source, chunk=chunk_mib << 20)
                                run(path, size, kind, threads, copy, dest, **kw)  # warm-up
                                gbps = run(path, size, kind, threads, copy, dest, **kw)
                                row = (path, kind, source, chunk_mib, threads, copy, gbps)
                                rows.append(row)
                                print(*row, flush=True)
            if args.pageable:
                for threads in args.threads:
                    run_pageable(path, size, threads, dest)  # warm-up
                    gbps = run_pageable(path, size, threads, dest)
                    rows.append((path, "pageable", "cudaMemcpy from mmap", 8, threads, True, gbps))
        finally:
            os.unlink(path)
    print(f"\n{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs, {size / 2**30:.1f} GiB per file, "
          "2 buffers per thread, GB/s, second of two runs")
    print("file | buffer | source | chunk MiB | threads | read only | read + H2D")
    seen = []
    for r in rows:
        key = r[:5]
        if key in seen:
            continue
        seen.append(key)
        only = [x[6] for x in rows if x[:5] == key and not x[5]]
        both = [x[6] for x in rows if x[:5] == key and x[5]]
        print(" | ".join(str(v) for v in key), "|", f"{only[0]:.2f}" if only else "",
              "|", f"{both[0]:.2f}" if both else "")


if __name__ == "__main__":
    main()

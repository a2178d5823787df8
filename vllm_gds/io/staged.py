"""The staged engine: the compatibility path (no GPUDirect Storage) without readers waiting on copies.

kvikio's C++ thread pool reads each slot's file range into a ring of pinned host
slots (host reads: no GIL, no CUDA call in the readers). This thread waits for
the oldest slot, copies it to the GPU in one ``cudaMemcpyAsync`` per destination
piece on its own stream, records an event and hands the slot back for another
read once that event has completed. Reads of the next slots stay queued in the
pool meanwhile, so no reader ever waits for a copy.

kvikio's own compat path differs in exactly that: each of its threads reads a
task into its bounce buffer, copies it to the GPU and synchronizes the stream
before reading again, so each thread idles for every copy (benchmarks/RESULTS.md,
"What InstantTensor does differently"). InstantTensor's in-memory path is the
model here: threads memcpy 2 MiB pieces into a pinned window, one thread issues
the large copies.

Cold files (mostly not in the page cache, on a local disk) are read with O_DIRECT
(kvikio's ``auto_direct_io_read``: page-aligned ranges into the page-aligned
slots, buffered only for an unaligned tail), as ``dd iflag=direct`` and
InstantTensor read them.

With the page pinner (option ``pin_page_cache``; :mod:`vllm_gds.io.page_pinner`),
files resident in memory are also taken from the back of the plan by one more
thread that registers their page-cache pages in place and has the GPU copy from
them on its own stream: those bytes cost no CPU copy. The ring's reads and the
pinner's runs meet in the middle; the report gives the bytes each moved and the
pinner's rate.

Pinned memory is the ring (slots x slot size) plus, with the pinner, its
registered runs (runs in flight x run size), together bounded by
``max_pinned_bytes`` in :func:`vllm_gds.io.engine_choice.choose`. Pinning runs
at 1-2 GiB/s, so the ring is pinned once per process and kept for the next load,
as kvikio keeps its bounce buffers; :func:`prewarm` pins it in the background
(the loader calls it before building the model) and :func:`release` frees it.
With a host destination (the CPU platform, tests) the ring is plain memory and
the copies synchronous.
"""

import collections
import os
import threading
import time

import torch

from vllm_gds.errors import ShardReadError
from vllm_gds.io import kvikio_lib
from vllm_gds.io.page_pinner import Claims, PagePinner, ResidentFiles
from vllm_gds.io.pinned import PinnedBuffers
from vllm_gds.io.plan import plan_spans

_lock = threading.Lock()
_in_use = threading.Lock()  # one load at a time reads through the kept ring
_ring: tuple | None = None  # ((slots, slot_size, device), PinnedBuffers)
_pending: tuple | None = None  # ((slots, slot_size, device), thread, {"ring" | "error": ...})


def _key(slots: int, slot_size: int, device: torch.device) -> tuple:
    return (slots, slot_size, str(device))


def _make_ring(slots: int, slot_size: int, device: torch.device) -> PinnedBuffers:
    cuda = device.type == "cuda"
    return PinnedBuffers(slots, slot_size, pin=cuda, device=device if cuda else None, workers=1)


def prewarm(device: torch.device, slots: int, slot_size: int) -> None:
    """Pin the ring (and import kvikio) in a background thread; the next load of this shape uses it.

    Nothing is read. Costs about (slots x slot_size) / 1.5 GB/s of one CPU, off the caller's path."""
    global _pending
    key = _key(slots, slot_size, device)
    with _lock:
        if (_ring is not None and _ring[0] == key) or (_pending is not None and _pending[0] == key):
            return
        result: dict = {}

        def work():
            try:
                if device.type == "cuda":
                    torch.cuda.set_device(device)
                kvikio_lib.load_kvikio()
                result["ring"] = _make_ring(slots, slot_size, device)
            except BaseException as e:  # surfaced (or retried) by the load that wants the ring
                result["error"] = e

        thread = threading.Thread(target=work, name="vllm-gds-prewarm", daemon=True)
        _pending = (key, thread, result)
        thread.start()


def _take_ring(slots: int, slot_size: int, device: torch.device) -> tuple[PinnedBuffers, float, bool]:
    """(the ring, seconds spent waiting for or pinning it, whether it was pinned before this load
    started: kept from an earlier load or by prewarm)."""
    global _ring, _pending
    key = _key(slots, slot_size, device)
    start = time.perf_counter()
    with _lock:
        pending, _pending = _pending, None
        ready = _ring is not None and _ring[0] == key
    if pending is not None:
        ready = ready or not pending[1].is_alive()
        pending[1].join()
        ring = pending[2].get("ring")
        if ring is not None:
            with _lock:
                old, _ring = _ring, (pending[0], ring)
            if old is not None:
                old[1].close()
    with _lock:
        if _ring is not None and _ring[0] == key:
            return _ring[1], time.perf_counter() - start, ready
        old, _ring = _ring, None
    if old is not None:
        old[1].close()  # another shape: its pinned memory goes before the new ring's is taken
    ring = _make_ring(slots, slot_size, device)
    with _lock:
        _ring = (key, ring)
    return ring, time.perf_counter() - start, False


def wait_prewarmed() -> None:
    """Block until a ring being pinned by :func:`prewarm` is ready (benchmarks time what follows)."""
    with _lock:
        pending = _pending
    if pending is not None:
        pending[1].join()


def release() -> int:
    """Unpin and free the kept ring (and any being pinned), after a load using it ends; bytes freed."""
    global _ring, _pending
    with _in_use:
        with _lock:
            pending, _pending = _pending, None
        if pending is not None:
            pending[1].join()
            if pending[2].get("ring") is not None:
                pending[2]["ring"].close()
        with _lock:
            ring, _ring = _ring, None
        if ring is None:
            return 0
        nbytes = ring[1].nbytes
        ring[1].close()
        return nbytes


def pinned_now() -> int:
    """Bytes of pinned host memory the kept ring holds."""
    with _lock:
        return _ring[1].nbytes if _ring is not None and _ring[1].pinned else 0


def run_staged(reads, options, device: torch.device, flat_targets, checks, choice, mode: str,
               direct_io: bool, progress=None) -> dict:
    """Read every target of ``reads`` through the ring; returns details for ReadStats. Loads in
    other threads of the process wait for this one (they would share the ring)."""
    with _in_use:
        return _run(reads, device, flat_targets, checks, choice, mode, direct_io, progress)


def _run(reads, device, flat_targets, checks, choice, mode, direct_io, progress) -> dict:
    cuda = device.type == "cuda"
    kvikio = kvikio_lib.load_kvikio()
    files = [[] for _ in reads]
    for t, (file_index, target) in enumerate(flat_targets):
        files[file_index].append((t, target.file_offset, target.dest.numel() * target.dest.element_size()))
    spans = plan_spans(files, choice.slot_size)
    detail = {"engine": "staged", "threads": choice.threads, "task_size": choice.task_size,
              "slot_size": choice.slot_size, "slots": choice.slots, "spans": len(spans), "direct_io": direct_io,
              "pin_run": choice.pin_run, "pin_runs": choice.pin_runs}
    if not spans:
        return {**detail, "pinned_bytes": 0}
    if checks.active:
        checks.expect_spans(spans)
    dests = [t.dest.reshape(-1).view(torch.uint8) for _, t in flat_targets]
    paths = [r.path for r in reads]
    settings = {"num_threads": choice.threads, "task_size": choice.task_size,
                "compat_mode": kvikio.CompatMode.ON if mode != "gds" else kvikio.CompatMode.AUTO,
                "auto_direct_io_read": bool(direct_io)}
    ring, ring_seconds, kept = _take_ring(choice.slots, choice.slot_size, device)
    t_open = time.perf_counter()
    stream = torch.cuda.Stream(device) if cuda else None
    events = [None] * ring.count
    slot_arrays = [ring.tensor(i).numpy() for i in range(ring.count)]
    in_flight: collections.deque = collections.deque()  # (span index, slot, future)
    free = collections.deque(range(ring.count))
    first_byte = None
    pinner = resident = None
    fds: list[int] = []
    ring_bytes = ring_spans = 0
    with kvikio.defaults.set(settings):
        handles = kvikio_lib.open_all(kvikio, reads)
        try:
            if choice.pin_runs and not direct_io:
                resident, fds = _map_resident(reads)
            if resident is not None:
                # Files in memory last: the pinner takes them from the back, the ring the rest first.
                spans = ([s for s in spans if not resident.resident[s.file]]
                         + [s for s in spans if resident.resident[s.file]])
            claims = Claims(spans, resident.resident if resident else [False] * len(reads))
            if resident is not None:
                detail["resident_shares"] = [round(x, 3) for x in resident.shares]
                pinner = PagePinner(spans, claims, resident.sources, fds, dests, paths, device, choice.pin_run,
                                    choice.pin_runs, checks, progress)
            checks.start()
            next_span = claims.next_front()
            if pinner is not None:
                pinner.start()  # claims its first run from the back before the ring reads a byte
            setup_seconds = time.perf_counter() - t_open
            while next_span is not None or in_flight:
                if pinner is not None and pinner.error is not None:
                    raise pinner.error
                # Refill only slots whose copy has finished: this thread never waits for a copy while
                # reads are in flight (the pool keeps reading into the other slots meanwhile).
                while free and next_span is not None and (
                        events[free[0]] is None or events[free[0]].query() or not in_flight):
                    slot = free.popleft()
                    if events[slot] is not None:
                        events[slot].synchronize()  # done already, unless nothing else was in flight
                    span = spans[next_span]
                    future = handles[span.file].pread(slot_arrays[slot], span.needed, span.offset,
                                                      choice.task_size)
                    in_flight.append((next_span, slot, future))
                    next_span = claims.next_front()
                if not in_flight:
                    continue
                index, slot, future = in_flight[0]
                span = spans[index]
                kvikio_lib.wait(future, paths[span.file], span.offset, span.needed)
                in_flight.popleft()
                if first_byte is None:
                    first_byte = time.perf_counter() - t_open
                src = ring.tensor(slot)
                if cuda:
                    with torch.cuda.stream(stream):
                        for p in span.pieces:
                            dests[p.target][p.dest_offset:p.dest_offset + p.nbytes].copy_(
                                src[p.buf_offset:p.buf_offset + p.nbytes], non_blocking=True)
                    if events[slot] is None:
                        events[slot] = torch.cuda.Event()
                    events[slot].record(stream)
                    checks.landed([p.target for p in span.pieces], events[slot])
                else:
                    for p in span.pieces:
                        dests[p.target][p.dest_offset:p.dest_offset + p.nbytes].copy_(
                            src[p.buf_offset:p.buf_offset + p.nbytes])
                free.append(slot)
                moved = sum(p.nbytes for p in span.pieces)
                ring_bytes += moved
                ring_spans += 1
                if progress is not None:
                    progress(moved)
            if pinner is not None:
                pinner.join()  # raises its failure, naming the file
        except BaseException:
            if pinner is not None:
                pinner.stop()
            # The pool may still be writing into slots: wait for every read before the ring is reused.
            for _, _, future in in_flight:
                try:
                    future.get()
                except BaseException:
                    pass
            raise
        finally:
            if pinner is not None:  # its runs copied and unregistered before the mappings go
                pinner.close()
            _close(resident, fds)
            if stream is not None:
                stream.synchronize()  # no copy may still read a slot the next load refills
            kvikio_lib.close_all(handles)
    pin_detail = pinner.detail() if pinner is not None else {}
    registered = choice.pin_runs * choice.pin_run if cuda and pin_detail.get("pin_runs_done") else 0
    return {**detail, "pinned_bytes": (ring.nbytes if ring.pinned else 0) + registered,
            "ring_seconds": ring_seconds, "ring_kept": kept, "setup_seconds": setup_seconds,
            "first_byte_seconds": first_byte, "ring_bytes": ring_bytes, "ring_spans": ring_spans, **pin_detail}


def _map_resident(reads):
    """(the files' mappings, their descriptors) where at least one file is resident in memory,
    else (None, [])."""
    fds: list[int] = []
    resident = None
    try:
        for read in reads:
            try:
                fds.append(os.open(read.path, os.O_RDONLY))
            except OSError as e:
                raise ShardReadError(f"cannot open shard file {read.path}: {e.strerror}") from None
        resident = ResidentFiles(fds, [os.fstat(fd).st_size for fd in fds])
        if any(resident.resident):
            return resident, fds
    except BaseException:
        _close(resident, fds)
        raise
    _close(resident, fds)
    return None, []


def _close(resident, fds) -> None:
    if resident is not None:
        resident.close()
    for fd in fds:
        os.close(fd)

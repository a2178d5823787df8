"""The pipeline: files to GPU memory through pinned host memory, many reads and copies in flight.

Worker threads take spans (:mod:`vllm_gds.io.plan`) in file order. A span of a
file that is resident in memory (tmpfs, or a warm page cache) is pinned where it
lies (``cudaHostRegister``, read-only) and copied to the GPU straight from the
page cache: no CPU touches the bytes. A span of any other file is read with
``preadv`` (or O_DIRECT) into a ring of pinned buffers and copied from there.
Copies run on each thread's own CUDA stream; an event per span tells when its
pinned memory may be released or reused. Pinned memory stays under
``max_pinned_bytes`` whatever the model size.

This is the path where cuFile runs in compatibility mode (no nvidia-fs): it
measured faster than kvikio's own bounce buffers, which copy every byte
through the CPU (benchmarks/RESULTS.md). With a host destination (the CPU
platform, and the tests) the ring is plain memory and the copies synchronous.
"""

import collections
import itertools
import os
import queue
import threading
import time

import torch

from vllm_gds.errors import ChecksumError, GdsError, ShardReadError
from vllm_gds.io.pinned import PAGE, PinnedBuffers
from vllm_gds.io.plan import Span, plan_spans


class Checksums:
    """Checksums destinations where they landed; on the GPU, on a side stream as soon as each
    destination's last piece has landed, so that verification overlaps the reads that follow."""

    def __init__(self, flat_targets, paths, device: torch.device):
        from vllm_gds.shards.checksum import checksum_tensor

        self._checksum = checksum_tensor
        self._targets = flat_targets  # (file index, ReadTarget)
        self._paths = paths
        self._device = device
        self._wanted = [i for i, (_, t) in enumerate(flat_targets) if t.checksum is not None]
        self._remaining: dict[int, int] = {}
        self._results: dict[int, torch.Tensor] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = None
        self.error: BaseException | None = None

    @property
    def active(self) -> bool:
        return bool(self._wanted)

    def expect(self, pieces_per_target: dict[int, int]) -> None:
        """How many landings complete each destination (pieces of spans, or 1 for a whole read)."""
        self._remaining = {t: pieces_per_target.get(t, 0) for t in self._wanted}

    def start(self) -> None:
        if self.active and self._device.type == "cuda":
            self._thread = threading.Thread(target=self._run, name="vllm-gds-verify", daemon=True)
            self._thread.start()

    def landed(self, targets: list[int], event=None) -> None:
        """Pieces of ``targets`` are in place once ``event`` (None: now) completes."""
        if self._thread is not None:
            self._queue.put((targets, event))

    def _run(self) -> None:
        try:
            torch.cuda.set_device(self._device)
            stream = torch.cuda.Stream(self._device)
            with torch.cuda.stream(stream):
                while True:
                    item = self._queue.get()
                    if item is None:
                        break
                    targets, event = item
                    if event is not None:
                        stream.wait_event(event)
                    for t in targets:
                        left = self._remaining.get(t)
                        if left is None:
                            continue
                        self._remaining[t] = left - 1
                        if left == 1:
                            self._results[t] = self._checksum(self._targets[t][1].dest)
            stream.synchronize()
        except BaseException as e:  # surfaced by finish()
            self.error = e

    def stop(self) -> None:
        """After a failed read: end the side thread, compare nothing."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def finish(self) -> int:
        """Wait for the checksums and compare; raise ChecksumError naming the file and tensor."""
        self.stop()
        if self.error is not None:
            raise GdsError(f"checksum verification failed to run: {self.error}") from self.error
        if not self._wanted:
            return 0
        for t in self._wanted:  # host destinations, or any the side stream did not reach
            if t not in self._results:
                self._results[t] = self._checksum(self._targets[t][1].dest)
        got = torch.stack([self._results[t] for t in self._wanted]).cpu().tolist()
        for t, value in zip(self._wanted, got):
            file_index, target = self._targets[t]
            expected = int(target.checksum, 16) if isinstance(target.checksum, str) else int(target.checksum)
            value &= 0xFFFFFFFFFFFFFFFF
            if value != expected & 0xFFFFFFFFFFFFFFFF:
                what = f"tensor {target.name} " if target.name else "the tensor "
                raise ChecksumError(
                    f"{what}at byte {target.file_offset} of {self._paths[file_index]} has checksum "
                    f"{value:016x}, the manifest says {expected & 0xFFFFFFFFFFFFFFFF:016x}: the file "
                    "was modified or damaged after it was prepared, or the read was corrupted; "
                    "copy or prepare the directory again"
                )
        return len(self._wanted)


class _Failure:
    def __init__(self):
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def set(self, error: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = error


def _read_span(fd: int, view: memoryview, span: Span, path) -> None:
    got = 0
    while got < span.needed:
        try:
            n = os.preadv(fd, [view[got:span.length]], span.offset + got)
        except OSError as e:
            raise ShardReadError(
                f"reading {path} at byte {span.offset + got} failed: {e.strerror or e}; "
                "check the file system (dmesg) and the file, then load again"
            ) from None
        if n == 0:
            raise ShardReadError(
                f"short read from {path}: the file ends at byte {span.offset + got}, but bytes up to "
                f"{span.offset + span.needed} were expected; it is truncated: copy or prepare it again"
            )
        got += n


class _Ring:
    """The bounce buffers, made on first use (a load whose files are all resident needs none)."""

    def __init__(self, count, size, cuda, device, workers):
        self._args = (count, size, cuda, device, workers)
        self._lock = threading.Lock()
        self.buffers: PinnedBuffers | None = None
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        self.setup_seconds = 0.0

    def get(self) -> PinnedBuffers:
        if self.buffers is None:
            with self._lock:
                if self.buffers is None:
                    count, size, cuda, device, workers = self._args
                    t0 = time.perf_counter()
                    buffers = PinnedBuffers(count, size, pin=cuda, device=device if cuda else None,
                                            workers=workers)
                    self.setup_seconds = time.perf_counter() - t0
                    for i in range(count):
                        self.free.put((i, None))
                    self.buffers = buffers
        return self.buffers

    def close(self) -> None:
        if self.buffers is not None:
            self.buffers.close()


def _clear_cuda_error() -> None:
    # A refused cudaHostRegister leaves its error as the runtime's "last error", which the
    # next kernel launch check (torch's) would report as its own.
    import ctypes

    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            ctypes.CDLL(name).cudaGetLastError()
            return
        except OSError:
            continue


_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly: the GPU only reads these pages


def run_pipeline(reads, options, device: torch.device, flat_targets, checks: "Checksums") -> dict:
    """Read every target of ``reads``; returns details for ReadStats.

    Per file, one of two ways: a file resident in memory (tmpfs, warm page
    cache) is mapped and its pages pinned in place a span at a time, so the GPU
    copies straight from the page cache and no CPU copies a byte; any other
    file is read with ``preadv`` (or O_DIRECT) into the ring of pinned buffers.
    Pinned memory, in place or in the ring, stays under ``max_pinned_bytes``.
    """
    cuda = device.type == "cuda"
    span_bytes = -(-options.task_size // PAGE) * PAGE
    files = [[] for _ in reads]
    for t, (file_index, target) in enumerate(flat_targets):
        files[file_index].append((t, target.file_offset, target.dest.numel() * target.dest.element_size()))
    spans = plan_spans(files, span_bytes)
    detail = {"engine": "pipeline", "spans": len(spans), "task_size": span_bytes,
              "direct_io": bool(options.direct_io)}
    if not spans:
        return detail
    cap = options.max_pinned_bytes // span_bytes
    if cap < 1:
        raise GdsError(
            f"max_pinned_bytes {options.max_pinned_bytes} is smaller than one task ({span_bytes} bytes): "
            "lower task_size or raise max_pinned_bytes"
        )
    threads = max(1, min(options.num_threads, len(spans), cap))

    flags = os.O_RDONLY | (os.O_DIRECT if options.direct_io else 0)
    fds: list[int] = []
    mappings: list = []
    sources: list = []  # per file: the mapping's tensor (pin in place) or None (read into the ring)
    dests = [t.dest.reshape(-1).view(torch.uint8) for _, t in flat_targets]
    paths = [r.path for r in reads]
    if checks.active:  # a destination is complete once all its pieces have landed
        per_target: dict[int, int] = {}
        for span in spans:
            for p in span.pieces:
                per_target[p.target] = per_target.get(p.target, 0) + 1
        checks.expect(per_target)
    ring = None
    try:
        for read in reads:
            try:
                fds.append(os.open(read.path, flags))
            except OSError as e:
                hint = (" (this file system refuses O_DIRECT: set direct_io false)"
                        if options.direct_io and e.errno == 22 else "")
                raise ShardReadError(f"cannot open shard file {read.path}: {e.strerror}{hint}") from None
        in_place = cuda and options.pin_page_cache and not options.direct_io
        for fd in fds:
            source = None
            size = os.fstat(fd).st_size
            if in_place and size:
                from vllm_gds.io.pagecache import FileMapping

                m = FileMapping(fd, size)
                mappings.append(m)
                cached, total = m.resident_pages()
                if cached >= 0.9 * total:
                    source = m.tensor()
            sources.append(source)
        mapped = sum(s is not None for s in sources)
        # Pinned budget (cap spans): each thread keeps `inflight` spans pinned in place until
        # their copies finish; the ring (made only if some file is read) gets the rest.
        inflight = max(1, cap // (2 * threads)) if mapped else 0
        ring_count = max(1, min(options.num_buffers or 2 * threads, cap - threads * inflight))
        if not mapped:
            threads = min(threads, ring_count)
        ring = _Ring(ring_count, span_bytes, cuda, device, threads)
        detail.update(threads=threads, files_pinned_in_place=mapped, inflight_per_thread=inflight)
        order = itertools.count()
        failure = _Failure()
        refused: list[str] = []
        checks.start()
        cudart = torch.cuda.cudart() if cuda else None

        def copy_in_place(span, source, stream, pinned) -> bool:
            ptr = source.data_ptr() + span.offset
            err = int(cudart.cudaHostRegister(ptr, span.length, _REGISTER_READ_ONLY))
            if err != 0:
                _clear_cuda_error()
                refused.append(f"{paths[span.file]}: cudaError {err}")
                sources[span.file] = None  # the rest of this file goes through the ring
                return False
            with torch.cuda.stream(stream):
                for p in span.pieces:
                    a = span.offset + p.buf_offset
                    dests[p.target][p.dest_offset:p.dest_offset + p.nbytes].copy_(
                        source[a:a + p.nbytes], non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
            pinned.append((ptr, event))
            if len(pinned) > inflight:
                old_ptr, old_event = pinned.popleft()
                old_event.synchronize()
                cudart.cudaHostUnregister(old_ptr)
            if checks.active:
                checks.landed([p.target for p in span.pieces], event)
            return True

        def copy_through_ring(span, stream) -> None:
            buffers = ring.get()
            index, event = ring.free.get()
            try:
                if event is not None:
                    event.synchronize()
                _read_span(fds[span.file], buffers.view(index), span, paths[span.file])
                src = buffers.tensor(index)
                if cuda:
                    with torch.cuda.stream(stream):
                        for p in span.pieces:
                            dests[p.target][p.dest_offset:p.dest_offset + p.nbytes].copy_(
                                src[p.buf_offset:p.buf_offset + p.nbytes], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(stream)
                    if checks.active:
                        checks.landed([p.target for p in span.pieces], event)
                else:
                    for p in span.pieces:
                        dests[p.target][p.dest_offset:p.dest_offset + p.nbytes].copy_(
                            src[p.buf_offset:p.buf_offset + p.nbytes])
            finally:
                ring.free.put((index, event))

        def worker():
            pinned = collections.deque()
            stream = None
            try:
                if cuda:
                    torch.cuda.set_device(device)  # the current device is per thread
                    stream = torch.cuda.Stream(device)
                while failure.error is None:
                    i = next(order)
                    if i >= len(spans):
                        break
                    span = spans[i]
                    source = sources[span.file]
                    if source is not None and copy_in_place(span, source, stream, pinned):
                        continue
                    copy_through_ring(span, stream)
            except BaseException as e:
                failure.set(e)
            finally:
                try:
                    while pinned:
                        ptr, event = pinned.popleft()
                        event.synchronize()
                        cudart.cudaHostUnregister(ptr)
                    if stream is not None:
                        stream.synchronize()
                except BaseException as e:
                    failure.set(e)

        workers = [threading.Thread(target=worker, name=f"vllm-gds-read-{k}", daemon=True)
                   for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        used_ring = ring.buffers is not None
        detail["buffers"] = ring_count if used_ring else 0
        detail["setup_seconds"] = ring.setup_seconds
        detail["pinned_bytes"] = ((ring_count if used_ring else 0) + threads * inflight) * span_bytes if cuda else 0
        if refused:
            detail["pin_refused"] = refused[0]
        if failure.error is not None:
            e = failure.error
            if isinstance(e, GdsError):
                raise e
            raise ShardReadError(f"reading shard files failed: {type(e).__name__}: {e}") from e
    finally:
        if cuda:
            torch.cuda.synchronize(device)  # no copy may still read memory we release
        if ring is not None:
            ring.close()
        sources.clear()
        for m in mappings:
            m.close()
        for fd in fds:
            os.close(fd)
    return detail

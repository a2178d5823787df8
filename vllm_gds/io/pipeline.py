"""The pipeline: files to GPU memory through pinned host memory, many reads and copies in flight.

Worker threads take spans (:mod:`vllm_gds.io.plan`) in file order, ``preadv``
(or O_DIRECT) them into a ring of pinned buffers and copy them from there. With
``pin_page_cache``, the page pinner (:mod:`vllm_gds.io.page_pinner`, shared with
the staged engine) takes spans of files resident in memory from the back, pins
them where they lie and has the GPU copy straight from the page cache.
Copies run on each thread's own CUDA stream; an event per span tells when its
pinned memory may be released or reused. Pinned memory stays under
``max_pinned_bytes`` whatever the model size.

This is the path where cuFile runs in compatibility mode (no nvidia-fs): it
measured faster than kvikio's own bounce buffers, which copy every byte
through the CPU (benchmarks/RESULTS.md). With a host destination (the CPU
platform, and the tests) the ring is plain memory and the copies synchronous.
"""

import collections
import os
import queue
import threading
import time

import torch

from vllm_gds.errors import ChecksumError, GdsError, ShardReadError
from vllm_gds.io.page_pinner import Claims, PagePinner, ResidentFiles
from vllm_gds.io.pinned import PAGE, PinnedBuffers
from vllm_gds.io.plan import Span, plan_spans


class Checksums:
    """Checksums destinations where they landed; on the GPU, on a side stream as soon as each
    destination's last piece has landed, so that verification overlaps the reads that follow."""

    def __init__(self, flat_targets, paths, device: torch.device):
        from vllm_gds.checksum import checksum_tensor

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

    def expect_spans(self, spans) -> None:
        """A destination is complete once all its pieces in these spans have landed."""
        per_target = collections.Counter(p.target for span in spans for p in span.pieces)
        self.expect(per_target)

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


PIN_CHUNK = 256 << 20  # bytes the pinner registers at once: registration costs per call


def run_pipeline(reads, options, device: torch.device, flat_targets, checks: "Checksums",
                 progress=None) -> dict:
    """Read every target of ``reads``; returns details for ReadStats.

    Reader threads take spans from the front of the plan, ``preadv`` them into
    the ring and copy them to the GPU. With ``pin_page_cache``, one more thread
    takes spans of files resident in memory from the back of the plan, pins
    their page-cache pages in place (a large chunk at a time: the driver
    serialises registration) and has the GPU copy straight from them, so those
    bytes cost no CPU copy. Pinned memory stays under ``max_pinned_bytes``.
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
    threads = max(1, min(options.num_threads, len(spans)))
    ring_count = max(1, min(options.num_buffers or threads, cap))
    threads = min(threads, ring_count)
    pin_budget = options.max_pinned_bytes - ring_count * span_bytes
    pin_chunk = min(PIN_CHUNK, pin_budget // 2) // span_bytes * span_bytes

    flags = os.O_RDONLY | (os.O_DIRECT if options.direct_io else 0)
    fds: list[int] = []
    sources: list = []  # per file: the mapping as a tensor where it is resident, else None
    resident_files = pinner = None
    dests = [t.dest.reshape(-1).view(torch.uint8) for _, t in flat_targets]
    paths = [r.path for r in reads]
    if checks.active:
        checks.expect_spans(spans)
    ring = None
    try:
        for read in reads:
            try:
                fds.append(os.open(read.path, flags))
            except OSError as e:
                hint = (" (this file system refuses O_DIRECT: set direct_io false)"
                        if options.direct_io and e.errno == 22 else "")
                raise ShardReadError(f"cannot open shard file {read.path}: {e.strerror}{hint}") from None
        pinning = bool(options.pin_page_cache) and not options.direct_io and pin_chunk >= span_bytes
        if pinning:
            resident_files = ResidentFiles(fds, [os.fstat(fd).st_size for fd in fds])
            sources = resident_files.sources
        resident = [s is not None for s in sources] if sources else [False] * len(fds)
        pinning = pinning and any(resident)
        ring = _Ring(ring_count, span_bytes, cuda, device, threads)
        claims = Claims(spans, resident)
        failure = _Failure()
        checks.start()

        def copy_pieces(span, src, base, stream):
            """Copy ``span``'s pieces from ``src`` (its bytes start at ``base``)."""
            if cuda:
                with torch.cuda.stream(stream):
                    for p in span.pieces:
                        a = base + p.buf_offset
                        dests[p.target][p.dest_offset:p.dest_offset + p.nbytes].copy_(
                            src[a:a + p.nbytes], non_blocking=True)
            else:
                for p in span.pieces:
                    a = base + p.buf_offset
                    dests[p.target][p.dest_offset:p.dest_offset + p.nbytes].copy_(src[a:a + p.nbytes])

        def landed(span_list, event):
            if progress is not None:
                progress(sum(p.nbytes for span in span_list for p in span.pieces))
            if checks.active and cuda:
                checks.landed([p.target for span in span_list for p in span.pieces], event)

        def copy_through_ring(span, stream) -> None:
            buffers = ring.get()
            index, event = ring.free.get()
            try:
                if event is not None:
                    event.synchronize()
                _read_span(fds[span.file], buffers.view(index), span, paths[span.file])
                copy_pieces(span, buffers.tensor(index), 0, stream)
                if cuda:
                    event = torch.cuda.Event()
                    event.record(stream)
                landed([span], event)
            finally:
                ring.free.put((index, event))

        def start_stream():
            if not cuda:
                return None
            torch.cuda.set_device(device)  # the current device is per thread
            return torch.cuda.Stream(device)

        def reader():
            stream = None
            try:
                stream = start_stream()
                while failure.error is None:
                    i = claims.next_front()
                    if i is None:
                        break
                    copy_through_ring(spans[i], stream)
            except BaseException as e:
                failure.set(e)
            finally:
                if stream is not None:
                    stream.synchronize()

        workers = [threading.Thread(target=reader, name=f"vllm-gds-read-{k}", daemon=True)
                   for k in range(threads)]
        if pinning:
            pinner = PagePinner(spans, claims, sources, fds, dests, paths, device, pin_chunk, 2, checks, progress)
            pinner.start()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if pinner is not None:
            if failure.error is not None:
                pinner.stop()
            try:
                pinner.join()
            except BaseException as e:
                failure.set(e)
        used_ring = ring.buffers is not None
        detail.update(
            threads=threads, buffers=ring_count if used_ring else 0, setup_seconds=ring.setup_seconds,
            pinned_in_place_spans=pinner.spans_taken if pinner else 0,
            pinned_bytes=((ring_count if used_ring else 0) * span_bytes
                          + (2 * pin_chunk if pinner and pinner.spans_taken else 0)) if cuda else 0,
        )
        if pinner is not None:
            detail.update(pinner.detail())
        if failure.error is not None:
            e = failure.error
            if isinstance(e, GdsError):
                raise e
            raise ShardReadError(f"reading shard files failed: {type(e).__name__}: {e}") from e
    finally:
        if pinner is not None:  # its runs copied and unregistered before the mappings go
            pinner.close()
        if cuda:
            torch.cuda.synchronize(device)  # no copy may still read memory we release
        if ring is not None:
            ring.close()
        sources = []
        if resident_files is not None:
            resident_files.close()
        for fd in fds:
            os.close(fd)
    return detail

"""The pinned-buffer pipeline: parallel reads into host buffers, asynchronous copies to the GPU.

Worker threads take spans in file order, wait until a free buffer's previous
copy has finished, ``preadv`` the span into it (page cache, tmpfs, or the disk
with O_DIRECT) and queue its pieces' host-to-device copies on the thread's own
CUDA stream; the buffer goes back to the ring with an event that marks its
copy. Reads, copies and the next reads overlap, and the host memory in play is
the ring (``num_buffers x task_size``) whatever the model size.

This is the path where cuFile runs in compatibility mode (no nvidia-fs): it
measured faster than kvikio's own bounce buffers, which copy each task and
then wait for it before reading the next. With a host destination (the CPU
platform, and the tests) the copies are plain synchronous memcpys.
"""

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


def run_pipeline(reads, options, device: torch.device, flat_targets, checks: "Checksums") -> dict:
    """Read every target of ``reads`` through the buffer ring; returns details for ReadStats."""
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
    threads = max(1, min(options.num_threads, len(spans)))
    cap = options.max_pinned_bytes // span_bytes
    count = max(1, min(options.num_buffers or 2 * threads, len(spans), cap))
    if cap < 1:
        raise GdsError(
            f"max_pinned_bytes {options.max_pinned_bytes} is smaller than one task ({span_bytes} bytes): "
            "lower task_size or raise max_pinned_bytes"
        )
    threads = min(threads, count)
    detail.update(threads=threads, buffers=count, pinned_bytes=count * span_bytes if cuda else 0)

    flags = os.O_RDONLY | (os.O_DIRECT if options.direct_io else 0)
    fds: list[int] = []
    dests = [t.dest.reshape(-1).view(torch.uint8) for _, t in flat_targets]
    paths = [r.path for r in reads]
    if checks.active:  # a destination is complete once all its pieces have landed
        per_target: dict[int, int] = {}
        for span in spans:
            for p in span.pieces:
                per_target[p.target] = per_target.get(p.target, 0) + 1
        checks.expect(per_target)
    setup = time.perf_counter()
    buffers = None
    try:
        for read in reads:
            try:
                fds.append(os.open(read.path, flags))
            except OSError as e:
                hint = (" (this file system refuses O_DIRECT: set direct_io false)"
                        if options.direct_io and e.errno == 22 else "")
                raise ShardReadError(f"cannot open shard file {read.path}: {e.strerror}{hint}") from None
        buffers = PinnedBuffers(count, span_bytes, pin=cuda, device=device if cuda else None,
                                workers=threads)
        detail["setup_seconds"] = time.perf_counter() - setup
        free: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(count):
            free.put((i, None))
        order = itertools.count()
        failure = _Failure()
        checks.start()

        def worker():
            try:
                stream = None
                if cuda:
                    torch.cuda.set_device(device)  # the current device is per thread
                    stream = torch.cuda.Stream(device)
                while failure.error is None:
                    i = next(order)
                    if i >= len(spans):
                        break
                    span = spans[i]
                    index, event = free.get()
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
                        else:
                            for p in span.pieces:
                                dests[p.target][p.dest_offset:p.dest_offset + p.nbytes].copy_(
                                    src[p.buf_offset:p.buf_offset + p.nbytes])
                        if checks.active and cuda:
                            checks.landed([p.target for p in span.pieces], event)
                    finally:
                        free.put((index, event))
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
        if failure.error is not None:
            e = failure.error
            if isinstance(e, GdsError):
                raise e
            raise ShardReadError(f"reading shard files failed: {type(e).__name__}: {e}") from e
    finally:
        if cuda and buffers is not None:
            torch.cuda.synchronize(device)  # no copy may still read a buffer we unmap
        if buffers is not None:
            buffers.close()
        for fd in fds:
            os.close(fd)
    return detail

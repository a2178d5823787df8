"""Page-cache pages straight to the GPU: one thread pins spans of a resident file where they lie.

Beside a ring of pinned buffers (the staged engine's or the pipeline's), whose
readers take the plan's spans from the front (:meth:`Claims.next_front`), one
pinner thread takes runs of spans of files resident in memory (tmpfs, a warm
page cache) from the back (:meth:`Claims.run_from_back`): it registers the
run's pages of the file's read-only mapping (``cudaHostRegister``, read-only)
and has the GPU copy straight from them on its own stream, so no CPU copies
those bytes. The two meet in the middle. Registration is serialised per
process by the driver (8-17 GB/s measured, benchmarks/RESULTS.md), so the
pinner alone is slower than the ring; beside it, it adds DMA the CPUs never
touch.

Pinned memory: at most ``runs_in_flight`` runs of at most ``run_bytes`` each
are registered at a time (one being copied, one registered next); a run is
unregistered once its copy has finished. The caller counts that toward
``max_pinned_bytes`` beside its ring (:func:`vllm_gds.io.engine_choice.choose`).

A refused registration (a memlock limit, a driver that will not pin file
pages) copies that run from the pageable mapping and stops pinning: the ring
reads the rest. Any other failure is kept, named by file, and fails the load
(:meth:`PagePinner.join`). With a host destination (the CPU platform, tests)
runs are copied from the mapping by the CPU, with nothing registered.
"""

import collections
import ctypes
import os
import threading
import time

import torch

from vllm_gds.errors import GdsError, ShardReadError

REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly: the GPU only reads these pages
# A file is taken by the pinner only if at least this share of its pages is in memory (mincore):
# registering pages that are not resident would fault them in from the disk, serialised.
RESIDENT_SHARE = 0.9


class Claims:
    """Span indices handed out from the front (ring readers) and from the back (the pinner)."""

    def __init__(self, spans, resident):
        self._spans, self._resident = spans, resident
        self._lock = threading.Lock()
        self.front, self.back = 0, len(spans) - 1

    def next_front(self) -> int | None:
        with self._lock:
            if self.front > self.back:
                return None
            self.front += 1
            return self.front - 1

    def run_from_back(self, max_bytes: int) -> list[int]:
        """Consecutive spans of one resident file, adjacent on disk, at most ``max_bytes``
        (at least one span if any is left at the back); empty when the back is not resident."""
        with self._lock:
            taken: list[int] = []
            size = 0
            while self.back >= self.front:
                j = self.back
                span = self._spans[j]
                if not self._resident[span.file]:
                    break
                if taken:
                    nxt = self._spans[taken[-1]]
                    if span.file != nxt.file or span.offset + span.length != nxt.offset:
                        break
                if taken and size + span.length > max_bytes:
                    break
                taken.append(j)
                size += span.length
                self.back -= 1
            return taken[::-1]


def clear_cuda_error() -> None:
    # A refused cudaHostRegister leaves its error as the runtime's "last error", which the
    # next kernel launch check (torch's) would report as its own.
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            ctypes.CDLL(name).cudaGetLastError()
            return
        except OSError:
            continue


class ResidentFiles:
    """Read-only mappings of the files of a load that are resident in memory (sampled mincore), as
    tensors the pinner copies from; :meth:`close` unmaps them."""

    def __init__(self, fds, sizes):
        from vllm_gds.io.pagecache import FileMapping, file_residency

        self.mappings: list = []
        self.sources: list = []  # per file: the mapping as a uint8 tensor where resident, else None
        self.shares: list[float] = []
        try:
            for fd, size in zip(fds, sizes):
                source, share = None, 0.0
                if size:
                    m = FileMapping(fd, size)
                    self.mappings.append(m)
                    share = file_residency(m)[0]
                    if share >= RESIDENT_SHARE:
                        source = m.tensor()
                self.sources.append(source)
                self.shares.append(share)
        except BaseException:
            self.close()
            raise

    @property
    def resident(self) -> list[bool]:
        return [s is not None for s in self.sources]

    def close(self) -> None:
        self.sources = []
        for m in self.mappings:
            m.close()
        self.mappings = []


def merged_pieces(spans) -> list[tuple[int, int, int, int]]:
    """(target, dest offset, file offset, bytes) of a run's pieces, neighbours merged: a tensor
    across several spans of the run is one copy."""
    out: list[list[int]] = []
    for span in spans:
        for p in span.pieces:
            src = span.offset + p.buf_offset
            if out and out[-1][0] == p.target and out[-1][1] + out[-1][3] == p.dest_offset \
                    and out[-1][2] + out[-1][3] == src:
                out[-1][3] += p.nbytes
            else:
                out.append([p.target, p.dest_offset, src, p.nbytes])
    return [tuple(x) for x in out]


class PagePinner:
    """The pinner thread of one load: :meth:`start`, then :meth:`join` after the ring is done."""

    def __init__(self, spans, claims: Claims, sources, fds, dests, paths, device: torch.device,
                 run_bytes: int, runs_in_flight: int, checks, progress=None):
        self._spans, self._claims, self._sources, self._fds = spans, claims, sources, fds
        if device.type == "cuda" and device.index is None:  # the caller's current device, for this thread
            device = torch.device("cuda", torch.cuda.current_device())
        self._dests, self._paths, self._device = dests, paths, device
        self._run_bytes, self._runs_in_flight = run_bytes, max(1, runs_in_flight)
        self._checks, self._progress = checks, progress
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first: list[int] = []
        self.error: BaseException | None = None
        self.refused: str | None = None
        self.nbytes = 0  # bytes of destination pieces it copied
        self.spans_taken = 0
        self.runs = 0
        self.seconds = 0.0  # from its start to its last copy finished
        self.register_seconds = 0.0  # inside cudaHostRegister
        self.unregister_seconds = 0.0  # inside cudaHostUnregister

    def start(self) -> None:
        # The first run is claimed here, before the ring's readers start: the pinner then always
        # has its share, however the threads are scheduled.
        self._first = self._claims.run_from_back(self._run_bytes)
        if self._first:
            self._thread = threading.Thread(target=self._run, name="vllm-gds-pin", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Take no further run (a failed load); :meth:`join` still waits for the runs taken."""
        self._stop.set()

    def join(self) -> None:
        """Wait until every run taken is copied and unregistered; raise its failure, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """For a load's cleanup, before the mappings go: stop, and wait until the runs taken are
        copied and unregistered. Their failure is not raised here (join raised it already, or
        another failure is on its way)."""
        self.stop()
        try:
            self.join()
        except BaseException:
            pass

    def detail(self) -> dict:
        return {"pin_spans_taken": self.spans_taken, "pin_runs_done": self.runs, "pin_bytes": self.nbytes,
                "pin_seconds": self.seconds, "pin_register_seconds": self.register_seconds,
                "pin_unregister_seconds": self.unregister_seconds,
                "pin_gb_per_s": self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0,
                **({"pin_refused": self.refused} if self.refused else {})}

    def _copy(self, run, src: torch.Tensor, stream) -> None:
        cuda = stream is not None
        pieces = merged_pieces([self._spans[j] for j in run])
        if cuda:
            with torch.cuda.stream(stream):
                for target, dest_offset, src_offset, n in pieces:
                    self._dests[target][dest_offset:dest_offset + n].copy_(src[src_offset:src_offset + n],
                                                                          non_blocking=True)
        else:
            for target, dest_offset, src_offset, n in pieces:
                self._dests[target][dest_offset:dest_offset + n].copy_(src[src_offset:src_offset + n])

    def _run(self) -> None:
        cuda = self._device.type == "cuda"
        stream, held, run = None, collections.deque(), self._first
        cudart = None
        register = cuda
        path = None
        t0 = time.perf_counter()
        try:
            if cuda:
                torch.cuda.set_device(self._device)  # before any CUDA call of this thread
                stream = torch.cuda.Stream(self._device)
                cudart = torch.cuda.cudart()
            while run:
                first, last = self._spans[run[0]], self._spans[run[-1]]
                path = self._paths[first.file]
                end = last.offset + last.needed
                # The mapping is read only below the file's end: one that shrank since its size was
                # checked would fault (SIGBUS) instead of failing the load.
                size = os.fstat(self._fds[first.file]).st_size
                if size < end:
                    raise ShardReadError(
                        f"shard file {path} is now {size} bytes but bytes up to {end} were expected: it "
                        "was cut short while loading; copy or prepare it again")
                src = self._sources[first.file]
                ptr, length = src.data_ptr() + first.offset, last.offset + last.length - first.offset
                entry = None
                if register:
                    while len(held) >= self._runs_in_flight:  # bounded: one copying, one next
                        self._unregister(cudart, stream, held.popleft())
                    t = time.perf_counter()
                    err = int(cudart.cudaHostRegister(ptr, length, REGISTER_READ_ONLY))
                    self.register_seconds += time.perf_counter() - t
                    if err != 0:
                        clear_cuda_error()
                        self.refused = (f"{path}: cudaHostRegister of {length >> 20} MiB refused (cudaError "
                                        f"{err}); the ring read the rest")
                        register = False
                    else:
                        entry = [ptr, None]  # unregistered in any case, once its copy has finished
                        held.append(entry)
                self._copy(run, src, stream)
                event = None
                if cuda:
                    event = torch.cuda.Event()
                    event.record(stream)
                    if entry is not None:
                        entry[1] = event
                    else:
                        event.synchronize()  # pageable: the mapping is read by the copy itself
                pieces = [p for j in run for p in self._spans[j].pieces]
                nbytes = sum(p.nbytes for p in pieces)
                self.nbytes += nbytes
                self.spans_taken += len(run)
                self.runs += 1
                if self._checks.active and cuda:
                    self._checks.landed([p.target for p in pieces], event)
                if self._progress is not None:
                    self._progress(nbytes)
                if self._stop.is_set() or (cuda and not register):
                    break
                run = self._claims.run_from_back(self._run_bytes)
        except BaseException as e:
            if isinstance(e, GdsError):
                self.error = e
            else:
                self.error = ShardReadError(
                    f"copying {path} from its page cache to the GPU failed: {type(e).__name__}: {e}")
        finally:
            try:
                while held:
                    self._unregister(cudart, stream, held.popleft())
                if stream is not None:
                    stream.synchronize()
            except BaseException as e:
                if self.error is None:
                    self.error = GdsError(f"releasing page-cache pages pinned for {path} failed: {e}")
            self.seconds = time.perf_counter() - t0

    def _unregister(self, cudart, stream, entry) -> None:
        ptr, event = entry
        if event is not None:
            event.synchronize()
        else:  # registered, then a failure before its copy's event was recorded
            stream.synchronize()
        t = time.perf_counter()
        cudart.cudaHostUnregister(ptr)
        self.unregister_seconds += time.perf_counter() - t

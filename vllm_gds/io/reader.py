"""Read byte ranges of files straight into the tensors that will hold them.

A read is a list of :class:`FileRead`: each names a file and the (offset,
destination tensor) pairs to fill from it. Destinations are contiguous tensors
on the GPU or in host memory (the CPU platform). Three engines
(:func:`vllm_gds.io.engine_choice.choose` picks one and its sizes from the machine):

* ``kvikio``: cuFile reads straight into the destination. Where GPUDirect
  Storage is active (nvidia-fs loaded, cuFile not in compatibility mode) the
  storage DMAs into GPU memory with no host copy: the engine under GDS, and for
  host destinations. Without GDS its compatibility mode reads each task into a
  pinned bounce buffer and copies it to the GPU, each thread waiting for its copy.
* ``staged`` (:mod:`vllm_gds.io.staged`), the compat path's engine: kvikio's pool
  reads into a ring of pinned slots and one thread copies whole slots to the GPU,
  so no reader waits for a copy; O_DIRECT for cold files on local disks. With
  ``pin_page_cache``, files in memory are also taken from the back by the page
  pinner (:mod:`vllm_gds.io.page_pinner`): DMA from their page cache, no CPU copy.
* ``pipeline`` (:mod:`vllm_gds.io.pipeline`): Python threads read into a
  bounded ring of pinned host buffers and copy on several CUDA streams; it can
  pin page-cache pages in place. Kept for that and for comparison; it measured
  slower than kvikio's pool (the GIL).

:func:`resolve_mode` picks the path from the node and the policy (``auto``,
``require``, ``off``). Every byte is accounted for: a missing, truncated or
short-read file raises ShardReadError naming the file, and the caller installs
nothing. Targets that carry a checksum are verified where they landed (on the
GPU, overlapped with the reads that follow); a mismatch raises ChecksumError.
"""

import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from vllm_gds.errors import GdsError, ShardReadError
from vllm_gds.io import gds_checklist, gds_env, kvikio_lib, pagecache, staged
from vllm_gds.io.engine_choice import MAX_THREADS, MIN_BOUNCE, EngineChoice, Machine, choose, fs_kind
from vllm_gds.io.pipeline import Checksums, run_pipeline

POLICIES = ("auto", "require", "off")
ENGINES = ("auto", "pipeline", "kvikio", "staged")
# Files with less than this share of their pages in memory, on a local disk, are read with O_DIRECT
# by the staged engine (cold loads: no page-cache copy, as dd iflag=direct and InstantTensor read).
COLD_BELOW = 0.5


@dataclass(frozen=True)
class ReadOptions:
    policy: str = "auto"  # auto: GDS where available; require: fail unless GDS; off: never GDS
    # 0: chosen from the machine (CPUs, ranks on the node, file system): vllm_gds.io.engine_choice.
    num_threads: int = 0  # kvikio's pool or the pipeline's readers
    task_size: int = 0  # bytes per read (kvikio: per task, bounce buffer at most this; pipeline: per buffer)
    slot_size: int = 0  # staged: bytes per pinned slot, one GPU copy each; 0: automatic
    num_buffers: int = 0  # pipeline: pinned buffers in the ring; 0: one per reader thread
    # pinned host memory stays below this: kvikio's bounce buffers (threads x bounce size), the
    # pipeline's ring and pages pinned in place
    max_pinned_bytes: int = 1 << 30
    ranks_on_node: int = 0  # processes of this load sharing the node's CPUs; 0: one (set by the loader)
    # auto: kvikio under GDS and into host memory, the compat path's engine otherwise (engine_choice)
    engine: str = "auto"
    # O_DIRECT reads (pipeline, staged); the staged engine also uses them for cold files on its own
    direct_io: bool = False
    # staged and pipeline: one extra thread takes files resident in memory (tmpfs, warm page cache)
    # from the back, pins their page-cache pages in place and has the GPU copy straight from them,
    # with no CPU copy (vllm_gds.io.page_pinner). None: engine_choice.PAGE_PINNER decides.
    pin_page_cache: bool | None = None
    pin_run_size: int = 0  # bytes the pinner registers per call; 0: automatic (engine_choice.PIN_RUN)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise GdsError(f"gds policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.engine not in ENGINES:
            raise GdsError(f"engine {self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.num_threads < 0 or self.ranks_on_node < 0 or any(
                n and n < 4096 for n in (self.task_size, self.slot_size)):
            raise GdsError("num_threads and ranks_on_node must be >= 0 (0: automatic), task_size and "
                           "slot_size >= 4096 bytes (0: automatic)")
        if self.pin_page_cache not in (None, True, False) or self.pin_run_size < 0:
            raise GdsError(f"pin_page_cache must be true, false or null (automatic), not {self.pin_page_cache!r}; "
                           "pin_run_size >= 0 bytes (0: automatic)")
        if self.num_buffers < 0:
            raise GdsError("num_buffers must be >= 0 (0: one per reader thread)")
        if self.max_pinned_bytes < MIN_BOUNCE:
            raise GdsError(
                f"max_pinned_bytes {self.max_pinned_bytes} cannot hold one bounce buffer of {MIN_BOUNCE} "
                f"bytes, so nothing could be read: raise it to at least {MIN_BOUNCE} (default 1 GiB)"
            )


MAX_AUTO_THREADS = MAX_THREADS


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def auto_threads(ranks_on_node: int = 1) -> int:
    """Reader threads for one rank on a local or memory file system (see engine_choice.choose)."""
    return choose(Machine(cpus=available_cpus(), ranks_on_node=max(1, ranks_on_node), mode="host")).threads


def describe_machine(reads: list["FileRead"], options: "ReadOptions", mode: str, ranks_on_node: int = 1) -> Machine:
    """What this process may use for ``reads``: its CPUs, the ranks sharing them, the files' file system."""
    mount = gds_env.mount_of(reads[0].path) if reads else None
    return Machine(cpus=available_cpus(), ranks_on_node=max(1, options.ranks_on_node or ranks_on_node),
                   fstype=mount.fstype if mount else "", mode=mode, max_pinned_bytes=options.max_pinned_bytes)


def with_threads(options: "ReadOptions", ranks_on_node: int = 1) -> "ReadOptions":
    """``options`` with ``num_threads`` resolved (0 means automatic)."""
    if options.num_threads:
        return options
    return replace(options, num_threads=auto_threads(ranks_on_node))


@dataclass(frozen=True)
class ReadTarget:
    file_offset: int
    dest: torch.Tensor  # contiguous; receives dest.numel() * dest.element_size() bytes
    name: str = ""  # for error messages
    checksum: str | int | None = None  # wsum64-v1 (16 hex digits, as the manifest spells it): verify


@dataclass(frozen=True)
class FileRead:
    path: Path
    targets: tuple[ReadTarget, ...]
    expected_size: int | None = None  # the file's size as the manifest records it


@dataclass
class ReadStats:
    mode: str  # "gds", "compat" (no GDS: pinned pipeline or kvikio's bounce buffers) or "host"
    nbytes: int = 0
    seconds: float = 0.0
    files: int = 0
    detail: dict = field(default_factory=dict)  # engine, threads, pinned_bytes, verified, ...

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def _set_device(device: torch.device) -> None:
    # cuFile's driver open makes a context on the current device: it must be ours.
    if device.type == "cuda":
        torch.cuda.set_device(device if device.index is not None else torch.cuda.current_device())


def gds_available() -> bool:
    """kvikio's view: nvidia-fs is loaded, cuFile's driver reports GDS, kvikio would not prefer
    its compat mode. The driver is asked only where nvidia-fs exists (asking creates a CUDA
    context on the current device: set it first)."""
    if not gds_env.nvidia_fs_loaded():
        return False
    view = gds_env.kvikio_driver_view()
    return bool(view.get("is_gds_available")) and not view.get("compat_mode_preferred", True)


def gds_problems(device: torch.device) -> list[str]:
    """Why GPUDirect Storage would not be used for every file; empty when it would.

    kvikio 26.10 has no per-file flag that says whether a read went through GDS
    or through compatibility mode, and both cuFile (``allow_compat_mode``) and
    kvikio (``KVIKIO_COMPAT_MODE=AUTO``) fall back silently per file. Policy
    ``require`` therefore demands a configuration in which no fallback can
    happen silently:

    1. the device is a CUDA GPU;
    2. the nvidia-fs kernel module is loaded;
    3. cuFile's config (``$CUFILE_ENV_PATH_JSON`` or /etc/cufile.json) sets
       ``properties.allow_compat_mode`` to false, and the driver, as kvikio
       reports it, agrees: a file that GDS cannot serve then fails at open;
    4. ``KVIKIO_COMPAT_MODE`` is not ON, and kvikio does not prefer compat mode;
    5. cuFile's driver, through kvikio, reports ``is_gds_available``.

    The items are :mod:`vllm_gds.io.gds_checklist`'s, the same that ``doctor`` prints.
    The reader then opens every file with kvikio's compat mode OFF before it
    reads a byte, so a file on a file system without GDS support fails the load
    at start-up, naming the file, instead of being read through a bounce buffer.
    """
    if device.type != "cuda":
        return [f"the platform is {device.type}, not CUDA: GPUDirect Storage needs an NVIDIA GPU"]
    problems = gds_checklist.problems(gds_checklist.node_checks())
    if problems:  # the driver is only worth asking (and a context only worth making) past these
        return problems
    _set_device(device)
    return gds_checklist.problems([gds_checklist.driver_check(gds_env.kvikio_driver_view())])


def resolve_mode(device: torch.device, policy: str) -> str:
    """Which path reads will take on ``device`` under ``policy``; fails early for ``require``.

    Sets ``device`` as the current CUDA device first, so that any cuFile driver
    call makes its context there and nowhere else.
    """
    if policy not in POLICIES:
        raise GdsError(f"gds policy {policy!r} is not one of {', '.join(POLICIES)}")
    if device.type != "cuda":
        if policy == "require":
            raise GdsError(
                "gds policy 'require': the platform is not CUDA, so GPUDirect Storage cannot be used; "
                "use policy 'auto' or 'off'"
            )
        return "host"
    _set_device(device)
    if policy == "off":
        return "compat"
    if policy == "require":
        problems = gds_problems(device)
        if problems:
            raise GdsError(
                "gds policy 'require': GPUDirect Storage would not be used for every file: "
                + "; ".join(problems)
                + ". Run `vllm-gds doctor PATH` for the full picture, or use policy 'auto' "
                "to read through the compatibility path"
            )
        return "gds"
    return "gds" if gds_available() else "compat"


def _check_file(read: FileRead) -> None:
    try:
        size = os.stat(read.path).st_size
    except OSError as e:
        raise ShardReadError(f"cannot open shard file {read.path}: {e.strerror}; prepare the directory again") from None
    if read.expected_size is not None and size != read.expected_size:
        raise ShardReadError(
            f"shard file {read.path} is {size} bytes, the manifest says {read.expected_size}: "
            "it is truncated or was modified; prepare the directory again"
        )
    for target in read.targets:
        if not target.dest.is_contiguous():
            raise ValueError(f"read destinations must be contiguous ({target.name or target.file_offset} of {read.path})")
        end = target.file_offset + target.dest.numel() * target.dest.element_size()
        if target.file_offset < 0 or end > size:
            raise ShardReadError(
                f"shard file {read.path} ends at byte {size} but a tensor lies at "
                f"{target.file_offset}..{end}: the file is truncated; prepare the directory again"
            )


def _as_buffer(tensor: torch.Tensor):
    data = tensor.reshape(-1).view(torch.uint8)
    return data if data.is_cuda else data.numpy()


def _engine(mode: str, options: ReadOptions) -> str:
    """``auto`` stays for engine_choice to resolve."""
    if options.engine == "auto":
        return "auto"
    if options.policy == "require" and options.engine != "kvikio":
        raise GdsError(f"gds policy 'require' reads through kvikio; engine {options.engine!r} contradicts it")
    return options.engine


def _read_kvikio(reads, options, mode, flat_targets, checks, choice: EngineChoice, progress=None,
                 direct: bool = False) -> dict:
    t0 = time.perf_counter()
    kvikio = kvikio_lib.load_kvikio()
    # One pinned bounce buffer per thread at a time (a task larger than it is read through it in
    # pieces): kvikio's pinned memory is num_threads x bounce_buffer_size, which choose() bounds.
    # Set under GDS too: a file that falls back to compat mode reads through the same buffers.
    settings = {"num_threads": choice.threads, "task_size": choice.task_size,
                "bounce_buffer_size": choice.bounce_size}
    if mode == "gds":
        # require: no silent per-file fallback; auto: kvikio's AUTO falls back where it must.
        settings["compat_mode"] = kvikio.CompatMode.OFF if options.policy == "require" else kvikio.CompatMode.AUTO
    else:
        settings["compat_mode"] = kvikio.CompatMode.ON
    # O_DIRECT only into host memory: into a GPU kvikio would bounce through a second pinned pool.
    direct = direct and mode == "host"
    settings["auto_direct_io_read"] = direct
    with kvikio.defaults.set(settings):
        # What kvikio will use, read back from it: the bound the load report states.
        threads, bounce = kvikio.defaults.get("num_threads"), kvikio.defaults.get("bounce_buffer_size")
        if threads * bounce > options.max_pinned_bytes:
            raise GdsError(f"kvikio would pin {threads} x {bounce} bytes, over max_pinned_bytes "
                           f"{options.max_pinned_bytes}")
        handles = kvikio_lib.open_all(kvikio, reads)  # every file opens before the first byte is read
        setup_seconds = time.perf_counter() - t0  # import, thread pool, opens
        first_byte = None
        try:
            pending = []
            for t, (file_index, target) in enumerate(flat_targets):
                nbytes = target.dest.numel() * target.dest.element_size()
                if nbytes == 0:
                    continue
                future = handles[file_index].pread(_as_buffer(target.dest), nbytes, target.file_offset)
                pending.append((t, file_index, target, nbytes, future))
            for t, file_index, target, nbytes, future in pending:
                kvikio_lib.wait(future, reads[file_index].path, target.file_offset, nbytes)
                if first_byte is None:
                    first_byte = time.perf_counter() - t0
                checks.landed([t])
                if progress is not None:
                    progress(nbytes)
        finally:
            kvikio_lib.close_all(handles)
    # Under GDS (unless a file falls back) and into host memory nothing is pinned; in compat mode
    # kvikio pins its bounce buffers (and keeps them in its pool for the next load).
    return {"engine": "kvikio", "threads": threads, "task_size": choice.task_size, "bounce_size": bounce,
            "pinned_bytes": threads * bounce if mode == "compat" else 0, "pinned_bound_bytes": threads * bounce,
            "setup_seconds": setup_seconds, "first_byte_seconds": first_byte, "direct_io": direct}


def _plan(reads, options: ReadOptions, mode: str, ranks_on_node: int):
    """(engine, machine, choice, resident share, whether to read with O_DIRECT) for ``reads``."""
    engine = _engine(mode, options)
    resident = pagecache.resident_fraction_of([r.path for r in reads])  # before the reads warm them
    machine = describe_machine(reads, options, mode, ranks_on_node)
    # Cold files on a local disk: read around the page cache (the staged engine; O_DIRECT).
    direct = options.direct_io or (resident is not None and resident < COLD_BELOW
                                   and fs_kind(machine.fstype) == "local")
    machine = replace(machine, cold=direct)
    choice = choose(machine, options.num_threads, options.task_size,
                    engine="kvikio" if engine == "pipeline" else engine, slot_size=options.slot_size,
                    pin_page_cache=options.pin_page_cache, pin_run=options.pin_run_size)
    return ("pipeline" if engine == "pipeline" else choice.engine), machine, choice, resident, direct


def prewarm(paths: list[Path], options: ReadOptions, device: torch.device, ranks_on_node: int = 1) -> str:
    """Start what the first read of ``paths`` would pay for (the staged engine's pinned ring, kvikio's
    import) in a background thread, so that it overlaps the model's construction. Reads nothing;
    returns the engine the reads will take. :func:`release_pinned` frees the ring after the load."""
    mode = resolve_mode(device, options.policy)
    engine, _, choice, _, _ = _plan([FileRead(Path(p), ()) for p in paths], options, mode, ranks_on_node)
    if engine == "staged":
        staged.prewarm(device, choice.slots, choice.slot_size)
    elif engine == "kvikio":  # its import (libraries, the driver's entry points); under GDS the cuFile
        # driver was opened by resolve_mode already
        threading.Thread(target=_import_quietly, name="vllm-gds-prewarm", daemon=True).start()
    return engine


def _import_quietly() -> None:
    try:
        kvikio_lib.load_kvikio()
    except GdsError:
        pass  # the load that needs kvikio reports it


def release_pinned() -> int:
    """Free the pinned memory that reads keep between loads (the staged engine's ring); bytes freed."""
    return staged.release()


def read_files(reads: list[FileRead], options: ReadOptions, device: torch.device,
               progress=None, ranks_on_node: int = 1) -> ReadStats:
    """Fill every target of ``reads``; all files are checked before the first byte is read.

    ``seconds`` runs until every byte is in place, the device synchronized and
    the checksums (of targets that carry one) compared. ``progress(nbytes)``, if
    given, is called from reader threads as bytes are read (it must be thread-safe,
    as ``tqdm.update`` is). ``ranks_on_node``: processes of this load sharing the
    node's CPUs, for the automatic thread count.
    """
    started = time.perf_counter()
    mode = resolve_mode(device, options.policy)
    for read in reads:
        _check_file(read)
    engine, machine, choice, resident, direct = _plan(reads, options, mode, ranks_on_node)
    task_size = choice.task_size
    if engine == "pipeline" and not options.task_size:  # its ring needs one whole task pinned
        task_size = min(task_size, options.max_pinned_bytes // 4096 * 4096)
    options = replace(options, num_threads=choice.threads, task_size=task_size)
    flat = [(i, t) for i, read in enumerate(reads) for t in read.targets]
    checks = Checksums(flat, [r.path for r in reads], device)
    stats = ReadStats(mode=mode, files=len(reads))
    start = time.perf_counter()
    try:
        if engine == "pipeline":
            detail = run_pipeline(reads, options, device, flat, checks, progress)
        elif engine == "staged":
            detail = staged.run_staged(reads, options, device, flat, checks, choice, mode, direct, progress)
        else:
            checks.expect({t: 1 for t in range(len(flat))})
            checks.start()
            detail = _read_kvikio(reads, options, mode, flat, checks, choice, progress, direct)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        verify_start = time.perf_counter()
        detail["verified"] = checks.finish()
        detail["verify_tail_seconds"] = time.perf_counter() - verify_start
    except BaseException:
        checks.stop()
        raise
    stats.seconds = time.perf_counter() - start
    stats.nbytes = sum(t.dest.numel() * t.dest.element_size() for _, t in flat)
    stats.detail = {**detail, "choice": choice.reason, "machine": {
        "cpus": machine.cpus, "ranks_on_node": machine.ranks_on_node, "fstype": machine.fstype},
        "resident_fraction": resident, "before_read_seconds": start - started,
        "kvikio_import_seconds": kvikio_lib.import_seconds}
    return stats

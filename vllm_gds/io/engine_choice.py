"""Which engine, how many reader threads, how large a task and how much pinned memory: from the machine.

One pure function, :func:`choose`, from a :class:`Machine` (what the process may
use) and the user's explicit settings to an :class:`EngineChoice` that says what
was picked and why. Nothing here touches the system; :func:`describe_machine`
(in :mod:`vllm_gds.io.reader`) fills a Machine from the running process.

Engines: ``kvikio`` reads straight into the destination (cuFile/GDS where it is
active; into host memory on the CPU platform; through its per-thread pinned
bounce buffers otherwise). ``staged`` (:mod:`vllm_gds.io.staged`) is the
compatibility path without GDS: kvikio's pool reads into a ring of pinned slots
and each slot goes to the GPU in one copy that never holds up the readers.

Where the numbers come from (benchmarks/RESULTS.md, "Load"): kvikio's compat
path from tmpfs on one H200 is bound by the host's memory copies, one reader
thread per CPU the rank may use: 16 CPUs: 16 threads beat 8 and 32; 32 CPUs:
24 beat 16. 4 MiB tasks beat 1, 2, 16 and 64 MiB on both (kvikio waits for each
task's copy before its thread reads again). Ranks on one node split its CPUs.
Network file systems (latency-bound) get more reads in flight than CPUs and
larger tasks: that part is a rule of thumb, not yet measured. The staged
engine's sizes (2 MiB tasks, 16 MiB slots) follow InstantTensor's in-memory
path and are not yet measured here either.
"""

from dataclasses import dataclass, replace

from vllm_gds.errors import GdsError

KiB, MiB = 1 << 10, 1 << 20

MIN_THREADS = 2
MAX_THREADS = 24  # 24 beat 16 on a 32-CPU host; 32 did not beat 16 on a 16-CPU one
MAX_NETWORK_THREADS = 32
DEFAULT_TASK = 4 * MiB
NETWORK_TASK = 8 * MiB
# Smallest bounce buffer worth reading through: below it a pread costs more than it copies.
# A pinned bound too small for one such buffer cannot read at all.
MIN_BOUNCE = 64 * KiB
# Under a tight pinned bound, bounce buffers shrink to this before threads are cut.
PREFERRED_MIN_BOUNCE = 1 * MiB
ALIGN = 4 * KiB

# The staged engine (compat path, no GDS). Tasks of 2 MiB as InstantTensor's in-memory path uses
# (no stream wait per task, so small tasks cost nothing extra and stay in the CPU caches); one GPU
# copy per 16 MiB slot (each slot costs the Python thread about 0.1 ms); enough slots that the pool
# has about two tasks per thread queued while the oldest slot is copied.
STAGED_TASK = 2 * MiB
STAGED_SLOT = 16 * MiB
STAGED_SPARE_SLOTS = 2
# Cold reads from a disk: larger requests, more bytes in flight (dd iflag=direct measured the disk
# with 64 MiB blocks; InstantTensor reads it with 8 MiB requests, hundreds in flight).
COLD_TASK = 8 * MiB
COLD_SLOT = 32 * MiB
# Pinning runs at 1-2 GiB/s here (RESULTS.md): a larger ring costs more at the start than it saves.
STAGED_MAX_RING = 256 * MiB
# CPUs of a rank's share left to the staged engine's copy thread, the interpreter and the CUDA
# driver where the share is larger than 8 (InstantTensor likewise reads with CPUs - 4 threads).
# Measured on an H100 host with 16 CPUs from tmpfs, 2026-12-06 (RESULTS.md, "Load"): 12 threads
# x 2 MiB 39.0/45.7/41.5 GB/s, 16 threads 22.4/39.4/41.8, 24 threads 25.5/30.3/28.5.
STAGED_RESERVED_CPUS = 4
# The engine the compat path takes unless one is named: to be confirmed by benchmarks/load_bench.py
# (rows "vllm-gds" and "vllm-gds, kvikio engine") on the GPU machine.
COMPAT_ENGINE = "staged"
ENGINES = ("kvikio", "staged")
# The page pinner beside the staged ring (vllm_gds/io/page_pinner.py): where the files are in memory
# (tmpfs, a warm page cache) one thread registers runs of their page-cache pages and the GPU copies
# straight from them, while the ring's readers take the files from the front. Off unless the user
# says (option pin_page_cache): on an H100 (2026-12-06, RESULTS.md) the registrations stalled the
# ring's copies and the load ran at 12-13 GB/s, against 46.6 without the pinner.
PAGE_PINNER = False
# Registration is serialised per process and costs per call (17 GB/s for one 2 GiB call, 8-10 GB/s
# for 16-64 MiB ones, RESULTS.md): large runs, two registered at a time (one copying, one next).
PIN_RUN = 256 * MiB
PIN_RUNS = 2
MIN_PIN_RUN = 32 * MiB  # below it registration costs more than the ring's copy: no pinner

# Shared or parallel file systems: reads wait on the network, so more can be in flight than CPUs.
NETWORK_FILESYSTEMS = frozenset({"lustre", "nfs", "nfs4", "wekafs", "gpfs", "beegfs", "vast", "cifs",
                                 "smb3", "fuse.s3fs", "fuse.mountpoint-s3", "9p", "ceph", "glusterfs"})
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "hugetlbfs"})


class PinnedBoundError(GdsError):
    """max_pinned_bytes is too small for even one reader with the smallest bounce buffer."""


@dataclass(frozen=True)
class Machine:
    cpus: int  # CPUs this process may run on (sched_getaffinity)
    ranks_on_node: int = 1  # processes of this load sharing those CPUs (local world size)
    fstype: str = ""  # file system of the files (/proc/self/mountinfo), "" if unknown
    mode: str = "compat"  # gds | compat | host (see reader.resolve_mode)
    max_pinned_bytes: int = 1 << 30
    cold: bool = False  # the files are mostly not in memory and will be read from the disk (O_DIRECT)


@dataclass(frozen=True)
class EngineChoice:
    threads: int
    task_size: int  # bytes per read task
    bounce_size: int  # bytes per pinned bounce buffer (kvikio's compat path)
    pinned_bytes: int  # the most pinned host memory the reads can hold (kvikio: threads x bounce_size;
    # staged: slots x slot_size)
    reason: str
    engine: str = "kvikio"
    slot_size: int = 0  # staged: bytes per pinned slot (one GPU copy each)
    slots: int = 0  # staged: pinned slots in the ring
    pin_run: int = 0  # staged + page pinner: bytes of page cache registered per call (0: no pinner)
    pin_runs: int = 0  # staged + page pinner: runs registered at a time

    def to_dict(self) -> dict:
        return {"engine": self.engine, "threads": self.threads, "task_size": self.task_size,
                "bounce_size": self.bounce_size, "slot_size": self.slot_size, "slots": self.slots,
                "pin_run": self.pin_run, "pin_runs": self.pin_runs, "pinned_bytes": self.pinned_bytes,
                "reason": self.reason}


def fs_kind(fstype: str) -> str:
    if fstype in MEMORY_FILESYSTEMS:
        return "memory"
    if fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse"):
        return "network"
    return "local" if fstype else "unknown"


def _align_down(n: int) -> int:
    return n // ALIGN * ALIGN


def pick_engine(machine: Machine, engine: str = "auto") -> str:
    """kvikio under GDS and into host memory; the compat path's engine otherwise (or the one named)."""
    if engine != "auto":
        if engine not in ENGINES:
            raise GdsError(f"engine {engine!r} is not one of auto, {', '.join(ENGINES)}")
        return engine
    return COMPAT_ENGINE if machine.mode == "compat" else "kvikio"


def _threads(machine: Machine, threads: int, why: list) -> int:
    share = max(1, machine.cpus // machine.ranks_on_node)
    where = f"{machine.cpus} CPUs / {machine.ranks_on_node} rank(s) on the node"
    if threads:
        why.append(f"{threads} threads (set)")
    elif fs_kind(machine.fstype) == "network":
        threads = max(MIN_THREADS, min(MAX_NETWORK_THREADS, 2 * share))
        why.append(f"{threads} threads: 2 per CPU of this rank's share ({where}), {machine.fstype} waits on "
                   f"the network (2..{MAX_NETWORK_THREADS})")
    else:
        threads = max(MIN_THREADS, min(MAX_THREADS, share))
        why.append(f"{threads} threads: one per CPU of this rank's share ({where}; {MIN_THREADS}..{MAX_THREADS})")
    return threads


def _refuse_tiny_bound(bound: int) -> None:
    if bound < MIN_BOUNCE:
        raise PinnedBoundError(
            f"max_pinned_bytes {bound} is smaller than one bounce buffer of {MIN_BOUNCE} bytes: nothing "
            f"could be read; raise max_pinned_bytes to at least {MIN_BOUNCE} (the default is 1 GiB)"
        )


def choose(machine: Machine, threads: int = 0, task_size: int = 0, engine: str = "auto",
           slot_size: int = 0, pin_page_cache: bool | None = None, pin_run: int = 0) -> EngineChoice:
    """Engine, threads, task and pinned sizes for one rank; ``threads``/``task_size``/``slot_size``/
    ``pin_run`` > 0 are the user's and kept (only the pinned bound can lower them);
    ``pin_page_cache`` None: PAGE_PINNER decides. Raises PinnedBoundError when ``max_pinned_bytes``
    cannot hold one buffer of MIN_BOUNCE bytes."""
    if machine.cpus < 1 or machine.ranks_on_node < 1:
        raise ValueError(f"a machine has at least one CPU and one rank, not {machine}")
    engine = pick_engine(machine, engine)
    if engine == "staged":
        choice = _choose_staged(machine, threads, task_size, slot_size)
        return _with_pinner(machine, choice, pin_page_cache, pin_run)
    why = []
    threads = _threads(machine, threads, why)
    kind = fs_kind(machine.fstype)
    if task_size:
        why.append(f"{task_size >> 10} KiB tasks (set)")
    elif kind == "network":
        task_size = NETWORK_TASK
        why.append(f"{task_size >> 20} MiB tasks ({machine.fstype}: fewer, larger requests)")
    else:
        task_size = DEFAULT_TASK
        why.append(f"{task_size >> 20} MiB tasks (fastest measured from memory, {machine.fstype or 'fs unknown'})")

    bound = machine.max_pinned_bytes
    _refuse_tiny_bound(bound)
    # One bounce buffer per thread, of at most one task; kvikio splits a task over its buffer.
    bounce = task_size
    host = machine.mode == "host"  # reads into host memory pin nothing; kvikio's settings still fit
    if threads * bounce > bound:
        # buffers shrink to this before threads go (host reads use no buffer: keep the threads)
        floor = min(task_size, ALIGN if host else PREFERRED_MIN_BOUNCE)
        fit = _align_down(bound // threads)
        if fit >= floor:
            bounce = fit
            why.append(f"bounce buffers cut to {bounce >> 10} KiB to keep {threads} x bounce within "
                       f"max_pinned_bytes {bound}")
        else:
            cut = max(1, min(threads, bound // floor))
            why.append(f"threads cut from {threads} to {cut} and bounce buffers to at most "
                       f"{bound // cut >> 10} KiB to stay within max_pinned_bytes {bound}")
            threads = cut
            bounce = min(task_size, _align_down(bound // threads))
    pinned = threads * bounce
    assert 0 < pinned <= bound, (threads, bounce, bound)
    if host:
        why.append("host destinations: nothing pinned")
        return EngineChoice(threads, task_size, bounce, 0, "; ".join(why))
    why.append(f"pinned {threads} x {bounce >> 10} KiB = {pinned >> 20} MiB of {bound >> 20} MiB allowed"
               + (" (only where a file falls back to compat mode)" if machine.mode == "gds" else ""))
    return EngineChoice(threads, task_size, bounce, pinned, "; ".join(why))


def _choose_staged(machine: Machine, threads: int, task_size: int, slot_size: int) -> EngineChoice:
    """The staged engine: kvikio's pool reads tasks into a ring of pinned slots, one GPU copy per slot.

    Pinned memory is the ring, slots x slot_size, and nothing else: the pool reads into it (host
    reads through kvikio pin nothing). Under a tight bound slots shrink to one task, then go, down
    to one slot; threads stay (they pin nothing)."""
    why = ["staged engine (kvikio's pool reads into pinned slots, one GPU copy per slot)"]
    network = fs_kind(machine.fstype) == "network"
    share = machine.cpus // machine.ranks_on_node
    if not threads and not network and not machine.cold and share > 2 * STAGED_RESERVED_CPUS:
        threads = max(MIN_THREADS, min(MAX_THREADS, share - STAGED_RESERVED_CPUS))
        why.append(f"{threads} threads: this rank's share of {share} CPUs less {STAGED_RESERVED_CPUS} "
                   "for the copy thread and the driver")
    else:
        threads = _threads(machine, threads, why)
    if task_size:
        why.append(f"{task_size >> 10} KiB tasks (set)")
    elif machine.cold:
        task_size = COLD_TASK
        why.append(f"{task_size >> 20} MiB tasks (cold files: read from the disk with O_DIRECT)")
    else:
        task_size = NETWORK_TASK if network else STAGED_TASK
        why.append(f"{task_size >> 20} MiB tasks" + (f" ({machine.fstype}: fewer, larger requests)" if network else ""))
    if slot_size:
        why.append(f"{slot_size >> 10} KiB slots (set)")
    else:
        slot_size = max(COLD_SLOT if machine.cold else STAGED_SLOT, task_size)
    slot_size = max(ALIGN, _align_down(slot_size))
    # About two tasks per thread in the pool's queue, plus the slot being copied and one spare.
    slots = -(-2 * threads * min(task_size, slot_size) // slot_size) + STAGED_SPARE_SLOTS
    slots = max(1, min(slots, STAGED_MAX_RING // slot_size))
    bound = machine.max_pinned_bytes
    _refuse_tiny_bound(bound)
    if slots * slot_size > bound:
        fit = _align_down(bound // slots)
        if fit >= min(task_size, slot_size):
            slot_size = fit
            why.append(f"slots cut to {slot_size >> 10} KiB to keep {slots} slots within max_pinned_bytes {bound}")
        else:
            slot_size = max(MIN_BOUNCE, min(task_size, slot_size, _align_down(bound // 2)))
            cut = max(1, min(slots, bound // slot_size))
            why.append(f"slots cut from {slots} to {cut} of {slot_size >> 10} KiB to stay within "
                       f"max_pinned_bytes {bound}")
            slots = cut
    task_size = min(task_size, slot_size)
    pinned = slots * slot_size
    assert 0 < pinned <= bound, (slots, slot_size, bound)
    if machine.mode == "host":
        why.append(f"{slots} slots x {slot_size >> 10} KiB of plain memory (host destinations: nothing pinned)")
        pinned = 0
    else:
        why.append(f"pinned {slots} slots x {slot_size >> 10} KiB = {pinned >> 20} MiB of {bound >> 20} MiB allowed")
    return EngineChoice(threads, task_size, 0, pinned, "; ".join(why), engine="staged", slot_size=slot_size,
                        slots=slots)


def _with_pinner(machine: Machine, choice: EngineChoice, wanted: bool | None, pin_run: int) -> EngineChoice:
    """The staged choice plus the page pinner where it may run: warm files (not cold, not under GDS),
    asked for or PAGE_PINNER; its registered runs within what max_pinned_bytes leaves after the ring
    (runs shrink to MIN_PIN_RUN, then one run at a time, then no pinner). Host destinations
    (tests) run it only when asked, and register nothing."""
    on = PAGE_PINNER if wanted is None else wanted
    if not on:
        return choice
    why = "page pinner off: "
    if machine.mode == "gds":
        return replace(choice, reason=choice.reason + "; " + why + "GDS reads into the GPU without a host copy")
    if machine.cold:
        return replace(choice, reason=choice.reason + "; " + why + "the files are not in memory")
    if machine.mode == "host" and wanted is None:
        return choice
    slot = choice.slot_size
    run = _align_down(pin_run) if pin_run else PIN_RUN
    run = max(slot, run // slot * slot)
    runs = PIN_RUNS
    left = machine.max_pinned_bytes - choice.pinned_bytes
    host = machine.mode == "host"
    if not host and runs * run > left:
        fit = left // runs // slot * slot
        if fit >= max(MIN_PIN_RUN, slot):
            run = fit
        else:
            runs = 1
            run = min(run, left // slot * slot)
        if run < max(MIN_PIN_RUN, slot):
            return replace(choice, reason=choice.reason + "; " + why + f"max_pinned_bytes {machine.max_pinned_bytes} "
                           f"leaves {left >> 20} MiB after the ring, under the {MIN_PIN_RUN >> 20} MiB a "
                           "registered run needs")
    pinned = 0 if host else runs * run
    assert choice.pinned_bytes + pinned <= machine.max_pinned_bytes or host
    size = f"{run >> 20} MiB" if run >= MiB else f"{run >> 10} KiB"
    what = (f"page pinner: runs of {size} of page cache registered in place, {runs} at a time"
            + (" (host destinations: copied by the CPU, nothing registered)" if host else
               f" = {pinned >> 20} MiB, with the ring {(choice.pinned_bytes + pinned) >> 20} MiB of "
               f"{machine.max_pinned_bytes >> 20} MiB allowed"))
    return replace(choice, pin_run=run, pin_runs=runs, pinned_bytes=choice.pinned_bytes + pinned,
                   reason=choice.reason + "; " + what)

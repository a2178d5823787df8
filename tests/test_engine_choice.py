"""The reader's engine, threads, task, bounce-buffer and ring sizes, chosen from described machines."""

import pytest

from vllm_gds.errors import GdsError
from vllm_gds.io.engine_choice import (COLD_SLOT, COLD_TASK, COMPAT_ENGINE, DEFAULT_TASK, MAX_NETWORK_THREADS, MAX_THREADS, MIN_BOUNCE,
                                       MIN_THREADS, NETWORK_TASK, STAGED_MAX_RING, STAGED_SLOT, STAGED_TASK, Machine,
                                       PinnedBoundError, choose)

MiB = 1 << 20


def kvikio(machine, **kw):
    return choose(machine, engine="kvikio", **kw)


@pytest.mark.parametrize("cpus, ranks, threads", [
    (16, 1, 16),  # the one-GPU H200 host: 16 threads measured best
    (32, 1, 24),  # 24 beat 16 there; capped
    (32, 2, 16),
    (64, 4, 16),
    (128, 8, 16),
    (2, 1, MIN_THREADS),
    (16, 8, MIN_THREADS),
    (1, 1, MIN_THREADS),
])
def test_threads_are_the_ranks_share_of_the_cpus(cpus, ranks, threads):
    c = kvikio(Machine(cpus=cpus, ranks_on_node=ranks, fstype="tmpfs"))
    assert c.threads == threads and c.engine == "kvikio"
    assert c.task_size == DEFAULT_TASK == c.bounce_size
    assert c.pinned_bytes == c.threads * c.bounce_size <= 1 << 30
    assert f"{cpus} CPUs / {ranks} rank(s)" in c.reason


def test_network_file_systems_get_more_reads_in_flight_and_larger_tasks():
    local = kvikio(Machine(cpus=16, fstype="ext4"))
    lustre = kvikio(Machine(cpus=16, fstype="lustre"))
    assert lustre.threads == 2 * local.threads == MAX_NETWORK_THREADS
    assert lustre.task_size == NETWORK_TASK > local.task_size
    assert "lustre" in lustre.reason
    assert choose(Machine(cpus=128, ranks_on_node=1, fstype="nfs")).threads == MAX_NETWORK_THREADS


def test_settings_given_are_kept():
    c = kvikio(Machine(cpus=16), threads=5, task_size=1 * MiB)
    assert (c.threads, c.task_size, c.bounce_size) == (5, MiB, MiB)
    assert "(set)" in c.reason


@pytest.mark.parametrize("bound", [MIN_BOUNCE, 100 << 10, MiB, 5 * MiB, 16 * MiB, 63 * MiB, 64 * MiB, 1 << 30])
@pytest.mark.parametrize("cpus", [2, 16, 32])
def test_pinned_bytes_stay_within_the_bound(bound, cpus):
    c = kvikio(Machine(cpus=cpus, max_pinned_bytes=bound))
    assert 0 < c.pinned_bytes == c.threads * c.bounce_size <= bound
    assert c.bounce_size <= c.task_size and c.bounce_size % 4096 == 0 and c.bounce_size >= MIN_BOUNCE
    assert c.threads >= 1
    unbounded = kvikio(Machine(cpus=cpus))
    if unbounded.pinned_bytes <= bound:
        assert (c.threads, c.task_size, c.bounce_size) == (unbounded.threads, unbounded.task_size,
                                                         unbounded.bounce_size)  # not binding: no change
    else:
        assert "max_pinned_bytes" in c.reason


def test_a_tight_bound_shrinks_buffers_before_threads():
    c = kvikio(Machine(cpus=16, max_pinned_bytes=16 * MiB))  # 16 x 1 MiB fits
    assert (c.threads, c.bounce_size) == (16, MiB)
    c = kvikio(Machine(cpus=16, max_pinned_bytes=4 * MiB))  # 1 MiB buffers kept, threads cut
    assert (c.threads, c.bounce_size) == (4, MiB)
    assert "threads cut from 16 to 4" in c.reason


def test_a_bound_too_small_to_read_is_refused():
    for engine in ("kvikio", "staged"):
        with pytest.raises(PinnedBoundError, match="max_pinned_bytes 4096 .* raise max_pinned_bytes"):
            choose(Machine(cpus=16, max_pinned_bytes=4096), engine=engine)
    assert issubclass(PinnedBoundError, GdsError)


def test_gds_reads_are_bounded_too_and_host_reads_keep_their_threads():
    gds = choose(Machine(cpus=16, mode="gds", max_pinned_bytes=2 * MiB))
    assert 0 < gds.pinned_bytes <= 2 * MiB and "falls back to compat mode" in gds.reason
    host = choose(Machine(cpus=16, mode="host", max_pinned_bytes=2 * MiB))
    assert host.threads == 16 and host.pinned_bytes == 0 and "nothing pinned" in host.reason
    assert host.threads * host.bounce_size <= 2 * MiB


def test_the_engine_follows_the_path():
    assert choose(Machine(cpus=16, mode="gds")).engine == "kvikio"  # cuFile DMA, no host copy
    assert choose(Machine(cpus=16, mode="host")).engine == "kvikio"  # straight into host memory
    assert choose(Machine(cpus=16, mode="compat")).engine == COMPAT_ENGINE == "staged"
    assert choose(Machine(cpus=16, mode="compat"), engine="kvikio").engine == "kvikio"
    with pytest.raises(GdsError, match="engine 'magic'"):
        choose(Machine(cpus=16), engine="magic")


@pytest.mark.parametrize("cpus, ranks, fstype", [(16, 1, "tmpfs"), (32, 1, "ext4"), (64, 4, "xfs"), (2, 1, ""),
                                                 (16, 1, "lustre"), (128, 1, "nfs")])
def test_staged_ring_holds_about_two_tasks_per_thread(cpus, ranks, fstype):
    c = choose(Machine(cpus=cpus, ranks_on_node=ranks, fstype=fstype))
    network = fstype in ("lustre", "nfs")
    per_cpu = kvikio(Machine(cpus=cpus, ranks_on_node=ranks, fstype=fstype)).threads
    share = cpus // ranks
    # local file systems: CPUs - 4 of a share over 8 (the copy thread and the driver keep 4)
    assert c.engine == "staged" and c.threads == (per_cpu if network or share <= 8 else min(24, share - 4))
    assert c.task_size == (NETWORK_TASK if network else STAGED_TASK)
    assert c.slot_size == STAGED_SLOT and c.bounce_size == 0
    queued = c.slots * c.slot_size // c.task_size  # tasks the ring holds at once
    assert queued >= min(2 * c.threads, STAGED_MAX_RING // c.task_size) and c.slots >= 3
    assert c.pinned_bytes == c.slots * c.slot_size <= STAGED_MAX_RING
    assert "staged engine" in c.reason and f"{c.slots} slots" in c.reason
    if (cpus, fstype) == (16, "tmpfs"):  # the one-GPU H100/H200 host: 12 threads x 2 MiB, 5 slots x 16 MiB
        assert (c.threads, c.task_size, c.slots, c.pinned_bytes) == (12, 2 * MiB, 5, 80 * MiB)


@pytest.mark.parametrize("bound", [MIN_BOUNCE, 100 << 10, MiB, 5 * MiB, 16 * MiB, 63 * MiB, 96 * MiB, 1 << 30])
@pytest.mark.parametrize("cpus", [2, 16, 32])
@pytest.mark.parametrize("task, slot", [(0, 0), (8 * MiB, 0), (64 << 10, 256 << 10)])
def test_staged_ring_stays_within_the_bound(bound, cpus, task, slot):
    c = choose(Machine(cpus=cpus, max_pinned_bytes=bound), task_size=task, slot_size=slot)
    assert c.engine == "staged"
    assert 0 < c.pinned_bytes == c.slots * c.slot_size <= bound
    assert c.slots >= 1 and c.slot_size % 4096 == 0 and c.slot_size >= MIN_BOUNCE
    assert 0 < c.task_size <= c.slot_size
    unbounded = choose(Machine(cpus=cpus), task_size=task, slot_size=slot)
    assert c.threads == unbounded.threads  # threads pin nothing in the staged engine
    if unbounded.pinned_bytes <= bound:
        assert (c.slots, c.slot_size, c.task_size) == (unbounded.slots, unbounded.slot_size, unbounded.task_size)
    else:
        assert "max_pinned_bytes" in c.reason


def test_staged_host_reads_pin_nothing():
    c = choose(Machine(cpus=16, mode="host"), engine="staged")
    assert c.pinned_bytes == 0 and c.slots >= 1 and "nothing pinned" in c.reason


def test_cold_files_get_larger_reads_and_more_bytes_in_flight():
    warm = choose(Machine(cpus=16, fstype="ext4"))
    cold = choose(Machine(cpus=16, fstype="ext4", cold=True))
    assert cold.task_size == COLD_TASK > warm.task_size and cold.slot_size == COLD_SLOT
    assert cold.pinned_bytes <= STAGED_MAX_RING and cold.slots * cold.slot_size >= 8 * COLD_TASK
    assert "O_DIRECT" in cold.reason

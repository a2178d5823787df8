"""The page pinner beside the staged ring: its bounds from described machines, how the plan is split
between the ring (front) and the pinner (back), and what it does with real files on the CPU.

On the CPU (torch without CUDA, the driver stub) nothing can be registered: ``torch.cuda.cudart()``
does not exist in a CPU build, and the stub answers every driver call, cuMemHostRegister included,
with CUDA_ERROR_NOT_INITIALIZED. So the pinner's runs are copied from the files' mappings by the
CPU here; the claims, the split, the checksums, the report and the failures are the same code.
"""

import os
import random

import pytest
import torch

from vllm_gds.errors import ChecksumError, ShardReadError
from vllm_gds.io import engine_choice
from vllm_gds.io.engine_choice import MIN_PIN_RUN, PIN_RUN, PIN_RUNS, Machine, choose
from vllm_gds.io.page_pinner import Claims, PagePinner, ResidentFiles, merged_pieces
from vllm_gds.io.pipeline import Checksums
from vllm_gds.io.plan import plan_spans
from vllm_gds.io.reader import FileRead, ReadOptions, ReadTarget, read_files

from page_cache import drop_from_page_cache

MiB = 1 << 20
CPU = torch.device("cpu")
H100_HOST = Machine(cpus=16, fstype="tmpfs")  # the one-GPU kind lent: 16 CPUs, files on /dev/shm


def test_off_unless_asked_or_flipped_and_the_flip_is_one_line(monkeypatch):
    assert choose(H100_HOST).pin_runs == 0  # PAGE_PINNER is False until the GPU numbers are in
    asked = choose(H100_HOST, pin_page_cache=True)
    ring = choose(H100_HOST, pin_page_cache=False)
    assert (asked.pin_run, asked.pin_runs) == (PIN_RUN, PIN_RUNS)
    assert asked.pinned_bytes == ring.pinned_bytes + PIN_RUNS * PIN_RUN <= H100_HOST.max_pinned_bytes
    assert "page pinner: runs of 256 MiB" in asked.reason and "2 at a time" in asked.reason
    monkeypatch.setattr(engine_choice, "PAGE_PINNER", True)
    assert choose(H100_HOST) == asked
    assert choose(H100_HOST, pin_page_cache=False).pin_runs == 0


@pytest.mark.parametrize("machine, why", [
    (Machine(cpus=16, fstype="ext4", cold=True), "not in memory"),
    (Machine(cpus=16, mode="gds"), "GDS"),
])
def test_no_pinner_for_cold_files_or_under_gds(machine, why):
    c = choose(machine, engine="staged", pin_page_cache=True)
    assert c.pin_runs == 0 and why in c.reason


def test_host_destinations_run_it_only_when_asked_and_register_nothing():
    host = Machine(cpus=2, mode="host")
    assert choose(host, engine="staged").pin_runs == 0
    c = choose(host, engine="staged", pin_page_cache=True, pin_run=256 << 10, slot_size=64 << 10)
    assert (c.pin_run, c.pin_runs, c.pinned_bytes) == (256 << 10, PIN_RUNS, 0)


@pytest.mark.parametrize("bound", [96 * MiB, 120 * MiB, 200 * MiB, 300 * MiB, 600 * MiB, 1 << 30, 4 << 30])
@pytest.mark.parametrize("run", [0, 128 * MiB, 1 << 30])
@pytest.mark.parametrize("cpus", [16, 32])
def test_registered_runs_and_the_ring_stay_within_max_pinned_bytes(bound, run, cpus):
    machine = Machine(cpus=cpus, fstype="tmpfs", max_pinned_bytes=bound)
    ring = choose(machine, pin_page_cache=False)
    c = choose(machine, pin_page_cache=True, pin_run=run)
    assert (c.threads, c.slots, c.slot_size) == (ring.threads, ring.slots, ring.slot_size)  # the ring as alone
    assert c.pinned_bytes == ring.pinned_bytes + c.pin_runs * c.pin_run <= bound
    wanted = run or PIN_RUN
    if c.pin_runs:
        assert c.pin_run % c.slot_size == 0 and MIN_PIN_RUN <= c.pin_run <= wanted and c.pin_runs <= PIN_RUNS
        if ring.pinned_bytes + PIN_RUNS * wanted <= bound:
            assert (c.pin_run, c.pin_runs) == (wanted, PIN_RUNS)
        assert f"of {bound >> 20} MiB allowed" in c.reason
    else:
        assert bound - ring.pinned_bytes < MIN_PIN_RUN and "page pinner off" in c.reason


def _spans(sizes, span_bytes=4096):
    files = [[(f, 0, n)] for f, n in enumerate(sizes)]
    return plan_spans(files, span_bytes)


def test_claims_meet_in_the_middle_and_hand_out_every_span_once():
    spans = _spans([40_000, 9000, 70_000])  # 10 + 3 + 18 spans
    claims = Claims(spans, [True, False, True])
    taken, runs = [], []
    rng = random.Random(1)
    while True:
        if rng.random() < 0.5:
            i = claims.next_front()
            if i is None:
                break
            taken.append(i)
        else:
            run = claims.run_from_back(3 * 4096)
            if run:
                runs.append(run)
                taken.extend(run)
    assert sorted(taken) == list(range(len(spans)))
    for run in runs:
        assert 1 <= len(run) <= 3 and run == list(range(run[0], run[-1] + 1))
        assert len({spans[j].file for j in run}) == 1 and spans[run[0]].file != 1  # resident files only
    assert claims.run_from_back(1 << 30) == [] and claims.next_front() is None


def test_the_back_stops_at_a_file_not_in_memory():
    spans = _spans([8192, 8192])
    claims = Claims(spans, [True, False])
    assert claims.run_from_back(1 << 30) == []  # the last file is not resident: the ring reads it all
    assert [claims.next_front() for _ in range(4)] == [0, 1, 2, 3]


def test_merged_pieces_make_a_tensor_across_spans_one_copy():
    files = [[(0, 100, 20_000), (1, 20_100, 50), (2, 30_000, 4000)]]
    spans = plan_spans(files, 4096)
    merged = merged_pieces(spans)
    assert merged == [(0, 0, 100, 20_000), (1, 0, 20_100, 50), (2, 0, 30_000, 4000)]


def _checkpoint(tmp_path, name, tensors, seed):
    """A real safetensors file of the project's writer (4 KiB-aligned, checksums in the manifest)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    data = {k: torch.randn(shape, generator=g).to(torch.bfloat16) for k, shape in tensors.items()}
    path = tmp_path / name
    save_file(data, str(path))
    return path, data


def _reads(path, data, verify=True):
    """FileReads of a safetensors file's tensors into fresh host tensors, with checksums."""
    import json
    import struct

    from vllm_gds.checksum import checksum_hex

    with open(path, "rb") as f:  # the header only: the data's pages stay as they are
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    targets, dests = [], {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        dest = torch.empty(data[name].shape, dtype=torch.bfloat16)
        dests[name] = dest
        targets.append(ReadTarget(8 + n + start, dest, name=name,
                                  checksum=checksum_hex(data[name]) if verify else None))
    return FileRead(path, tuple(targets), os.path.getsize(path)), dests


def test_ring_and_pinner_split_a_real_checkpoint_every_byte_once(tmp_path):
    """Two safetensors files: the ring reads from the front, the pinner copies from the back out of
    the page cache; every tensor lands (checksums verified), the bytes each moved add up."""
    reads, all_dests, all_data = [], {}, {}
    for f in range(2):
        path, data = _checkpoint(tmp_path, f"model-{f}.safetensors",
                                 {f"layer{f}.{i}.weight": (256, 384 + 64 * i) for i in range(6)}, seed=f)
        read, dests = _reads(path, data)
        reads.append(read)
        all_dests.update(dests)
        all_data.update(data)
    options = ReadOptions(engine="staged", slot_size=64 << 10, num_threads=2, pin_page_cache=True,
                          pin_run_size=256 << 10)
    stats = read_files(reads, options, CPU)
    for name, want in all_data.items():
        assert torch.equal(all_dests[name], want), name
    d = stats.detail
    assert d["verified"] == len(all_data)
    assert d["ring_bytes"] > 0 and d["pin_bytes"] > 0 and d["ring_bytes"] + d["pin_bytes"] == stats.nbytes
    assert d["ring_spans"] + d["pin_spans_taken"] == d["spans"]
    assert d["pin_runs_done"] >= 1 and d["pin_gb_per_s"] > 0 and d["pin_register_seconds"] == 0.0
    assert d["resident_shares"] == [1.0, 1.0] and "page pinner: runs of 256 KiB" in d["choice"]
    from vllm_gds.loader.report import LoadReport

    fields = LoadReport.engine_fields(d)
    assert (fields["ring_bytes"], fields["page_pinned_bytes"]) == (d["ring_bytes"], d["pin_bytes"])
    report = LoadReport("m", "huggingface", 0, 0, 0, stats.mode, 2, len(all_data), stats.nbytes, stats.seconds,
                        True, 0.0, stats.seconds, **fields)
    assert f"page pinner: {d['pin_bytes'] / 1e9:.3f} GB copied in place" in report.log_line()
    assert f"{d['ring_bytes'] / 1e9:.3f} GB through the ring" in report.log_line()


def test_a_damaged_tensor_copied_by_the_pinner_fails_the_load_naming_it(tmp_path):
    path, data = _checkpoint(tmp_path, "damaged.safetensors", {f"w{i}": (128, 512) for i in range(8)}, seed=3)
    read, _ = _reads(path, data)
    last = max(read.targets, key=lambda t: t.file_offset)  # at the back: the pinner's first run
    with open(path, "r+b") as f:
        f.seek(last.file_offset + 10)
        f.write(b"\xff\xff")
    options = ReadOptions(engine="staged", slot_size=64 << 10, num_threads=2, pin_page_cache=True,
                          pin_run_size=128 << 10)
    with pytest.raises(ChecksumError, match=rf"tensor {last.name} .*damaged\.safetensors"):
        read_files([read], options, CPU)


def test_a_file_cut_short_fails_the_pinner_naming_it(tmp_path):
    """A file that shrank after its size was checked: the pinner refuses to touch the mapping past the
    end (that would be SIGBUS) and the failure names the file."""
    path = tmp_path / "cut.bin"
    path.write_bytes(random.Random(4).randbytes(1 << 20))
    dest = torch.zeros(1 << 20, dtype=torch.uint8)
    spans = plan_spans([[(0, 0, 1 << 20)]], 64 << 10)
    fd = os.open(path, os.O_RDONLY)
    resident = ResidentFiles([fd], [1 << 20])
    try:
        assert resident.resident == [True]
        os.truncate(path, 300 << 10)
        claims = Claims(spans, resident.resident)
        checks = Checksums([(0, ReadTarget(0, dest))], [path], CPU)
        pinner = PagePinner(spans, claims, resident.sources, [fd], [dest], [path], CPU, 256 << 10, 2, checks)
        pinner.start()
        with pytest.raises(ShardReadError, match=r"cut\.bin is now 307200 bytes"):
            pinner.join()
        assert pinner.nbytes == 0
    finally:
        resident.close()
        os.close(fd)


def test_a_file_not_in_memory_is_left_to_the_ring(tmp_path):
    """Only files resident in memory (sampled mincore) are pinned: a file whose pages were dropped is
    read by the ring, however the plan orders it."""
    from vllm_gds.io import gds_env

    warm, data_warm = _checkpoint(tmp_path, "warm.safetensors", {f"a{i}": (512, 512) for i in range(6)}, seed=5)
    cold, data_cold = _checkpoint(tmp_path, "cold.safetensors", {"b0": (512, 1024)}, seed=6)  # over readahead
    if gds_env.mount_of(cold).fstype in ("tmpfs", "ramfs") or not drop_from_page_cache(cold):
        pytest.skip(f"{tmp_path} is not on a disk whose pages can be dropped")
    r_warm, d_warm = _reads(warm, data_warm)
    r_cold, d_cold = _reads(cold, data_cold)
    stats = read_files([r_warm, r_cold], ReadOptions(engine="staged", slot_size=64 << 10, num_threads=2,
                                                     pin_page_cache=True, pin_run_size=128 << 10), CPU)
    assert all(torch.equal(d_warm[k], v) for k, v in data_warm.items())
    assert all(torch.equal(d_cold[k], v) for k, v in data_cold.items())
    d = stats.detail
    assert d["resident_shares"][0] == 1.0 and d["resident_shares"][1] < 0.9
    cold_bytes = sum(v.numel() * 2 for v in data_cold.values())
    assert 0 < d["pin_bytes"] <= stats.nbytes - cold_bytes and d["ring_bytes"] >= cold_bytes


def test_the_option_is_true_false_or_automatic():
    from vllm_gds.errors import GdsError
    from vllm_gds.loader.options import LoaderOptions

    assert LoaderOptions.from_extra_config({"pin_page_cache": True}).read.pin_page_cache is True
    assert LoaderOptions.from_extra_config({}).read.pin_page_cache is None
    with pytest.raises(GdsError, match="pin_page_cache must be true, false or null"):
        LoaderOptions.from_extra_config({"pin_page_cache": "yes"})

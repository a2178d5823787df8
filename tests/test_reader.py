"""The read engine on the CPU: every byte lands where it should, every failure names its file.

kvikio reads into host memory through the CUDA driver stub (make test puts it
on LD_LIBRARY_PATH); the staged engine runs kvikio's pool into its ring of slots
(plain memory here) and copies slot by slot; the pipeline engine runs its
planner, ring and page-cache paths with host destinations.
"""

import os
import random
from pathlib import Path

import pytest
import torch

from vllm_gds.errors import ChecksumError, GdsError, ShardReadError
from vllm_gds.io import gds_env
from vllm_gds.io.pipeline import _read_span
from vllm_gds.io.plan import Span, plan_spans
from vllm_gds.io.reader import FileRead, ReadOptions, ReadTarget, gds_problems, read_files, resolve_mode
from vllm_gds.checksum import checksum_hex
from vllm_gds.shards.writer import write_rank

from page_cache import drop_from_page_cache

CPU = torch.device("cpu")
# Every way a byte can travel: kvikio (the default into host memory); staged (the compat path's
# default on a GPU), with slots small enough that a file needs many, alone or beside the page pinner;
# the pipeline reading with preadv, or pinning resident files in place.
ENGINES = {
    "kvikio": dict(),
    "staged": dict(engine="staged", slot_size=64 << 10),
    "pipeline": dict(engine="pipeline"),
    "pipeline-pinned": dict(engine="pipeline", pin_page_cache=True),
    # the staged engine with the page pinner taking resident files from the back in 256 KiB runs
    "staged-pinned": dict(engine="staged", slot_size=64 << 10, pin_page_cache=True, pin_run_size=256 << 10),
}


def _random_file(path: Path, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("task_size", [4096, 12288, 1 << 20])
def test_unaligned_ranges_are_byte_exact(tmp_path, engine, task_size):
    """Odd offsets and sizes, adjacent, overlapping, empty and far-apart ranges, several files."""
    rng = random.Random(task_size)
    reads, expected = [], []
    for f in range(3):
        size = rng.choice([1, 4095, 4097, 70_001, 3 << 20])
        data = _random_file(tmp_path / f"f{f}.bin", size, seed=f)
        targets = []
        for _ in range(12):
            off = rng.randrange(size)
            n = rng.choice([0, 1, 3, 4096, 5000, size - off])
            n = min(n, size - off)
            dest = torch.full((n,), 0xAB, dtype=torch.uint8)
            targets.append(ReadTarget(off, dest))
            expected.append((dest, data[off:off + n]))
        targets.append(ReadTarget(0, torch.empty(size, dtype=torch.uint8)))  # the whole file too
        expected.append((targets[-1].dest, data))
        reads.append(FileRead(tmp_path / f"f{f}.bin", tuple(targets), size))
    stats = read_files(reads, ReadOptions(task_size=task_size, num_threads=3, **ENGINES[engine]), CPU)
    assert stats.mode == "host" and stats.files == 3
    assert stats.detail["engine"] == {"kvikio": "kvikio"}.get(engine, engine.split("-")[0])
    for dest, want in expected:
        assert bytes(dest.numpy()) == want
    assert stats.nbytes == sum(len(w) for _, w in expected)


@pytest.mark.parametrize("engine", ENGINES)
def test_prepared_shards_with_checksums(tmp_path, engine):
    """The project's aligned shard files, many tensor sizes and dtypes, verified where they land."""
    gen = torch.Generator().manual_seed(0)
    tensors = []
    for i, shape in enumerate([(1,), (3, 5), (4096,), (1000, 33), (7,), (256, 1024), (2, 2, 2)]):
        dtype = [torch.float32, torch.bfloat16, torch.int8, torch.float16][i % 4]
        t = torch.randint(-100, 100, shape, generator=gen).to(dtype)
        tensors.append((f"layer.{i}.weight", t))
    shards = write_rank(tmp_path, tensors, tp_rank=0, pp_rank=0, tensor_parallel_size=1,
                        max_file_bytes=300_000)
    assert len(shards.files) > 1
    reads, out = [], {}
    for f in shards.files:
        targets = []
        for e in f.tensors:
            ref = dict(tensors)[e.name]
            out[e.name] = torch.empty_like(ref)
            targets.append(ReadTarget(e.offset, out[e.name], name=e.name, checksum=e.checksum))
        reads.append(FileRead(tmp_path / f.path, tuple(targets), f.size))
    stats = read_files(reads, ReadOptions(task_size=64 << 10, num_threads=4, **ENGINES[engine]), CPU)
    assert stats.detail["verified"] == len(tensors)
    for name, ref in tensors:
        assert torch.equal(out[name].view(torch.uint8), ref.view(torch.uint8)), name


def test_plan_covers_every_byte_once_in_aligned_spans():
    rng = random.Random(1)
    files = []
    for f in range(4):
        wanted = []
        for t in range(30):
            wanted.append((f * 100 + t, rng.randrange(0, 1 << 24), rng.choice([0, 1, 4095, 4096, 1 << 16, 5 << 20])))
        files.append(wanted)
    for span_bytes in (4096, 1 << 20, 16 << 20):
        spans = plan_spans(files, span_bytes)
        covered: dict[int, list[tuple[int, int]]] = {}
        for s in spans:
            assert s.offset % 4096 == 0 and s.length % 4096 == 0 and 0 < s.length <= span_bytes
            assert s.needed <= s.length
            for p in s.pieces:
                assert 0 <= p.buf_offset and p.buf_offset + p.nbytes <= s.needed
                covered.setdefault(p.target, []).append((p.dest_offset, p.nbytes))
        for wanted in files:
            for t, off, n in wanted:
                if n == 0:
                    assert t not in covered
                    continue
                parts = sorted(covered[t])
                pos = 0
                for dest_offset, nbytes in parts:
                    assert dest_offset == pos
                    pos += nbytes
                assert pos == n


def test_truncated_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "model.safetensors"
    _random_file(path, 10_000, seed=3)
    dest = torch.zeros(8192, dtype=torch.uint8)
    with pytest.raises(ShardReadError, match=str(path)):
        read_files([FileRead(path, (ReadTarget(4096, dest),), 10_000)], ReadOptions(engine="pipeline"), CPU)
    assert int(dest.sum()) == 0
    with pytest.raises(ShardReadError, match="the manifest says 20000"):
        read_files([FileRead(path, (ReadTarget(0, torch.empty(10, dtype=torch.uint8)),), 20_000)],
                   ReadOptions(), CPU)
    with pytest.raises(ShardReadError, match="missing.safetensors"):
        read_files([FileRead(tmp_path / "missing.safetensors", (), None)], ReadOptions(), CPU)


def test_short_read_names_the_file(tmp_path):
    """A file that shrinks under the reader (after its size was checked) surfaces as ShardReadError."""
    path = tmp_path / "shrunk.bin"
    _random_file(path, 5000, seed=4)
    span = Span(file=0, offset=0, length=8192, needed=8000, pieces=())
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ShardReadError, match=r"short read from .*shrunk\.bin.*ends at byte 5000"):
            _read_span(fd, memoryview(bytearray(8192)), span, path)
    finally:
        os.close(fd)


@pytest.mark.parametrize("engine", ENGINES)
def test_checksum_mismatch_names_file_and_tensor(tmp_path, engine):
    path = tmp_path / "w.bin"
    data = _random_file(path, 3 * 4096, seed=5)
    good = torch.frombuffer(bytearray(data[4096:8192]), dtype=torch.uint8)
    wrong = "%016x" % ((int(checksum_hex(good), 16) + 1) % (1 << 64))
    target = ReadTarget(4096, torch.empty(4096, dtype=torch.uint8), name="layers.0.w", checksum=wrong)
    with pytest.raises(ChecksumError, match=r"layers\.0\.w.*w\.bin"):
        read_files([FileRead(path, (target,), len(data))],
                   ReadOptions(num_threads=2, **ENGINES[engine]), CPU)


def test_policy_require_fails_clearly_without_gds():
    with pytest.raises(GdsError, match="require.*not CUDA"):
        resolve_mode(CPU, "require")
    with pytest.raises(GdsError, match="require.*not CUDA"):
        read_files([], ReadOptions(policy="require"), CPU)
    problems = gds_problems(torch.device("cuda", 0))  # answered without touching a GPU
    assert any("nvidia-fs" in p for p in problems)
    assert resolve_mode(CPU, "auto") == "host" and resolve_mode(CPU, "off") == "host"


def test_options_are_validated():
    with pytest.raises(GdsError, match="policy"):
        ReadOptions(policy="always")
    with pytest.raises(GdsError, match="engine"):
        ReadOptions(engine="magic")
    with pytest.raises(GdsError, match="max_pinned_bytes 4096 cannot hold one bounce buffer"):
        ReadOptions(max_pinned_bytes=4096)
    ReadOptions(task_size=64 << 20, max_pinned_bytes=1 << 20)  # kvikio reads it through smaller buffers
    with pytest.raises(ValueError, match="contiguous"):
        dest = torch.empty(8, 8, dtype=torch.uint8).t()
        read_files([FileRead(Path(__file__), (ReadTarget(0, dest),), None)], ReadOptions(), CPU)


def test_cufile_json_with_comments(tmp_path, monkeypatch):
    cfg = tmp_path / "cufile.json"
    cfg.write_text('{\n // NVIDIA ships comments\n "properties": {\n  "allow_compat_mode": false, // no fallback\n'
                   '  "url": "http://x//y"\n },\n}\n')
    monkeypatch.setenv("CUFILE_ENV_PATH_JSON", str(cfg))
    parsed = gds_env.read_cufile_json()
    assert parsed.exists and parsed.error is None and parsed.allow_compat_mode is False
    assert parsed.raw["properties"]["url"] == "http://x//y"
    problems = gds_problems(torch.device("cuda", 0))
    assert not any("allow_compat_mode" in p or "cufile" in p.lower() for p in problems)


def test_resident_file_is_copied_from_the_page_cache(tmp_path):
    """With pin_page_cache, a file in memory is taken from the back of the plan straight from its
    mapping (on a GPU: pinned in place), the rest through the ring; together, every byte once."""
    path = tmp_path / "resident.bin"
    data = _random_file(path, 8 << 20, seed=6)
    dest = torch.empty(len(data), dtype=torch.uint8)
    stats = read_files([FileRead(path, (ReadTarget(0, dest),), len(data))],
                       ReadOptions(task_size=4096, num_threads=2, **ENGINES["pipeline-pinned"]), CPU)
    assert bytes(dest.numpy()) == data
    assert 0 < stats.detail["pinned_in_place_spans"] <= stats.detail["spans"]


@pytest.mark.parametrize("engine", ENGINES)
def test_progress_counts_every_byte(tmp_path, engine):
    import threading

    path = tmp_path / "p.bin"
    data = _random_file(path, 1 << 20, seed=7)
    dests = [torch.empty(300_000, dtype=torch.uint8), torch.empty(5, dtype=torch.uint8)]
    seen, lock = [0], threading.Lock()

    def progress(n):
        with lock:
            seen[0] += n

    read_files([FileRead(path, (ReadTarget(0, dests[0]), ReadTarget(700_001, dests[1])), len(data))],
               ReadOptions(task_size=8192, num_threads=3, **ENGINES[engine]), CPU, progress)
    assert seen[0] == 300_005
    assert bytes(dests[1].numpy()) == data[700_001:700_006]


def test_automatic_threads_share_the_cpus_between_ranks():
    from vllm_gds.io.reader import MAX_AUTO_THREADS, auto_threads, with_threads

    cpus = len(os.sched_getaffinity(0))
    assert auto_threads(1) == max(2, min(MAX_AUTO_THREADS, cpus))
    assert auto_threads(10_000) == 2
    assert with_threads(ReadOptions(num_threads=5), 4).num_threads == 5
    assert with_threads(ReadOptions(), 1).num_threads == auto_threads(1)
    with pytest.raises(GdsError, match="num_threads"):
        ReadOptions(num_threads=-1)


@pytest.mark.parametrize("bound, threads, task", [(1 << 30, 0, 0), (1 << 20, 0, 64 << 20), (256 << 10, 16, 0),
                                                  (64 << 10, 24, 4 << 20)])
def test_kvikio_bounce_buffers_stay_within_max_pinned_bytes(tmp_path, bound, threads, task):
    """The real kvikio is configured (and read back) with threads x bounce buffer <= the bound, and
    still reads every byte."""
    path = tmp_path / "b.bin"
    data = _random_file(path, 3 << 20, seed=9)
    dest = torch.empty(len(data), dtype=torch.uint8)
    options = ReadOptions(engine="kvikio", max_pinned_bytes=bound, num_threads=threads, task_size=task)
    stats = read_files([FileRead(path, (ReadTarget(0, dest),), len(data))], options, CPU)
    assert bytes(dest.numpy()) == data
    d = stats.detail
    assert d["engine"] == "kvikio"
    assert d["threads"] * d["bounce_size"] == d["pinned_bound_bytes"] <= bound
    assert d["bounce_size"] <= d["task_size"]
    assert d["machine"]["cpus"] == len(os.sched_getaffinity(0)) and d["choice"]


def test_pipeline_engine_refuses_a_task_larger_than_the_pinned_bound(tmp_path):
    path = tmp_path / "p.bin"
    data = _random_file(path, 1 << 20, seed=10)
    dest = torch.empty(len(data), dtype=torch.uint8)
    with pytest.raises(GdsError, match="max_pinned_bytes"):
        read_files([FileRead(path, (ReadTarget(0, dest),), len(data))],
                   ReadOptions(engine="pipeline", task_size=4 << 20, max_pinned_bytes=1 << 20), CPU)
    # with the task size left automatic it fits the bound and reads
    stats = read_files([FileRead(path, (ReadTarget(0, dest),), len(data))],
                       ReadOptions(engine="pipeline", max_pinned_bytes=256 << 10), CPU)
    assert bytes(dest.numpy()) == data and stats.detail["task_size"] <= 256 << 10


@pytest.mark.parametrize("engine", ["staged", "kvikio"])
def test_cold_files_are_read_with_o_direct(tmp_path, engine):
    """A file not in the page cache, on a local disk, is read around the page cache (O_DIRECT): every
    byte lands, unaligned start and end included, and the page cache stays cold."""
    from vllm_gds.io.pagecache import resident_fraction_of

    path = tmp_path / "cold.bin"
    data = _random_file(path, (3 << 20) + 12_345, seed=11)
    if gds_env.mount_of(path).fstype in ("tmpfs", "ramfs") or not drop_from_page_cache(path):
        pytest.skip(f"{tmp_path} is not on a disk whose pages can be dropped")
    dest = torch.empty(len(data) - 5000, dtype=torch.uint8)
    stats = read_files([FileRead(path, (ReadTarget(5000, dest),), len(data))],
                       ReadOptions(engine=engine, slot_size=1 << 20, task_size=256 << 10, num_threads=3), CPU)
    assert bytes(dest.numpy()) == data[5000:]
    assert stats.detail["direct_io"] is True and stats.detail["resident_fraction"] < 0.1
    assert resident_fraction_of([path]) < 0.5  # read around the page cache, not through it
    path.read_bytes()  # now warm: buffered reads
    stats = read_files([FileRead(path, (ReadTarget(5000, dest),), len(data))], ReadOptions(engine=engine), CPU)
    assert stats.detail["direct_io"] is False and bytes(dest.numpy()) == data[5000:]


def test_staged_engine_file_shrinking_mid_read_names_it_and_the_next_load_reads(tmp_path):
    """A file cut short after its size was checked fails the load naming the file; no read of it is
    left running into the ring, and the next load through the same ring reads every byte."""
    path = tmp_path / "shrinks.bin"
    data = _random_file(path, 4 << 20, seed=12)
    dest = torch.zeros(len(data), dtype=torch.uint8)
    cut = []

    def progress(n):
        if not cut:
            cut.append(n)
            os.truncate(path, 1 << 20)

    options = ReadOptions(engine="staged", slot_size=64 << 10, task_size=16 << 10, num_threads=2)
    with pytest.raises(ShardReadError, match=r"shrinks\.bin"):
        read_files([FileRead(path, (ReadTarget(0, dest),), len(data))], options, CPU, progress)
    path.write_bytes(data)
    stats = read_files([FileRead(path, (ReadTarget(0, dest),), len(data))], options, CPU)
    assert bytes(dest.numpy()) == data and stats.detail["ring_kept"] is True


@pytest.mark.parametrize("bound", [64 << 10, 300 << 10, 8 << 20])
def test_staged_ring_stays_within_max_pinned_bytes(tmp_path, bound):
    from vllm_gds.io import staged

    path = tmp_path / "r.bin"
    data = _random_file(path, 2 << 20, seed=13)
    dest = torch.empty(len(data), dtype=torch.uint8)
    stats = read_files([FileRead(path, (ReadTarget(0, dest),), len(data))],
                       ReadOptions(engine="staged", max_pinned_bytes=bound), CPU)
    assert bytes(dest.numpy()) == data
    d = stats.detail
    assert 0 < d["slots"] * d["slot_size"] <= bound and d["task_size"] <= d["slot_size"]
    assert d["pinned_bytes"] == 0  # host destinations: plain memory
    assert staged.release() == d["slots"] * d["slot_size"] and staged.release() == 0


def test_prewarm_pins_the_ring_before_the_load_and_release_frees_it(tmp_path):
    """The loader pins the staged engine's ring while vLLM builds the model: the load then finds it
    ready (nothing read by prewarm), and release frees it."""
    from vllm_gds.io import staged
    from vllm_gds.io.reader import prewarm, release_pinned

    path = tmp_path / "w.bin"
    data = _random_file(path, 1 << 20, seed=14)
    options = ReadOptions(engine="staged", slot_size=128 << 10, num_threads=2)
    release_pinned()
    assert prewarm([path], options, CPU) == "staged"
    staged.wait_prewarmed()
    dest = torch.empty(len(data), dtype=torch.uint8)
    stats = read_files([FileRead(path, (ReadTarget(0, dest),), len(data))], options, CPU)
    assert bytes(dest.numpy()) == data and stats.detail["ring_kept"] is True
    assert release_pinned() == stats.detail["slots"] * stats.detail["slot_size"] and release_pinned() == 0
    assert prewarm([path], ReadOptions(), CPU) == "kvikio"  # host reads: no ring to pin
    assert release_pinned() == 0

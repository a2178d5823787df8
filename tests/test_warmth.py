"""Warm or cold: the load report's page-cache residency, from a real mincore on files here."""

import os

import pytest
import torch

from vllm_gds.io.pagecache import resident_fraction_of
from vllm_gds.io.reader import FileRead, ReadOptions, ReadTarget, read_files
from vllm_gds.loader.report import LoadReport


def _written(path, size=8 << 20):
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return data


def test_a_freshly_read_file_is_resident_and_the_report_says_warm(tmp_path):
    path = tmp_path / "w.bin"
    data = _written(path)
    assert path.read_bytes() == data  # read once: in the page cache now
    assert resident_fraction_of([path]) > 0.9
    dest = torch.empty(len(data), dtype=torch.uint8)
    stats = read_files([FileRead(path, (ReadTarget(0, dest),), len(data))], ReadOptions(), torch.device("cpu"))
    assert stats.detail["resident_fraction"] > 0.9
    report = LoadReport(model="m", source="prepared", rank=0, tp_rank=0, pp_rank=0, mode=stats.mode, files=1,
                        tensors=1, nbytes=stats.nbytes, read_seconds=stats.seconds, checksums_verified=False,
                        verify_seconds=0.0, total_seconds=stats.seconds, **LoadReport.engine_fields(stats.detail))
    assert report.resident_fraction > 0.9 and report.to_json()["resident_fraction"] > 0.9
    line = report.log_line()
    assert "warm:" in line and "kvikio engine" in line and f"{report.threads} threads" in line


def test_a_file_dropped_from_the_page_cache_reads_lower(tmp_path):
    path = tmp_path / "c.bin"
    _written(path)
    path.read_bytes()
    before = resident_fraction_of([path])
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    after = resident_fraction_of([path])
    if after >= before and before > 0.9:
        pytest.skip(f"this file system ({tmp_path}) keeps pages after POSIX_FADV_DONTNEED "
                    f"(resident {before:.2f} -> {after:.2f}), e.g. tmpfs")
    assert after < before
    report = LoadReport(model="m", source="prepared", rank=0, tp_rank=0, pp_rank=0, mode="host", files=1,
                        tensors=1, nbytes=1, read_seconds=1.0, checksums_verified=False, verify_seconds=0.0,
                        total_seconds=1.0, resident_fraction=after)
    assert ("cold:" if after <= 0.1 else "partly warm:") in report.log_line()


def test_residency_of_several_files_and_missing_ones(tmp_path):
    a, b, empty = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "e.bin"
    _written(a, 1 << 20)
    _written(b, 3 << 20)
    empty.write_bytes(b"")
    a.read_bytes(), b.read_bytes()
    assert 0.9 < resident_fraction_of([a, b, empty]) <= 1.0
    assert resident_fraction_of([a, tmp_path / "missing.bin"]) is None
    assert LoadReport(model="m", source="prepared", rank=0, tp_rank=0, pp_rank=0, mode="host", files=1,
                      tensors=1, nbytes=1, read_seconds=1.0, checksums_verified=False, verify_seconds=0.0,
                      total_seconds=1.0).warmth == "page cache not measured"


def test_large_files_are_sampled_and_still_tell_warm_from_cold(tmp_path, monkeypatch):
    from vllm_gds.io import pagecache

    monkeypatch.setattr(pagecache, "SAMPLE_ABOVE_PAGES", 64)  # an 8 MiB file (2048 pages) is sampled
    monkeypatch.setattr(pagecache, "SAMPLES_PER_FILE", 32)
    path = tmp_path / "s.bin"
    _written(path)
    path.read_bytes()
    assert resident_fraction_of([path]) > 0.9
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 4 << 20, os.POSIX_FADV_DONTNEED)  # the first half
    finally:
        os.close(fd)
    half = resident_fraction_of([path])
    if half > 0.9:
        pytest.skip("this file system keeps pages after POSIX_FADV_DONTNEED")
    assert 0.3 < half < 0.7

"""The vllm-gds command: prepare's refusals and atomicity, inspect, report."""

import json
import shutil

import pytest

from vllm_gds.cli import main
from vllm_gds.prepare.orchestrate import PrepareRequest, prepare
from vllm_gds.errors import GdsError
from vllm_gds.shards.manifest import read_manifest


def test_inspect_summarizes_and_verifies(prepared_tiny_tp2, capsys):
    assert main(["inspect", str(prepared_tiny_tp2)]) == 0
    out = capsys.readouterr().out
    assert "tensor-parallel 2 x pipeline-parallel 1 (2 ranks)" in out
    assert "made by       vLLM 0.32.0 on cpu" in out
    assert "capture point before_post_processing" in out
    assert "sizes, headers, checksums and serving files: all ranks intact, config and tokenizer present" in out


def test_inspect_finds_a_damaged_rank(prepared_tiny_tp2, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(prepared_tiny_tp2, model)
    shard = read_manifest(model).ranks[1].files[0]
    with open(model / shard.path, "r+b") as f:
        f.seek(shard.tensors[-1].offset)
        f.write(b"\xff\xff\xff\xff")
    assert main(["inspect", str(model)]) == 1
    out = capsys.readouterr().out
    assert f"rank 1: DAMAGED: tensor {shard.tensors[-1].name} at byte {shard.tensors[-1].offset} of {model / shard.path}" in out
    assert "1 rank damaged" in out


def test_prepare_refuses_an_existing_output(tiny_model, prepared_tiny, capsys):
    assert main(["prepare", str(tiny_model), str(prepared_tiny)]) == 2
    assert "already exists: remove it or choose another output directory" in capsys.readouterr().err


def test_prepare_refuses_a_directory_without_config(tmp_path, capsys):
    assert main(["prepare", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_failed_prepare_leaves_nothing_that_looks_prepared(tiny_model, tmp_path):
    # 4 attention heads do not divide by 3: vLLM itself refuses the layout during capture.
    out = tmp_path / "tiny-tp3"
    with pytest.raises(GdsError, match="vLLM could not capture the model"):
        prepare(PrepareRequest(source=tiny_model, out=out, dtype="float32", tensor_parallel_size=3))
    assert not out.exists()
    assert not list(tmp_path.glob(".tiny-tp3.partial-*"))
    assert (tmp_path / ".tiny-tp3.prepare.log").is_file()  # kept for the user to read


def test_report_prints_per_rank_and_aggregate(tmp_path, capsys):
    from vllm_gds.loader.report import LoadReport

    for rank, seconds in [(0, 1.0), (1, 2.0)]:
        LoadReport(model="m", source="prepared", rank=rank, tp_rank=rank, pp_rank=0, mode="compat",
                   files=2, tensors=10, nbytes=4_000_000_000, read_seconds=seconds,
                   checksums_verified=True, verify_seconds=0.1, total_seconds=seconds + 0.5,
                   threads=16, task_size=4 << 20, resident_fraction=1.0 - rank).write(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:7] == ["0", "prepared", "compat", "2", "4.000", "1.00", "4.00"]
    assert lines[1].split()[8:] == ["100%", "16", "x", "4", "MiB"] and lines[2].split()[8] == "0%"
    assert lines[-1].split() == ["all", "4", "8.000", "2.00", "4.00"]  # bytes over the slowest rank


def test_prepare_checks_free_disk_space_first(tiny_model, tmp_path):
    from vllm_gds.prepare.orchestrate import _check_disk

    request = PrepareRequest(source=tiny_model, out=tmp_path / "out")
    _check_disk(request, 1 << 20)
    with pytest.raises(GdsError, match=f"{tmp_path} has .* GB free; preparing needs about"):
        _check_disk(request, shutil.disk_usage(tmp_path).free * 2)


def test_prepare_writes_the_kv_cache_calibration(prepared_tiny):
    from vllm_gds.kvcache.calibration_file import load_calibration

    calibration = load_calibration(prepared_tiny)
    assert calibration is not None
    assert calibration.key_mean.shape == (2, 2, 32)  # layers, KV heads, head size of the tiny model

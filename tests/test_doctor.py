"""`vllm-gds doctor` on this machine (no GPU, no nvidia-fs): says no GDS, why, and the fix."""

import argparse

import torch
from safetensors.torch import save_file

from vllm_gds.cli.doctor import FAIL, OK, WARN, diagnose, format_diagnosis
from vllm_gds.cli.doctor import add_arguments as add_doctor_arguments, run as run_doctor
from vllm_gds.shards.writer import write_rank


def _by_name(d):
    return {c.name: c for c in d.checks}


def test_doctor_says_no_gds_and_why(tmp_path, capsys):
    write_rank(tmp_path, [("w", torch.arange(5000, dtype=torch.float32))], tp_rank=0, pp_rank=0,
               tensor_parallel_size=1)
    d = diagnose(tmp_path)
    checks = _by_name(d)
    assert not d.gds
    assert checks["nvidia-fs"].status == FAIL and "modprobe nvidia_fs" in checks["nvidia-fs"].fix
    assert checks["alignment"].status == OK
    assert checks["cuFile driver"].status != OK  # never asked when GDS is already ruled out
    text = format_diagnosis(d)
    assert "GDS WOULD NOT BE USED" in text and "nvidia-fs" in text

    parser = add_doctor_arguments(argparse.ArgumentParser())
    assert run_doctor(parser.parse_args([str(tmp_path)])) != 0
    assert "Verdict" in capsys.readouterr().out


def test_doctor_names_the_file_system_and_alignment(tmp_path):
    save_file({"a": torch.ones(3, dtype=torch.float16), "b": torch.ones(5000, dtype=torch.float32)},
              str(tmp_path / "model.safetensors"))
    checks = _by_name(diagnose(tmp_path, query_driver=False))
    assert "ext4" in checks["file system"].detail or checks["file system"].status == FAIL
    assert checks["alignment"].status == WARN and "vllm-gds prepare" in checks["alignment"].fix
    shm = _by_name(diagnose("/dev/shm", query_driver=False))
    assert shm["file system"].status == FAIL and "tmpfs" in shm["file system"].detail


def test_doctor_reads_allow_compat_mode(tmp_path, monkeypatch):
    cfg = tmp_path / "cufile.json"
    cfg.write_text('{"properties": {"allow_compat_mode": true}}')
    monkeypatch.setenv("CUFILE_ENV_PATH_JSON", str(cfg))
    assert _by_name(diagnose(tmp_path, query_driver=False))["cufile.json"].status == WARN
    cfg.write_text('{"properties": {"allow_compat_mode": false}}')
    assert _by_name(diagnose(tmp_path, query_driver=False))["cufile.json"].status == OK
    assert _by_name(diagnose(tmp_path / "nowhere", query_driver=False))["path"].status == FAIL

"""`vllm-gds doctor` on this machine (no GPU, no nvidia-fs): says no GDS, why, and the fix."""

import argparse
import os
import subprocess
import sys

import pytest
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


def test_doctor_names_the_disk_kind(tmp_path):
    from vllm_gds.io.block_device import block_device_of

    device = block_device_of(tmp_path)
    fs = _by_name(diagnose(tmp_path, query_driver=False))["file system"]
    if device is None:
        pytest.skip(f"{tmp_path} is not on a block device here")
    assert f"/dev/{device.name}" in fs.detail
    if device.kind != "nvme":
        assert "NVMe /dev" not in fs.detail and fs.status != OK  # no "local NVMe" for a virtio or SCSI disk
    if device.kind == "virtio":  # this machine: /dev/vda, ext4
        assert "virtio disk" in fs.detail


def test_doctor_checks_kvikio_by_a_real_read(tmp_path):
    assert _by_name(diagnose(tmp_path, query_driver=False))["kvikio"].status == OK  # the driver stub is on the path
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(p for p in env.get("LD_LIBRARY_PATH", "").split(":")
                                      if p and not os.path.isfile(os.path.join(p, "libcuda.so.1")))
    if subprocess.run([sys.executable, "-c", "import ctypes; ctypes.CDLL('libcuda.so.1')"], env=env).returncode == 0:
        pytest.skip("a real libcuda.so.1 is installed here")
    proc = subprocess.run([sys.executable, "-m", "vllm_gds.cli", "doctor", str(tmp_path), "--no-driver"],
                          env=env, capture_output=True, text=True, timeout=300)
    kvikio_line = next(line for line in proc.stdout.splitlines() if "] kvikio" in line)
    assert "[  no] kvikio" in kvikio_line and "libcuda.so.1" in kvikio_line, proc.stdout
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob(".vllm-gds-probe-*"))  # the probe file is removed


def test_doctor_verdict_names_the_path_the_report_will_show(tmp_path):
    text = format_diagnosis(diagnose(tmp_path, query_driver=False))
    # No GPU here: vLLM runs its CPU platform, whose load report says 'host', not 'compat'.
    assert "the load report says 'host'" in text and "'compat'" not in text


def test_one_gds_checklist_for_reader_and_doctor(monkeypatch, tmp_path):
    import vllm_gds.io.reader as reader
    from vllm_gds.io import gds_checklist

    cfg = tmp_path / "cufile.json"
    cfg.write_text('{"properties": {"allow_compat_mode": true}}')
    monkeypatch.setenv("CUFILE_ENV_PATH_JSON", str(cfg))
    monkeypatch.setenv("KVIKIO_COMPAT_MODE", "ON")
    items = {c.name: c for c in gds_checklist.node_checks()}
    problems = reader.gds_problems(torch.device("cuda", 0))  # answered without touching a GPU
    assert problems == gds_checklist.problems(list(items.values()))
    checks = _by_name(diagnose(tmp_path, query_driver=False))
    for name in ("nvidia-fs", "cufile.json"):
        assert (checks[name].status, checks[name].detail) == (items[name].status, items[name].detail)
    assert checks["kvikio"].detail == items["kvikio compat"].detail

"""An interrupted `vllm-gds prepare`: no process left (checked by PID), no partial directory left."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest


def _capture_children(parent: psutil.Process) -> list[psutil.Process]:
    return [c for c in parent.children() if "vllm_gds.prepare.capture" in " ".join(c.cmdline())]


def _wait_for_capture(proc: subprocess.Popen, timeout: float = 180.0) -> list[int]:
    """Wait until prepare's capture child runs (and, if it gets there in time, its engine process)."""
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout
    child = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            found = _capture_children(parent)
        except psutil.NoSuchProcess:
            break
        if found:
            child = found[0]
            break
        time.sleep(0.2)
    assert child is not None, f"no capture child appeared (prepare exited {proc.poll()})"
    # Give the child time to start vLLM's engine process, so that the group kill is what is tested.
    grandchild_deadline = time.monotonic() + 60
    while time.monotonic() < grandchild_deadline and proc.poll() is None:
        try:
            if child.children(recursive=True):
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    return [p.pid for p in parent.children(recursive=True)]


def _gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive
                 if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    return alive


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_prepare_leaves_no_process_and_no_partial(tiny_model, tmp_path, sig, code):
    out = tmp_path / "tiny"
    stale = tmp_path / f".tiny.partial-{_dead_pid()}"  # an earlier prepare that was killed
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.safetensors").write_bytes(b"x" * 4096)
    live = tmp_path / f".tiny.partial-{os.getpid()}"  # a prepare that still runs: not touched
    live.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_gds.cli", "prepare", str(tiny_model), str(out), "--dtype", "float32",
         "--no-kv-calibration"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        descendants = _wait_for_capture(proc)
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert f"interrupted by {signal.Signals(sig).name}: prepare {tiny_model.resolve()}" in err
    assert "while vLLM captured the shards" in err
    assert "Traceback" not in err
    assert _gone(descendants) == []
    assert not out.exists()
    assert not stale.exists()
    assert live.is_dir()
    assert sorted(p.name for p in tmp_path.glob(".tiny.partial-*")) == [live.name]

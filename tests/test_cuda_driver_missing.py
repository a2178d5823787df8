"""Without libcuda.so.1 (no driver, the stub off the library path): inspect still checks the files
(plain reads), and serving with --load-format gds stops naming what to install."""

import os
import subprocess
import sys

import pytest

from conftest import run_engine
from vllm_gds.io.cuda_driver import STUB_PATH


def _env_without_stub() -> dict:
    env = dict(os.environ)
    paths = [p for p in env.get("LD_LIBRARY_PATH", "").split(":")
             if p and not os.path.isfile(os.path.join(p, "libcuda.so.1"))]
    env["LD_LIBRARY_PATH"] = ":".join(paths)
    env.pop("GDS_CUDA_DRIVER_STUB", None)
    return env


@pytest.fixture(scope="module")
def no_driver_env() -> dict:
    env = _env_without_stub()
    probe = subprocess.run([sys.executable, "-c", "import ctypes; ctypes.CDLL('libcuda.so.1')"],
                           env=env, capture_output=True)
    if probe.returncode == 0:
        pytest.skip("a real libcuda.so.1 is installed on this machine")
    return env


def test_inspect_needs_no_cuda_driver(prepared_tiny, no_driver_env):
    proc = subprocess.run([sys.executable, "-m", "vllm_gds.cli", "inspect", str(prepared_tiny)],
                          env=no_driver_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all ranks intact" in proc.stdout and "Traceback" not in proc.stderr


def test_serving_without_a_cuda_driver_names_the_fix(prepared_tiny, no_driver_env):
    result = run_engine(prepared_tiny, "gds", env=no_driver_env)
    assert result.returncode != 0 and result.tokens is None, result.log[-3000:]
    assert "the CUDA driver library libcuda.so.1 cannot be loaded" in result.log, result.log[-3000:]
    assert "install the NVIDIA driver" in result.log
    assert f"LD_LIBRARY_PATH={STUB_PATH.parent}" in result.log and STUB_PATH.parent.is_absolute()

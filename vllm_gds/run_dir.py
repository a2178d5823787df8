"""One directory per vLLM run, shared by the run's processes.

vLLM calls the plugin's register() in every process it starts: process 0 (the API server, or the
`LLM` user's process), the engine core and each worker. The loader runs in a worker, but what it
learns is needed in process 0: the load reports, which process 0 serves on /metrics, and a load
failure, which process 0 prints again as the last lines of the output. Process 0 makes this
directory and names it in its environment before vLLM starts the other processes, so they inherit
it; process 0 removes it at exit.

Process 0 is the process that multiprocessing did not start: vLLM starts the engine core and the
workers with multiprocessing, while a server launched from a shell or by subprocess is a process 0
of its own, even if its parent ran vLLM too. Ray workers are started by Ray: they find no directory
from process 0 (each makes its own), so their reports do not reach /metrics.
"""

import atexit
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

ENV = "VLLM_GDS_RUN_DIR"

_claimed: Path | None = None


def is_process_zero() -> bool:
    return multiprocessing.parent_process() is None


def claim() -> Path | None:
    """In process 0: make the run's directory (once) and name it in os.environ. Elsewhere: None."""
    global _claimed
    if _claimed is None and is_process_zero():
        _claimed = Path(tempfile.mkdtemp(prefix=f"vllm-gds-run-{os.getpid()}-"))
        os.environ[ENV] = str(_claimed)
        atexit.register(shutil.rmtree, _claimed, ignore_errors=True)
    return _claimed


def current() -> Path | None:
    """This run's directory, or None where process 0 made none (vLLM ran without the plugin there)."""
    value = os.environ.get(ENV)
    return Path(value) if value and os.path.isdir(value) else None

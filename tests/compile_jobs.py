"""Run the sm_90 compile scripts' jobs (tests/hopper_compile.py, store_compile.py,
store_hopper_compile.py) in one process of their own, so that a compile test module pays
Python's, torch's and Triton's imports once, not once a kernel (each about 3 s on the 2-core
machines). A process that imported Triton under TRITON_INTERPRET=1 (the CPU tests do) cannot
compile for a GPU target, hence the process.

A job is [script, *argv]: the script's own command line. Its result is what the script prints
(its `result(argv)`), or {"error": traceback} for that job alone, so that one failing compile
fails its own test only.

    python tests/compile_jobs.py '[["store_compile.py", "tq4"], ["store_compile.py", "tq4", "old"]]'
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path


def run(jobs: list[list[str]], timeout: int = 1200) -> list:
    """The jobs' results, in order, from one process of their own (run from a test)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run([sys.executable, str(Path(__file__)), json.dumps(jobs)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(jobs), (len(results), len(jobs))
    return results


def checked(result):
    """A job's result; its compile's traceback as the assertion's message if it failed."""
    assert not (isinstance(result, dict) and "error" in result), result["error"]
    return result


def _result(script: str, argv: list[str]):
    try:
        return importlib.import_module(Path(script).stem).result(argv)
    except Exception:  # reported by the job's own test
        return {"error": traceback.format_exc()[-3000:]}


if __name__ == "__main__":
    print(json.dumps([_result(script, argv) for script, *argv in json.loads(sys.argv[1])]))

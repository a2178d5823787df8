"""Is the CUDA driver library (libcuda.so.1) loadable? kvikio needs it for every read.

kvikio imports without it but fails at the first read with ``KvikIO failure ...
libcuda.so.1: cannot open shared object file``, even when reading into host memory
in compat mode. Checked once, before kvikio opens a file, so that the user reads
what is missing and how to fix it instead of a traceback.
"""

import ctypes
import functools
from pathlib import Path

from vllm_gds.errors import GdsError

LIBRARY = "libcuda.so.1"
# `make` builds this stub (tests/cuda_stub/libcuda_stub.c): it reports zero GPUs, enough for
# kvikio's host reads on a CPU-only machine. Relative to a source checkout of vllm-gds.
STUB_PATH = Path(__file__).resolve().parents[2] / "build" / "cuda_stub" / LIBRARY


def missing_driver_message(reason: str = "") -> str:
    stub_dir = STUB_PATH.parent
    if STUB_PATH.is_file():
        stub = f"put the stub that `make` built on the library path: export LD_LIBRARY_PATH={stub_dir}" \
               "${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    else:
        stub = (f"build the stub with `make install` in the vllm-gds checkout (it writes {STUB_PATH}; "
                f"or `gcc -shared -fPIC -o {STUB_PATH} tests/cuda_stub/libcuda_stub.c`), then "
                f"export LD_LIBRARY_PATH={stub_dir}" "${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
    return (
        f"the CUDA driver library {LIBRARY} cannot be loaded"
        + (f" ({reason})" if reason else "")
        + ": kvikio needs it for every read, even into host memory. On a GPU node: install the "
        "NVIDIA driver (it provides libcuda.so.1; check with `nvidia-smi`). On a CPU-only machine: "
        + stub + ". Never put the stub where a real driver exists."
    )


class CudaDriverMissing(GdsError):
    """This machine cannot run kvikio at all: not a problem of the files being read."""


@functools.cache
def _load_error() -> str | None:
    try:
        ctypes.CDLL(LIBRARY)
    except OSError as e:
        return str(e)
    return None


def require_cuda_driver() -> None:
    """Raise GdsError (what is missing, what to do) unless libcuda.so.1 loads."""
    error = _load_error()
    if error is not None:
        raise CudaDriverMissing(missing_driver_message(error))


def is_missing_driver_error(e: BaseException) -> bool:
    """A kvikio error that is the missing driver library (raised at a read, not at import)."""
    return LIBRARY in str(e) and "cannot open" in str(e)

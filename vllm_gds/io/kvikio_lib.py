"""kvikio, imported and used the same way by both engines that read through it (reader, staged)."""

from vllm_gds.errors import GdsError, ShardReadError
from vllm_gds.io.cuda_driver import CudaDriverMissing, is_missing_driver_error, missing_driver_message, require_cuda_driver


import sys
import time

# Seconds the first import of kvikio took in this process (its library loads, the CUDA driver's
# entry points): a cost only the first load pays, reported so that it can be told apart.
import_seconds: float | None = None


def load_kvikio():
    global import_seconds
    start = time.perf_counter() if "kvikio" not in sys.modules else None
    try:
        import kvikio
        import kvikio.cufile_driver
        import kvikio.defaults
    except ImportError as e:
        raise GdsError(
            f"kvikio is not importable ({e}); install it with `pip install vllm-gds[gpu]` "
            "(kvikio-cu13) on GPU nodes"
        ) from None
    require_cuda_driver()  # kvikio imports without libcuda.so.1, then fails at the first read
    if start is not None:
        import_seconds = time.perf_counter() - start
    return kvikio


def open_all(kvikio, reads) -> list:
    """One CuFile per read, every file opened before the first byte is read; closed again on failure."""
    handles = []
    try:
        for read in reads:
            try:
                handles.append(kvikio.CuFile(read.path, "r"))
            except RuntimeError as e:
                if is_missing_driver_error(e):
                    raise CudaDriverMissing(missing_driver_message(str(e))) from None
                raise ShardReadError(f"cannot open shard file {read.path} with cuFile: {e}") from None
    except BaseException:
        close_all(handles)
        raise
    return handles


def close_all(handles) -> None:
    for handle in handles:
        handle.close()


def wait(future, path, offset: int, nbytes: int) -> None:
    """The result of one pread: every byte asked for, or an error naming the file and the fix."""
    try:
        got = future.get()
    except RuntimeError as e:
        if is_missing_driver_error(e):
            raise CudaDriverMissing(missing_driver_message(str(e))) from None
        raise ShardReadError(f"reading {path} at byte {offset} failed: {e}") from None
    if got != nbytes:
        raise ShardReadError(
            f"short read from {path}: {got} of {nbytes} bytes at offset {offset}; the file is "
            "truncated: copy or prepare it again"
        )

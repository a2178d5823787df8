"""Can kvikio read on this machine? Answered by a real read, not by `import kvikio`.

kvikio imports without the CUDA driver library and fails at the first read, so
``doctor`` writes a small file on the target's file system and reads it back
through the reader's own kvikio path into host memory.
"""

import os
import tempfile
from pathlib import Path

import torch

from vllm_gds.errors import GdsError

PROBE_BYTES = 8192


def probe_directory(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def kvikio_read_problem(path: str | os.PathLike) -> str | None:
    """None when kvikio reads back a small file written beside ``path`` exactly; else why not."""
    from vllm_gds.io.reader import FileRead, ReadOptions, ReadTarget, read_files

    pattern = bytes(range(256)) * (PROBE_BYTES // 256)
    directory = probe_directory(Path(path))
    try:
        fd, name = tempfile.mkstemp(prefix=".vllm-gds-probe-", dir=directory)
    except OSError:  # not writable here: the system's temporary directory still shows whether kvikio reads
        fd, name = tempfile.mkstemp(prefix=".vllm-gds-probe-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pattern)
        dest = torch.empty(PROBE_BYTES, dtype=torch.uint8)
        try:
            read_files([FileRead(Path(name), (ReadTarget(0, dest, name="probe"),), PROBE_BYTES)],
                       ReadOptions(engine="kvikio", num_threads=1), torch.device("cpu"))
        except (GdsError, RuntimeError, OSError) as e:
            return str(e)
        if bytes(dest.numpy()) != pattern:
            return f"kvikio read {PROBE_BYTES} bytes of {name} but they differ from what was written"
        return None
    finally:
        os.unlink(name)

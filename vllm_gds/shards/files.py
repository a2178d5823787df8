"""Opening the files of a model directory: regular files only, OS refusals as UnreadableError."""

import contextlib
import os
import stat
from pathlib import Path

from vllm_gds.errors import UnreadableError, os_error_message


def check_regular(path: Path, what: str = "file") -> os.stat_result:
    """stat ``path`` (following links); UnreadableError unless it is a regular file. FileNotFoundError passes."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError) as e:
        if isinstance(e, OSError):
            raise UnreadableError(os_error_message(path, e)) from None
        raise UnreadableError(f"cannot read {path}: {e}; replace the link with the real file") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else \
            "a socket" if stat.S_ISSOCK(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or \
            stat.S_ISBLK(st.st_mode) else "not a regular file"
        raise UnreadableError(
            f"{what} {path} is {kind}, not a regular file: replace it with the file itself"
        )
    return st


@contextlib.contextmanager
def open_regular(path: Path, what: str = "file"):
    """Open a regular file for reading in binary mode (never blocks on a FIFO)."""
    check_regular(path, what)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UnreadableError(os_error_message(path, e)) from None
    with f:
        yield f

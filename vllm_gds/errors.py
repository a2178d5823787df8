"""Errors a user sees. Each names the file involved and the fix.

Each class carries the exit code `vllm-gds` returns for it (documented in the README):
1 damaged (the files are there but not what was prepared), 2 refused (wrong arguments, another
layout, not a prepared directory), 3 cannot read or write (the operating system refused: permission,
read-only file system, symlink loop, not a regular file).
"""

EXIT_DAMAGED = 1
EXIT_REFUSED = 2
EXIT_UNREADABLE = 3


class GdsError(ValueError):
    """Base class: a vllm-gds problem the user can fix."""

    exit_code = EXIT_REFUSED


class ManifestError(GdsError):
    """The prepared directory's manifest is missing, malformed or unsafe."""

    exit_code = EXIT_DAMAGED


class NotPreparedError(ManifestError):
    """The directory has no manifest at all: not a damaged directory, a plain one."""

    exit_code = EXIT_REFUSED


class LayoutMismatchError(GdsError):
    """The shards were prepared for another layout, dtype, quantization, vLLM or platform."""


class ShardReadError(GdsError):
    """A shard file could not be read completely."""

    exit_code = EXIT_DAMAGED


class ChecksumError(GdsError):
    """Bytes that landed differ from the bytes that were prepared."""

    exit_code = EXIT_DAMAGED


class UnreadableError(GdsError):
    """The operating system refused to read or write a path."""

    exit_code = EXIT_UNREADABLE


def os_error_message(path, e: OSError, doing: str = "read") -> str:
    """'cannot read PATH: <reason>; <fix>' for the errors users meet."""
    import errno

    fixes = {
        errno.EACCES: "give this user access to it",
        errno.EPERM: "give this user access to it",
        errno.EROFS: "choose a directory on a writable file system",
        errno.ELOOP: "a symbolic link points (through others) at itself: replace it with the real file",
        errno.ENOSPC: "free some space or choose another file system",
        errno.EISDIR: "it is a directory where a file belongs: replace it with the file",
    }
    fix = fixes.get(e.errno, "check the path and the file system")
    return f"cannot {doing} {path}: {e.strerror or e}; {fix}"

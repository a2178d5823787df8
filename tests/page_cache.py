"""Making a test file cold: its pages dropped from the page cache, for the O_DIRECT and pinner tests."""

import os


def drop_from_page_cache(path) -> bool:
    """Drop the file's pages from the page cache; False where the file system keeps them (tmpfs)."""
    from vllm_gds.io.pagecache import resident_fraction_of

    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_fraction_of([path]) < 0.1

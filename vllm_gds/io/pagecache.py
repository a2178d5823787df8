"""Page-cache residency of files (mincore), and read-only mappings whose pages the GPU can DMA from.

A file whose pages are all in memory (tmpfs, or a page cache warmed by an
earlier read) need not be copied by the CPU at all: its mapping is pinned a
span at a time (cudaHostRegister, read-only) and copied to the GPU straight
from the page cache. See :mod:`vllm_gds.io.pipeline`.
"""

import ctypes
import ctypes.util
import mmap
import os
import warnings

import numpy as np

PAGE = mmap.PAGESIZE
_libc = None


def _mincore():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        _libc.mincore.restype = ctypes.c_int
    return _libc.mincore


class FileMapping:
    """A read-only shared mapping of a whole file, with its address for DMA registration."""

    def __init__(self, fd: int, size: int):
        self.size = size
        self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
        self._array = np.frombuffer(self._map, dtype=np.uint8)
        self.address = self._array.ctypes.data

    def tensor(self):
        """The mapping as a uint8 CPU tensor (never written through)."""
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "non-writable buffer": it is only ever read
            return torch.frombuffer(self._map, dtype=torch.uint8)

    def resident_pages(self, offset: int = 0, length: int | None = None) -> tuple[int, int]:
        """(pages in memory, pages) of the range; nothing is faulted in."""
        length = self.size - offset if length is None else length
        start = offset // PAGE * PAGE
        pages = -(-(offset + length - start) // PAGE)
        if pages <= 0:
            return 0, 0
        vec = (ctypes.c_ubyte * pages)()
        if _mincore()(self.address + start, pages * PAGE, vec) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()), pages

    def close(self) -> None:
        self._array = None
        try:
            self._map.close()
        except BufferError:
            pass  # a tensor over it is still alive; the mapping goes with it


def resident_fraction(path) -> float:
    """Share of ``path``'s pages in memory (1.0 for an empty file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 1.0
        m = FileMapping(fd, size)
        try:
            cached, total = m.resident_pages()
        finally:
            m.close()
        return cached / total if total else 1.0
    finally:
        os.close(fd)


def resident_fraction_of(paths) -> float | None:
    """Share of the pages of all ``paths`` together in memory (mincore; nothing is faulted in):
    1.0 means a warm load (tmpfs or page cache), 0.0 a cold one. None where a file cannot be
    mapped (some file systems refuse mmap) or does not exist."""
    cached = total = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                continue
            m = FileMapping(fd, size)
            try:
                c, t = m.resident_pages()
            finally:
                m.close()
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        cached += c
        total += t
    return cached / total if total else 1.0

"""Page-cache residency of files (mincore), and read-only mappings whose pages the GPU can DMA from.

A file whose pages are all in memory (tmpfs, or a page cache warmed by an
earlier read) need not be copied by the CPU at all: its mapping is pinned a
span at a time (cudaHostRegister, read-only) and copied to the GPU straight
from the page cache. See :mod:`vllm_gds.io.page_pinner`.
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
        # The process's own libc: find_library would run `ldconfig -p` (a subprocess) on the first load.
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.mincore
        except (OSError, AttributeError):
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


# mincore walks every page (about 0.1 s per GiB of tmpfs on a busy VM): larger files are sampled.
SAMPLE_ABOVE_PAGES = 1 << 16  # 256 MiB
SAMPLES_PER_FILE = 256
SAMPLE_PAGES = 16  # 64 KiB per sample


def file_residency(m: "FileMapping") -> tuple[float, int]:
    """(resident share, pages) of one mapping; sampled evenly above SAMPLE_ABOVE_PAGES pages."""
    pages = -(-m.size // PAGE)
    if pages <= SAMPLE_ABOVE_PAGES:
        cached, total = m.resident_pages()
        return cached / total, pages
    # One buffer for all samples, one reduction: a Python-level call per sample cost more than
    # mincore itself.
    stride = pages // SAMPLES_PER_FILE
    vec = (ctypes.c_ubyte * (SAMPLES_PER_FILE * SAMPLE_PAGES))()
    mincore, base, out = _mincore(), ctypes.addressof(vec), ctypes.POINTER(ctypes.c_ubyte)
    for k in range(SAMPLES_PER_FILE):
        if mincore(m.address + k * stride * PAGE, SAMPLE_PAGES * PAGE, ctypes.cast(base + k * SAMPLE_PAGES, out)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    return float((np.frombuffer(vec, dtype=np.uint8) & 1).mean()), pages


def resident_fraction_of(paths) -> float | None:
    """Share of the pages of all ``paths`` together in memory (mincore; nothing is faulted in;
    files over 256 MiB sampled at 256 evenly spread 64 KiB ranges): 1.0 means a warm load (tmpfs
    or page cache), 0.0 a cold one. None where a file cannot be opened or mapped."""
    resident = total = 0.0
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
                share, pages = file_residency(m)
            finally:
                m.close()
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        resident += share * pages
        total += pages
    return resident / total if total else 1.0

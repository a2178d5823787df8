"""A fixed set of page-aligned host buffers, pinned for DMA while a load runs.

The memory comes from an anonymous mmap (page-aligned, so O_DIRECT reads can
land in it) and is registered with the CUDA driver per buffer, in parallel:
registering pins and faults in the pages, which costs about as much as the
memcpy it enables, so doing it on one thread would stall the start of a load.
Everything is unregistered and unmapped by :meth:`PinnedBuffers.close`, so no
pinned memory outlives the load (torch's caching host allocator would keep it).
"""

import mmap
from concurrent.futures import ThreadPoolExecutor

import torch

from vllm_gds.errors import GdsError

PAGE = mmap.PAGESIZE


class PinnedBuffers:
    """``count`` buffers of ``size`` bytes each; ``pin=False`` gives plain host memory (CPU platform)."""

    def __init__(self, count: int, size: int, *, pin: bool, device: torch.device | None = None,
                 workers: int = 8):
        if count < 1 or size < PAGE or size % PAGE:
            raise GdsError(f"pinned buffers need count >= 1 and a size that is a multiple of {PAGE}")
        self.count, self.size = count, size
        self._map = mmap.mmap(-1, count * size)
        try:  # huge pages where the kernel offers them: fewer faults to take before pinning
            self._map.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass
        self._tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self._views = [memoryview(self._map)[i * size:(i + 1) * size] for i in range(count)]
        self._registered: list[int] = []
        self.pinned = False
        if pin:
            try:
                self._register(device, workers)
            except BaseException:
                self.close()
                raise
            self.pinned = True

    @property
    def nbytes(self) -> int:
        return self.count * self.size

    def tensor(self, index: int) -> torch.Tensor:
        return self._tensor[index * self.size:(index + 1) * self.size]

    def view(self, index: int) -> memoryview:
        return self._views[index]

    def _register(self, device: torch.device | None, workers: int) -> None:
        cudart = torch.cuda.cudart()
        base = self._tensor.data_ptr()

        def register(index: int) -> int:
            if device is not None:
                torch.cuda.set_device(device)  # the current device is per thread
            ptr = base + index * self.size
            # flags 0: pinned for the current context only (Portable would map it into all).
            return int(cudart.cudaHostRegister(ptr, self.size, 0)), ptr

        with ThreadPoolExecutor(max_workers=max(1, min(workers, self.count))) as pool:
            results = list(pool.map(register, range(self.count)))
        failed = [err for err, _ in results if err != 0]
        self._registered = [ptr for err, ptr in results if err == 0]
        if failed:
            raise GdsError(
                f"pinning {self.nbytes >> 20} MiB of host memory failed (cudaError {failed[0]}); "
                "lower num_buffers or task_size, or raise the memlock limit (ulimit -l)"
            )

    def close(self) -> None:
        if self._registered:
            cudart = torch.cuda.cudart()
            for ptr in self._registered:
                cudart.cudaHostUnregister(ptr)
            self._registered = []
        for view in self._views:
            view.release()
        self._views = []
        self._tensor = None
        try:
            self._map.close()
        except BufferError:
            pass  # a slice is still referenced somewhere; the mapping goes when it does

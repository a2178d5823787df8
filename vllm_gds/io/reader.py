"""Read byte ranges of files straight into the tensors that will hold them, through kvikio.

A read is a list of :class:`FileRead`: each names a file and the (offset,
destination tensor) pairs to fill from it. Destinations are contiguous tensors
on the GPU (cuFile/GDS where the node has it, kvikio's pinned bounce buffers
where it does not) or in host memory (the CPU platform). Every byte is
accounted for: a missing, truncated or short-read file raises ShardReadError
naming the file, and the caller installs nothing.
"""

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_gds.errors import GdsError, ShardReadError

POLICIES = ("auto", "require", "off")


@dataclass(frozen=True)
class ReadOptions:
    policy: str = "auto"  # auto: GDS where available; require: fail unless GDS; off: never GDS
    num_threads: int = 16
    task_size: int = 16 << 20

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise GdsError(f"gds policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.num_threads < 1 or self.task_size < 4096:
            raise GdsError("num_threads must be >= 1 and task_size >= 4096")


@dataclass(frozen=True)
class ReadTarget:
    file_offset: int
    dest: torch.Tensor  # contiguous; receives dest.numel() * dest.element_size() bytes


@dataclass(frozen=True)
class FileRead:
    path: Path
    targets: tuple[ReadTarget, ...]
    expected_size: int | None = None  # the file's size as the manifest records it


@dataclass
class ReadStats:
    mode: str  # "gds", "compat" (kvikio bounce buffers) or "host" (into host memory)
    nbytes: int = 0
    seconds: float = 0.0
    files: int = 0
    detail: dict = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def _kvikio():
    try:
        import kvikio
        import kvikio.cufile_driver
        import kvikio.defaults
    except ImportError as e:
        raise GdsError(
            f"kvikio is not importable ({e}); install it with `pip install vllm-gds[gpu]` "
            "(kvikio-cu13) on GPU nodes"
        ) from None
    return kvikio


def gds_available() -> bool:
    """kvikio's view: cuFile's driver is loaded and GDS (not its compat mode) would be used."""
    kvikio = _kvikio()
    try:
        return bool(kvikio.cufile_driver.get("is_gds_available")) and not (
            kvikio.defaults.is_compat_mode_preferred()
        )
    except Exception:
        return False


def resolve_mode(device: torch.device, policy: str) -> str:
    """Which path reads will take on ``device`` under ``policy``; fails early for ``require``."""
    if device.type != "cuda":
        if policy == "require":
            raise GdsError(
                "gds policy 'require': the platform is not CUDA, so GPUDirect Storage cannot be used; "
                "use policy 'auto' or 'off'"
            )
        return "host"
    if policy == "off":
        return "compat"
    available = gds_available()
    if policy == "require" and not available:
        raise GdsError(
            "gds policy 'require': GPUDirect Storage is not available on this node "
            "(run `vllm-gds doctor PATH` for the reason and the fix), "
            "or use policy 'auto' to read through kvikio's compatibility path"
        )
    return "gds" if available else "compat"


def _check_file(read: FileRead) -> None:
    try:
        size = os.stat(read.path).st_size
    except OSError as e:
        raise ShardReadError(f"cannot open shard file {read.path}: {e.strerror}; prepare the directory again") from None
    if read.expected_size is not None and size != read.expected_size:
        raise ShardReadError(
            f"shard file {read.path} is {size} bytes, the manifest says {read.expected_size}: "
            "it is truncated or was modified; prepare the directory again"
        )
    for target in read.targets:
        end = target.file_offset + target.dest.numel() * target.dest.element_size()
        if end > size:
            raise ShardReadError(
                f"shard file {read.path} ends at byte {size} but a tensor lies at "
                f"{target.file_offset}..{end}: the file is truncated; prepare the directory again"
            )


def _as_buffer(tensor: torch.Tensor):
    if not tensor.is_contiguous():
        raise ValueError("read destinations must be contiguous")
    data = tensor.reshape(-1).view(torch.uint8)
    return data if data.is_cuda else data.numpy()


def read_files(reads: list[FileRead], options: ReadOptions, device: torch.device) -> ReadStats:
    """Fill every target of ``reads``; all files are checked before the first byte is read."""
    kvikio = _kvikio()
    mode = resolve_mode(device, options.policy)
    for read in reads:
        _check_file(read)
    settings = {"num_threads": options.num_threads, "task_size": options.task_size}
    if mode != "gds":
        settings["compat_mode"] = kvikio.CompatMode.ON
    stats = ReadStats(mode=mode, files=len(reads))
    start = time.perf_counter()
    with kvikio.defaults.set(settings):
        handles, pending = [], []
        try:
            for read in reads:
                handle = kvikio.CuFile(read.path, "r")
                handles.append(handle)
                for target in read.targets:
                    nbytes = target.dest.numel() * target.dest.element_size()
                    if nbytes == 0:
                        continue
                    future = handle.pread(_as_buffer(target.dest), nbytes, target.file_offset)
                    pending.append((read.path, target.file_offset, nbytes, future))
            for path, offset, nbytes, future in pending:
                got = future.get()
                if got != nbytes:
                    raise ShardReadError(
                        f"short read from {path}: {got} of {nbytes} bytes at offset {offset}"
                    )
                stats.nbytes += nbytes
        except RuntimeError as e:
            raise ShardReadError(f"reading shard files failed: {e}") from None
        finally:
            for handle in handles:
                handle.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.seconds = time.perf_counter() - start
    return stats

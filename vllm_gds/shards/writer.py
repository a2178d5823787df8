"""Write one rank's tensors as aligned shard files and describe them for the manifest."""

import os
from pathlib import Path

import torch

from vllm_gds import checksum
from vllm_gds.shards import dtypes
from vllm_gds.shards.manifest import ALIGNMENT, RankShards, ShardFile, TensorEntry, global_rank
from vllm_gds.shards.safetensors_layout import write_file

DEFAULT_MAX_FILE_BYTES = 4 << 30


def shard_file_name(rank: int, part: int) -> str:
    return f"model-gds-rank-{rank:05d}-part-{part:03d}.safetensors"


def split_into_parts(
    named_tensors: list[tuple[str, torch.Tensor]], max_file_bytes: int
) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of at most ``max_file_bytes`` (a larger tensor gets a file of its own)."""
    parts: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if parts[-1] and size + nbytes > max_file_bytes:
            parts.append([])
            size = 0
        parts[-1].append((name, tensor))
        size += nbytes
    return [p for p in parts if p]


def write_rank(
    out_dir: str | os.PathLike,
    named_tensors: list[tuple[str, torch.Tensor]],
    *,
    tp_rank: int,
    pp_rank: int,
    tensor_parallel_size: int,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    alignment: int = ALIGNMENT,
    on_bytes_written=None,
) -> RankShards:
    """Write a rank's (name, tensor) pairs into ``out_dir``; tensors may live on any device."""
    rank = global_rank(tp_rank, pp_rank, tensor_parallel_size)
    files = []
    for part, group in enumerate(split_into_parts(named_tensors, max_file_bytes)):
        sums = [checksum.checksum_tensor(t.detach().contiguous()) for _, t in group]
        host = [(name, t.detach().to("cpu").contiguous()) for name, t in group]
        rel = shard_file_name(rank, part)
        placed, size = write_file(Path(out_dir) / rel, host, alignment)
        entries = tuple(
            TensorEntry(
                name=p.name,
                dtype=dtypes.dtype_name(t.dtype),
                shape=tuple(t.shape),
                offset=p.offset,
                nbytes=p.nbytes,
                checksum=checksum.format_checksum(int(s.item())),
            )
            for p, (_, t), s in zip(placed, host, sums)
        )
        files.append(ShardFile(path=rel, size=size, tensors=entries))
        if on_bytes_written is not None:
            on_bytes_written(sum(e.nbytes for e in entries))
    return RankShards(rank=rank, tp_rank=tp_rank, pp_rank=pp_rank, files=tuple(files))

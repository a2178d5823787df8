"""Checking a shard file's tensors against their checksums in bounded host memory (`vllm-gds inspect`)."""

import os
from pathlib import Path

import torch

from vllm_gds.errors import ChecksumError, ShardReadError, UnreadableError, os_error_message
from vllm_gds.checksum import checksum_tensor, format_checksum
from vllm_gds.shards.manifest import ShardFile

# Bytes read per step, a multiple of 4 (the checksum's word): host memory stays near 8x this.
CHUNK_BYTES = 16 << 20
_MASK = (1 << 64) - 1


def streamed_checksum(fd: int, offset: int, nbytes: int, path: Path, name: str) -> str:
    """wsum64-v1 of ``nbytes`` bytes at ``offset``, read CHUNK_BYTES at a time."""
    total, words_before, done = 0, 0, 0
    while done < nbytes:
        want = min(CHUNK_BYTES, nbytes - done)
        try:
            data = os.pread(fd, want, offset + done)
        except OSError as e:
            raise UnreadableError(os_error_message(path, e)) from None
        if len(data) != want:
            raise ShardReadError(
                f"shard file {path} ended at byte {offset + done + len(data)}, inside tensor {name!r} "
                f"(bytes {offset}..{offset + nbytes}): it was truncated or is being rewritten while read; "
                "copy it again or prepare it again"
            )
        chunk = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        partial = int(checksum_tensor(chunk))  # positions counted from this chunk's first word
        n_words = want // 4
        # Shift every unit (word, and the last chunk's tail bytes) by the words before this chunk.
        unit_sum = int(chunk[n_words * 4:].sum(dtype=torch.int64))
        if n_words:
            unit_sum += int(chunk[: n_words * 4].view(torch.int32).sum(dtype=torch.int64))
        partial += words_before * unit_sum
        total = (total + partial) & _MASK
        words_before += n_words
        done += want
    return format_checksum(total)


def verify_file_checksums(model_dir: Path, shard: ShardFile) -> None:
    path = model_dir / shard.path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise UnreadableError(os_error_message(path, e)) from None
    try:
        for entry in shard.tensors:
            got = streamed_checksum(fd, entry.offset, entry.nbytes, path, entry.name)
            if got != entry.checksum:
                raise ChecksumError(
                    f"tensor {entry.name} at byte {entry.offset} of {path}: checksum {got}, the manifest "
                    f"says {entry.checksum}; the file is damaged: copy it again or prepare it again"
                )
    finally:
        os.close(fd)

"""Safetensors files whose tensors all start at aligned file offsets.

safetensors refuses gaps between tensors, so the gaps that alignment leaves are
filled by padding tensors (uint8, named ``PADDING_PREFIX<n>``), and the JSON
header is padded with spaces so that the data starts at an aligned offset. A
plain safetensors reader opens such a file and sees the padding tensors too.
"""

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_gds.shards import dtypes

PADDING_PREFIX = "__vllm_gds_padding__."
_HEADER_LEN = struct.Struct("<Q")
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class PlacedTensor:
    name: str
    dtype: str  # manifest name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int  # absolute offset in the file
    nbytes: int


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def plan_layout(
    tensors: list[tuple[str, str, tuple[int, ...], int]], alignment: int
) -> tuple[bytes, list[PlacedTensor], int]:
    """Place (name, dtype, shape, nbytes) tensors; return (header bytes, placements, file size)."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt", "writer": "vllm-gds"}}
    relative: list[tuple[str, str, tuple[int, ...], int, int]] = []
    cursor = 0
    for i, (name, dtype, shape, nbytes) in enumerate(tensors):
        start = _align(cursor, alignment)
        if start > cursor:
            header[f"{PADDING_PREFIX}{i}"] = {
                "dtype": "U8",
                "shape": [start - cursor],
                "data_offsets": [cursor, start],
            }
        header[name] = {
            "dtype": dtypes.safetensors_code(dtype),
            "shape": list(shape),
            "data_offsets": [start, start + nbytes],
        }
        relative.append((name, dtype, shape, start, nbytes))
        cursor = start + nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    data_start = _align(_HEADER_LEN.size + len(text), alignment)
    text += b" " * (data_start - _HEADER_LEN.size - len(text))
    placed = [
        PlacedTensor(name, dtype, shape, data_start + start, nbytes)
        for name, dtype, shape, start, nbytes in relative
    ]
    return _HEADER_LEN.pack(len(text)) + text, placed, data_start + cursor


def write_file(
    path: str | os.PathLike, named_tensors: list[tuple[str, torch.Tensor]], alignment: int
) -> tuple[list[PlacedTensor], int]:
    """Write CPU tensors to ``path`` at aligned offsets; return placements and the file size."""
    specs = [
        (name, dtypes.dtype_name(t.dtype), tuple(t.shape), t.numel() * t.element_size())
        for name, t in named_tensors
    ]
    header, placed, size = plan_layout(specs, alignment)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, header, 0)
        for (_, tensor), place in zip(named_tensors, placed):
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            written = os.pwrite(fd, memoryview(data), place.offset)
            if written != place.nbytes:
                raise OSError(f"short write of {place.name} to {path}")
        os.ftruncate(fd, size)  # padding between tensors stays a sparse hole of zeros
        os.fsync(fd)
    finally:
        os.close(fd)
    return placed, size


def read_header(path: str | os.PathLike) -> tuple[int, dict]:
    """Return (data start offset, header dict) of a safetensors file; ValueError if malformed."""
    with open(path, "rb") as f:
        prefix = f.read(_HEADER_LEN.size)
        if len(prefix) != _HEADER_LEN.size:
            raise ValueError("file is shorter than a safetensors header")
        (length,) = _HEADER_LEN.unpack(prefix)
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"header length {length} is implausible")
        text = f.read(length)
    if len(text) != length:
        raise ValueError("file ends inside its safetensors header")
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return _HEADER_LEN.size + length, header


def tensor_placements(path: str | os.PathLike) -> list[PlacedTensor]:
    """The tensors of any safetensors file (padding excluded), with absolute offsets."""
    data_start, header = read_header(path)
    placed = []
    for name, info in header.items():
        if name == "__metadata__" or name.startswith(PADDING_PREFIX):
            continue
        begin, end = info["data_offsets"]
        placed.append(
            PlacedTensor(
                name=name,
                dtype=dtypes.name_from_safetensors_code(info["dtype"]),
                shape=tuple(info["shape"]),
                offset=data_start + begin,
                nbytes=end - begin,
            )
        )
    placed.sort(key=lambda p: p.offset)
    return placed

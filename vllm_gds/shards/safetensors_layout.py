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
    from vllm_gds.shards.manifest import strict_json_loads

    try:
        header = strict_json_loads(text)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
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


def check_like_safetensors(data_start: int, header: dict, file_size: int) -> None:
    """The rules safetensors' own reader applies; ValueError naming the entry that breaks one.

    Every entry a dict of a known dtype, a shape of non-negative integers and [begin, end] offsets
    whose length is the shape's bytes; the entries, sorted, tile the data area exactly (no overlap,
    no gap) up to the end of the file; padding entries are uint8 vectors of their own length.
    """
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError("__metadata__ must map strings to strings")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"entry {name!r} must have exactly dtype, shape and data_offsets")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ValueError(f"entry {name!r}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets
        ) and offsets[0] <= offsets[1]):
            raise ValueError(f"entry {name!r}: data_offsets {offsets!r} are not [begin, end] with begin <= end")
        code = info["dtype"]
        try:
            itemsize = dtypes.torch_dtype(dtypes.name_from_safetensors_code(code)).itemsize
        except (KeyError, TypeError):
            raise ValueError(f"entry {name!r}: unknown dtype {code!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * itemsize:
            raise ValueError(f"entry {name!r}: data_offsets span {offsets[1] - offsets[0]} bytes, its shape "
                             f"{shape} of {code} needs {numel * itemsize}")
        if name.startswith(PADDING_PREFIX) and (code != "U8" or len(shape) != 1):
            raise ValueError(f"padding entry {name!r} must be a U8 vector, not {code} of shape {shape}")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    cursor, previous = 0, None
    for begin, end, name in spans:
        if begin < cursor:
            raise ValueError(f"entries {previous!r} and {name!r} overlap")
        if begin > cursor:
            raise ValueError(f"bytes {cursor}..{begin} of the data lie in no entry (before {name!r})")
        cursor, previous = end, name
    if data_start + cursor != file_size:
        raise ValueError(f"the entries end at byte {data_start + cursor}, the file at byte {file_size}")

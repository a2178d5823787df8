"""Stream a plain Hugging Face safetensors directory through the read engine.

Each file's data region is read into one buffer on the target device and its
tensors are handed out as views, so that vLLM's own weight loaders shard them
where they landed. One file is held at a time.
"""

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from vllm_gds.errors import GdsError
from vllm_gds.io.reader import FileRead, ReadOptions, ReadStats, ReadTarget, read_files
from vllm_gds.shards import dtypes
from vllm_gds.shards.safetensors_layout import read_header

INDEX_NAME = "model.safetensors.index.json"


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    return sorted(model_dir.glob("*.safetensors"))


def stream_safetensors(
    files: list[Path], device: torch.device, options: ReadOptions, stats: ReadStats
) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        try:
            data_start, header = read_header(path)
        except (OSError, ValueError) as e:
            raise GdsError(f"{path} is not a readable safetensors file ({e})") from None
        size = path.stat().st_size
        buffer = torch.empty(size - data_start, dtype=torch.uint8, device=device)
        file_stats = read_files([FileRead(path, (ReadTarget(data_start, buffer),), size)], options, device)
        stats.mode = file_stats.mode
        stats.nbytes += file_stats.nbytes
        stats.seconds += file_stats.seconds
        stats.files += 1
        # The engine as the last file read it; residency over all files so far, by bytes.
        before = stats.detail.get("resident_fraction")
        now = file_stats.detail.get("resident_fraction")
        if before is not None and now is not None and stats.nbytes:
            now = (before * (stats.nbytes - file_stats.nbytes) + now * file_stats.nbytes) / stats.nbytes
        stats.detail = {**file_stats.detail, "resident_fraction": now if stats.files == 1 or before is not None else None}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            dtype = dtypes.torch_dtype(dtypes.name_from_safetensors_code(info["dtype"]))
            raw = buffer[begin:end]
            if begin % dtype.itemsize:
                raw = raw.clone()  # views must be aligned to their element size
            yield name, raw.view(dtype).reshape(info["shape"])
        del buffer

"""Install prepared tensors into a model's parameters by name: plan, then read and verify.

Everything that can be checked before reading is checked first (names, shapes,
dtypes, files), so a mismatch installs nothing. Bytes are read straight into
the parameters' storage; the reader computes checksums there, on the device,
while later reads are still in flight.
"""

from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from vllm_gds.errors import GdsError, ManifestError
from vllm_gds.io.reader import FileRead, ReadOptions, ReadStats, ReadTarget, read_files
from vllm_gds.shards import dtypes
from vllm_gds.shards.manifest import MANIFEST_NAME, RankShards


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def plan_install(model: nn.Module, model_dir: Path, shards: RankShards, verify: bool = True) -> list[FileRead]:
    """One FileRead per shard file, targeting the model's parameters; raises before any read."""
    params = dict(model.named_parameters())
    located = {entry.name: (shard, entry) for shard in shards.files for entry in shard.tensors}
    missing = sorted(params.keys() - located.keys())
    unexpected = sorted(located.keys() - params.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"the model has parameters the shards lack: {_names(missing)}")
        if unexpected:
            parts.append(f"the shards hold tensors the model lacks: {_names(unexpected)}")
        raise ManifestError(
            f"{model_dir / MANIFEST_NAME} (rank {shards.rank}): " + "; ".join(parts)
            + ". The shards were prepared for another model or vLLM build: prepare them again."
        )
    per_file: dict[str, list[ReadTarget]] = defaultdict(list)
    for name, param in params.items():
        shard, entry = located[name]
        data = param.data
        if data.device.type == "meta":
            raise GdsError(f"parameter {name} is on the meta device; online quantization is not supported by --load-format gds")
        if tuple(data.shape) != entry.shape or dtypes.dtype_name(data.dtype) != entry.dtype:
            raise ManifestError(
                f"{model_dir / shard.path}: tensor {name} is {entry.dtype}{list(entry.shape)} but the model "
                f"expects {dtypes.dtype_name(data.dtype)}{list(data.shape)}; prepare the directory again"
            )
        if not data.is_contiguous():
            raise GdsError(f"parameter {name} is not contiguous; it cannot be read into in place")
        per_file[shard.path].append(
            ReadTarget(entry.offset, data, name=name, checksum=entry.checksum if verify else None)
        )
    sizes = {shard.path: shard.size for shard in shards.files}
    return [FileRead(model_dir / rel, tuple(targets), sizes[rel]) for rel, targets in per_file.items()]


def install(
    model: nn.Module, model_dir: Path, shards: RankShards, device: torch.device,
    options: ReadOptions, verify: bool, progress_label: str | None = None,
) -> tuple[ReadStats, float, int]:
    """Read a rank's shards into ``model``; return (read stats, verify seconds, tensors installed).

    The verify seconds are those spent after the last byte landed (the rest overlaps the reads).
    With ``progress_label``, a progress bar of this rank's bytes is shown under that label.
    """
    reads = plan_install(model, model_dir, shards, verify)
    if progress_label is None:
        stats = read_files(reads, options, device)
    else:
        with tqdm(total=shards.nbytes, unit="B", unit_scale=True, desc=progress_label, mininterval=1) as bar:
            stats = read_files(reads, options, device, progress=bar.update)
    tensors = sum(len(read.targets) for read in reads)
    return stats, stats.detail.get("verify_tail_seconds", 0.0), tensors

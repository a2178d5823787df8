"""Install prepared tensors into a model's parameters by name: plan, read, verify.

Everything that can be checked before reading is checked first (names, shapes,
dtypes, files), so a mismatch installs nothing. Bytes are read straight into
the parameters' storage; checksums are computed there, on the device.
"""

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vllm_gds.errors import ChecksumError, GdsError, ManifestError
from vllm_gds.io.reader import FileRead, ReadOptions, ReadStats, ReadTarget, read_files
from vllm_gds.shards import checksum, dtypes
from vllm_gds.shards.manifest import MANIFEST_NAME, RankShards, TensorEntry


@dataclass
class InstallPlan:
    reads: list[FileRead]
    checks: list[tuple[Path, TensorEntry, torch.Tensor]]  # (file, entry, destination)


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def plan_install(model: nn.Module, model_dir: Path, shards: RankShards) -> InstallPlan:
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
    checks = []
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
        per_file[shard.path].append(ReadTarget(entry.offset, data))
        checks.append((model_dir / shard.path, entry, data))
    sizes = {shard.path: shard.size for shard in shards.files}
    reads = [FileRead(model_dir / rel, tuple(targets), sizes[rel]) for rel, targets in per_file.items()]
    return InstallPlan(reads=reads, checks=checks)


def verify_checksums(checks: list[tuple[Path, TensorEntry, torch.Tensor]]) -> float:
    """Compare each destination's checksum with the manifest's; return the seconds spent."""
    start = time.perf_counter()
    if not checks:
        return 0.0
    computed = torch.stack([checksum.checksum_tensor(dest) for _, _, dest in checks]).cpu().tolist()
    for (path, entry, _), value in zip(checks, computed):
        if checksum.format_checksum(value) != entry.checksum:
            raise ChecksumError(
                f"checksum mismatch in {path}, tensor {entry.name}: the bytes read differ from the "
                "bytes prepared (a corrupted or modified file); copy it again or prepare it again"
            )
    return time.perf_counter() - start


def install(
    model: nn.Module, model_dir: Path, shards: RankShards, device: torch.device,
    options: ReadOptions, verify: bool,
) -> tuple[ReadStats, float, int]:
    """Read a rank's shards into ``model``; return (read stats, verify seconds, tensors installed)."""
    plan = plan_install(model, model_dir, shards)
    stats = read_files(plan.reads, options, device)
    verify_seconds = verify_checksums(plan.checks) if verify else 0.0
    return stats, verify_seconds, len(plan.checks)

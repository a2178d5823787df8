"""Checks of a prepared directory that need no GPU: compatibility with the running vLLM, file integrity."""

from dataclasses import dataclass
from pathlib import Path

from vllm_gds._vllm_compat import shards_portable
from vllm_gds.errors import LayoutMismatchError, ManifestError, ShardReadError, UnreadableError, os_error_message
from vllm_gds.shards.manifest import AFTER_POST_PROCESSING, MANIFEST_NAME, Manifest, RankShards
from vllm_gds.shards.files import check_regular
from vllm_gds.shards.safetensors_layout import check_like_safetensors, read_header, tensor_placements


@dataclass(frozen=True)
class RunningSetup:
    """What the running vLLM is about to build."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    dtype: str
    quantization: str | None
    vllm_version: str
    platform: dict


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def check_compatible(manifest: Manifest, running: RunningSetup, model_dir: Path) -> None:
    """Raise LayoutMismatchError naming both sides and the fix when the shards do not fit this run."""
    where = f"{model_dir / MANIFEST_NAME}"
    prepare_again = (
        f"prepare again with `vllm-gds prepare SOURCE OUT --tensor-parallel-size "
        f"{running.tensor_parallel_size} --pipeline-parallel-size {running.pipeline_parallel_size} "
        f"--dtype {running.dtype}"
        + (f" --quantization {running.quantization}`" if running.quantization else "`")
    )
    problems = []
    if manifest.tensor_parallel_size != running.tensor_parallel_size:
        problems.append(
            f"the shards are for --tensor-parallel-size {manifest.tensor_parallel_size}, "
            f"this run uses {running.tensor_parallel_size}"
        )
    if manifest.pipeline_parallel_size != running.pipeline_parallel_size:
        problems.append(
            f"the shards are for --pipeline-parallel-size {manifest.pipeline_parallel_size}, "
            f"this run uses {running.pipeline_parallel_size}"
        )
    if manifest.dtype != running.dtype:
        problems.append(f"the shards hold dtype {manifest.dtype}, this run uses --dtype {running.dtype}")
    if (manifest.quantization or None) != (running.quantization or None):
        problems.append(
            f"the shards are quantized as {manifest.quantization or 'none'}, "
            f"this run uses quantization {running.quantization or 'none'}"
        )
    # Which versions share parameters is decided in _vllm_compat.shards_portable (0.33 and 0.34
    # do not: 0.34 changed the weight loaders and model classes the shards were captured from).
    not_portable = shards_portable(manifest.vllm_version, running.vllm_version)
    if not_portable:
        problems.append(
            f"the shards were made by vLLM {manifest.vllm_version}, this is vLLM {running.vllm_version} "
            f"({not_portable}; shards made by {_minor(manifest.vllm_version)}.x load in any "
            f"{_minor(manifest.vllm_version)}.x)"
        )
    made_on, running_on = manifest.platform.get("device_type"), running.platform.get("device_type")
    if made_on != running_on:
        problems.append(f"the shards were made on platform {made_on}, this run is on {running_on}")
    elif manifest.capture_point == AFTER_POST_PROCESSING and manifest.platform.get(
        "compute_capability"
    ) != running.platform.get("compute_capability"):
        problems.append(
            "the shards hold post-processed weights for compute capability "
            f"{manifest.platform.get('compute_capability')}, this GPU is "
            f"{running.platform.get('compute_capability')}"
        )
    if problems:
        under = f" under vLLM {running.vllm_version}" if not_portable else ""
        raise LayoutMismatchError(
            f"{where}: " + "; ".join(problems) + f". To serve this run, {prepare_again}{under}."
        )


def check_rank_files(model_dir: Path, shards: RankShards) -> None:
    """Every file of the rank exists, has the recorded size, and its header agrees with the manifest."""
    for shard in shards.files:
        path = model_dir / shard.path
        try:
            size = check_regular(path, "shard file").st_size
        except FileNotFoundError:
            raise ShardReadError(
                f"shard file {path} of rank {shards.rank} is missing; the prepared directory is "
                "incomplete: copy it again or prepare it again"
            ) from None
        if size != shard.size:
            raise ShardReadError(
                f"shard file {path} is {size} bytes, the manifest says {shard.size}: it is truncated "
                "or was modified; copy it again or prepare it again"
            )
        try:
            data_start, header = read_header(path)
            check_like_safetensors(data_start, header, size)
            placed = {p.name: p for p in tensor_placements(path)}
        except OSError as e:
            raise UnreadableError(os_error_message(path, e)) from None
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(
                f"shard file {path} has a malformed safetensors header ({e}); prepare it again"
            ) from None
        for entry in shard.tensors:
            p = placed.get(entry.name)
            if p is None or (p.offset, p.nbytes, p.dtype, tuple(p.shape)) != (
                entry.offset, entry.nbytes, entry.dtype, entry.shape
            ):
                raise ManifestError(
                    f"shard file {path}: the header and the manifest disagree about tensor "
                    f"{entry.name}; the directory is damaged: prepare it again"
                )

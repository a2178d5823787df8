"""`vllm-gds inspect OUT`: what a prepared directory holds, and whether it is intact."""

from pathlib import Path

import torch

from vllm_gds.errors import GdsError
from vllm_gds.io.cuda_driver import CudaDriverMissing
from vllm_gds.io.reader import FileRead, ReadOptions, ReadTarget, read_files
from vllm_gds.shards import dtypes
from vllm_gds.shards.manifest import MANIFEST_NAME, Manifest, RankShards, read_manifest
from vllm_gds.shards.validate import check_rank_files
from vllm_gds.units import plural

HELP = "summarize a prepared directory and check that it is intact"


def summary(manifest: Manifest, model_dir: Path) -> str:
    platform = manifest.platform.get("device_type")
    if manifest.platform.get("compute_capability"):
        platform += f" (compute capability {manifest.platform['compute_capability']})"
    lines = [
        f"{model_dir}",
        f"  layout        tensor-parallel {manifest.tensor_parallel_size} x pipeline-parallel "
        f"{manifest.pipeline_parallel_size} ({plural(manifest.world_size, 'rank')})",
        f"  dtype         {manifest.dtype}, quantization {manifest.quantization or 'none'}",
        f"  made by       vLLM {manifest.vllm_version} on {platform}, {manifest.created}",
        f"  capture point {manifest.capture_point}",
        f"  source        {manifest.source}",
        "  rank  tp  pp  files  tensors  GB",
    ]
    for r in manifest.ranks:
        tensors = sum(len(f.tensors) for f in r.files)
        lines.append(f"  {r.rank:<4}  {r.tp_rank:<2}  {r.pp_rank:<2}  {len(r.files):<5}  {tensors:<7}  {r.nbytes / 1e9:.3f}")
    total = sum(r.nbytes for r in manifest.ranks)
    lines.append(f"  total {total / 1e9:.3f} GB")
    return "\n".join(lines)


def verify_rank(model_dir: Path, shards: RankShards, with_checksums: bool) -> None:
    """Files complete and headers consistent; with checksums, every tensor read and checked (host memory)."""
    check_rank_files(model_dir, shards)
    if not with_checksums:
        return
    for shard in shards.files:
        dests = [torch.empty(e.shape, dtype=dtypes.torch_dtype(e.dtype)) for e in shard.tensors]
        targets = tuple(
            ReadTarget(e.offset, d, name=e.name, checksum=e.checksum) for e, d in zip(shard.tensors, dests)
        )
        read_files([FileRead(model_dir / shard.path, targets, shard.size)], ReadOptions(), torch.device("cpu"))


def add_arguments(parser) -> None:
    parser.add_argument("path", type=Path, help="a directory made by `vllm-gds prepare`")
    parser.add_argument("--no-checksums", action="store_true", help="check sizes and headers only")


def run(args) -> int:
    model_dir = args.path
    manifest = read_manifest(model_dir)
    print(summary(manifest, model_dir))
    problems = 0
    for shards in manifest.ranks:
        try:
            verify_rank(model_dir, shards, not args.no_checksums)
        except CudaDriverMissing:
            raise  # this machine cannot read, the files may be fine: the CLI says what to install
        except GdsError as e:
            problems += 1
            print(f"  rank {shards.rank}: DAMAGED: {e}")
    what = "sizes and headers" if args.no_checksums else "sizes, headers and checksums"
    print(f"  {what}: " + ("all ranks intact" if not problems else f"{plural(problems, 'rank')} damaged"))
    return 1 if problems else 0

"""`vllm-gds inspect OUT`: what a prepared directory holds, and whether it is intact."""

from pathlib import Path

from vllm_gds.errors import EXIT_DAMAGED, GdsError
from vllm_gds.io.cuda_driver import CudaDriverMissing
from vllm_gds.serving_files import shown, stray_manifest_problem, serving_file_problems
from vllm_gds.shards.manifest import Manifest, RankShards, read_manifest
from vllm_gds.shards.stream_verify import verify_file_checksums
from vllm_gds.shards.validate import check_rank_files
from vllm_gds.units import plural

HELP = "summarize a prepared directory and check that it is intact"


def summary(manifest: Manifest, model_dir: Path) -> str:
    """The manifest's facts; everything that comes from a file goes through shown()."""
    return "\n".join(shown(line) for line in _summary_lines(manifest, model_dir))


def _summary_lines(manifest: Manifest, model_dir: Path) -> list[str]:
    platform = str(manifest.platform.get("device_type"))
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
    return lines


def verify_rank(model_dir: Path, shards: RankShards, with_checksums: bool) -> None:
    """Files complete and headers consistent; with checksums, every tensor read and checked in
    bounded host memory (stream_verify), whatever the size of the file."""
    check_rank_files(model_dir, shards)
    if not with_checksums:
        return
    for shard in shards.files:
        verify_file_checksums(model_dir, shard)


def add_arguments(parser) -> None:
    parser.add_argument("path", type=Path, help="a directory made by `vllm-gds prepare`")
    parser.add_argument("--no-checksums", action="store_true", help="check sizes and headers only")


def run(args) -> int:
    model_dir = args.path
    manifest = read_manifest(model_dir)
    print(summary(manifest, model_dir))
    stray = stray_manifest_problem(model_dir, manifest)
    if stray:
        print(shown(f"  NOT PREPARED: {stray}"))
        return EXIT_DAMAGED
    problems, code = 0, 0
    for shards in manifest.ranks:
        try:
            verify_rank(model_dir, shards, not args.no_checksums)
        except CudaDriverMissing:
            raise  # this machine cannot read, the files may be fine: the CLI says what to install
        except GdsError as e:
            problems += 1
            code = max(code, e.exit_code)  # unreadable (3) over damaged (1)
            print(shown(f"  rank {shards.rank}: DAMAGED: {e}"))
    missing = serving_file_problems(model_dir)
    for problem in missing:
        print(shown(f"  serving files: {problem}"))
    what = "sizes, headers" if args.no_checksums else "sizes, headers, checksums"
    verdict = ("all ranks intact" if not problems else f"{plural(problems, 'rank')} damaged") + (
        ", config and tokenizer present" if not missing else f", {plural(len(missing), 'serving file problem')}"
    )
    print(f"  {what} and serving files: {verdict}")
    return code or (EXIT_DAMAGED if missing else 0)

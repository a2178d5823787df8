"""`vllm-gds prepare MODEL OUT`: its arguments; the work is vllm_gds/prepare/."""

from pathlib import Path

from vllm_gds.prepare.orchestrate import DTYPE_BYTES, QUANTIZATIONS, PrepareRequest, prepare
from vllm_gds.shards.writer import DEFAULT_MAX_FILE_BYTES

HELP = "shard a model once per parallel layout for --load-format gds"


def add_arguments(parser) -> None:
    parser.add_argument("model", type=Path, help="a local Hugging Face safetensors model directory")
    parser.add_argument("out", type=Path, help="the prepared directory to create (must not exist)")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPE_BYTES),
                        help="the dtype vLLM will serve in (as vLLM's --dtype)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                        help="quantize offline; fp8: a serialized per-tensor fp8 checkpoint")
    parser.add_argument("--max-file-gib", type=float, default=DEFAULT_MAX_FILE_BYTES / 2**30,
                        help="largest shard file per rank (default %(default)s GiB)")
    parser.add_argument("--log", type=Path, default=None, help="keep vLLM's capture log here")
    parser.add_argument("--no-kv-calibration", action="store_true",
                        help="do not write the quantized KV cache's calibration file")


def run(args) -> int:
    from vllm_gds.cli.inspect_prepared import summary
    from vllm_gds.serve_command import serve_command
    from vllm_gds.shards.manifest import read_manifest

    out = prepare(PrepareRequest(
        source=args.model, out=args.out,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        dtype=args.dtype, quantization=args.quantization,
        max_file_bytes=int(args.max_file_gib * 2**30), log=args.log,
        kv_calibration=not args.no_kv_calibration,
    ))
    manifest = read_manifest(out)
    print(summary(manifest, out))
    print(f"serve it with: {serve_command(manifest, out)}")
    return 0

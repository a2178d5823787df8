"""`python -m vllm_gds.prepare.capture`: one vLLM engine that captures every rank's parameters.

Run by `vllm-gds prepare` in a child process, whose output goes to a log file:
the engine ends with the ranks' deliberate CaptureComplete errors. Exit code 0
when every rank wrote its record. Also what prepare and the capture engine's
loader (capture_loader.py) agree on; importable without vLLM.
"""

import argparse
import sys
from pathlib import Path

CAPTURE_FORMAT = "vllm_gds_capture"


def record_name(rank: int) -> str:
    """The JSON record each rank writes beside its shard files once they are complete."""
    return f"capture-rank-{rank:05d}.json"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--capture-dir", required=True)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-file-bytes", type=int, required=True)
    args = parser.parse_args()

    from vllm import LLM

    capture_dir = Path(args.capture_dir)
    try:
        LLM(
            model=args.model,
            load_format=CAPTURE_FORMAT,
            model_loader_extra_config={
                "capture_dir": str(capture_dir),
                "max_file_bytes": args.max_file_bytes,
            },
            tensor_parallel_size=args.tensor_parallel_size,
            pipeline_parallel_size=args.pipeline_parallel_size,
            dtype=args.dtype,
            enforce_eager=True,
            max_model_len=256,
            gpu_memory_utilization=0.3,  # on CPU, the share of host memory reserved; unused here
        )
    except Exception as e:  # the expected end: every rank raised CaptureComplete
        print(f"capture engine ended: {type(e).__name__}: {e}", file=sys.stderr)
    world = args.tensor_parallel_size * args.pipeline_parallel_size
    missing = [r for r in range(world) if not (capture_dir / record_name(r)).is_file()]
    if missing:
        print(f"ranks {missing} did not capture their parameters", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

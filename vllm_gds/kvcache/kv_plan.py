"""`vllm-gds kv-plan MODEL`: how many tokens and sequences fit in the KV cache, per KV dtype.

Reads only config.json and the size of the weight files (no vLLM, no GPU). Per GPU:

    KV memory = G * utilization - weights / (TP * PP) - overhead
    bytes per token = layers / PP * ceil(KV heads / TP) * (bytes of one token's K and V per head)
    tokens = whole blocks of 16 that fit;  sequences = tokens // (blocks of L, rounded up)
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .formats import FORMATS, PLAIN_DTYPE_BYTES, kv_bytes_per_token_per_head
from .rotation import SUPPORTED_HEAD_SIZES

GIB = 1 << 30
BLOCK_SIZE = 16
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


@dataclass
class ModelShape:
    num_layers: int
    num_kv_heads: int
    head_size: int
    max_model_len: int
    weight_bytes: int


def read_shape(model_dir: Path) -> ModelShape:
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: kv-plan needs a model directory with config.json")
    cfg = json.loads(path.read_text())
    cfg = {**cfg, **cfg.get("text_config", {})}
    try:
        layers = cfg["num_hidden_layers"]
        heads = cfg["num_attention_heads"]
    except KeyError as e:
        raise ValueError(f"{path} lacks {e}: not a decoder config kv-plan understands") from None
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_size = cfg.get("head_dim") or cfg["hidden_size"] // heads
    weights = sum(
        f.stat().st_size for f in model_dir.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)
    )
    # A prepared directory keeps its ranks' files in subdirectories.
    if weights == 0:
        weights = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file()
                      and f.name.endswith(WEIGHT_SUFFIXES))
    return ModelShape(layers, kv_heads, head_size, cfg.get("max_position_embeddings", 0), weights)


def bytes_per_token(shape: ModelShape, dtype: str, tp: int = 1, pp: int = 1) -> int:
    """KV bytes one token takes on one GPU."""
    layers = math.ceil(shape.num_layers / pp)
    kv_heads = math.ceil(shape.num_kv_heads / tp)  # fewer KV heads than ranks: replicated
    return layers * kv_heads * kv_bytes_per_token_per_head(dtype, shape.head_size)


def plan(shape: ModelShape, gpu_memory_gib: float, tp: int = 1, pp: int = 1,
         max_model_len: int | None = None, utilization: float = 0.9, overhead_gib: float = 1.0):
    """Rows of (dtype, bytes per token, tokens, sequences of max_model_len) plus the KV budget."""
    length = max_model_len or shape.max_model_len or 4096
    budget = gpu_memory_gib * GIB * utilization - shape.weight_bytes / (tp * pp) - overhead_gib * GIB
    rows = []
    for dtype in list(PLAIN_DTYPE_BYTES) + list(FORMATS):
        if dtype in FORMATS and shape.head_size not in SUPPORTED_HEAD_SIZES:
            rows.append((dtype, None, None, None))
            continue
        per_token = bytes_per_token(shape, dtype, tp, pp)
        blocks = max(0, int(budget // (per_token * BLOCK_SIZE)))
        tokens = blocks * BLOCK_SIZE
        sequences = blocks // math.ceil(length / BLOCK_SIZE)
        rows.append((dtype, per_token, tokens, sequences))
    return rows, budget, length


def add_kv_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="model directory (config.json and weights)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0,
                        help="memory of one GPU in GiB (default 80, an H100)")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="sequence length for the concurrency column (default: the model's)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="vLLM's --gpu-memory-utilization (default 0.9)")
    parser.add_argument("--overhead-gib", type=float, default=1.0,
                        help="activations, CUDA graphs and the rest, per GPU (default 1)")


def run_kv_plan(args: argparse.Namespace) -> int:
    shape = read_shape(args.model)
    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    rows, budget, length = plan(shape, args.gpu_memory_gib, tp, pp, args.max_model_len,
                                args.gpu_memory_utilization, args.overhead_gib)
    print(f"{args.model.name}: {shape.num_layers} layers, {shape.num_kv_heads} KV heads, head size "
          f"{shape.head_size}; weights {shape.weight_bytes / GIB:.2f} GiB "
          f"({shape.weight_bytes / GIB / (tp * pp):.2f} GiB per GPU at TP={tp}, PP={pp})")
    print(f"KV cache per GPU: {args.gpu_memory_gib:g} GiB x {args.gpu_memory_utilization:g} - weights - "
          f"{args.overhead_gib:g} GiB overhead = {budget / GIB:.2f} GiB")
    if budget <= 0:
        print("the weights do not leave room for a KV cache: raise --tensor-parallel-size or "
              "--gpu-memory-gib")
        return 1
    base = next(r for r in rows if r[0] == "bf16")
    header = f"{'dtype':6} {'B/token/GPU':>12} {'tokens':>12} {'seqs of ' + str(length):>14} {'x bf16':>7}"
    print(header)
    print("-" * len(header))
    for dtype, per_token, tokens, seqs in rows:
        if per_token is None:
            print(f"{dtype:6} {'n/a: head size ' + str(shape.head_size) + ' unsupported':>40}")
            continue
        print(f"{dtype:6} {per_token:>12,} {tokens:>12,} {seqs:>14,} {tokens / max(base[2], 1):>6.2f}x")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-gds kv-plan", description=__doc__.splitlines()[0])
    add_kv_plan_arguments(parser)
    return run_kv_plan(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

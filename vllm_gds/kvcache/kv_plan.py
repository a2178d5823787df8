"""`vllm-gds kv-plan MODEL`: how many tokens and sequences fit in the KV cache, per KV dtype.

Reads only config.json and the size of the weight files (no vLLM, no GPU). Per GPU, sized as the
vLLM version in use sizes it (``--vllm-version``, default the installed one):

    estimate-based (0.32, 0.33; 0.34 with --no-extensible-kv-cache):
        KV memory = G * utilization - weights / (TP * PP) - overhead       (utilization 0.92)
    extensible KV cache (0.34's default on CUDA), sized from the memory measured after warmup:
        KV memory = min(G * utilization, G - margin) - weights / (TP * PP) - overhead
                                   (utilization 1.0; margin = max(1 GiB, 0.75 x overhead))
    bytes per token = layers / PP * ceil(KV heads / TP) * (bytes of one token's K and V per head)
    tokens = whole blocks that fit (16 tokens a block up to 0.33, 64 from 0.34; or --block-size)
    sequences = blocks // (blocks of L, rounded up)
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from vllm_gds import _vllm_compat

from .formats import FORMATS, PLAIN_DTYPE_BYTES, kv_bytes_per_token_per_head
from .rotation import SUPPORTED_HEAD_SIZES

GIB = 1 << 30
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


@dataclass(frozen=True)
class Sizing:
    """How one vLLM version sizes the KV cache: the knobs kv-plan resolves from the version."""

    vllm_version: str
    block_size: int
    utilization: float
    extensible: bool

    @classmethod
    def of(cls, vllm_version: str | None = None, block_size: int | None = None,
           utilization: float | None = None, extensible: bool | None = None) -> "Sizing":
        version = vllm_version or _vllm_compat.installed_vllm_version() or ".".join(
            map(str, _vllm_compat.NEWEST_MINOR))
        minor = _vllm_compat.minor_of(version)
        if minor not in _vllm_compat.SUPPORTED_MINORS:
            supported = ", ".join(f"{a}.{b}" for a, b in _vllm_compat.SUPPORTED_MINORS)
            raise ValueError(f"--vllm-version {version}: kv-plan knows vLLM {supported}")
        can_extend = _vllm_compat.has_extensible_kv_cache(minor)
        if extensible and not can_extend:
            raise ValueError(f"vLLM {version} has no extensible KV cache (it came with 0.34)")
        extensible = can_extend if extensible is None else extensible
        return cls(
            vllm_version=version,
            block_size=block_size or _vllm_compat.default_block_size(minor),
            utilization=(utilization if utilization is not None
                         else _vllm_compat.default_gpu_memory_utilization(minor, extensible)),
            extensible=extensible,
        )


def kv_budget(shape: ModelShape, gpu_memory_gib: float, tp: int, pp: int, sizing: Sizing,
              overhead_gib: float) -> float:
    """Bytes of KV cache one GPU gets (see the module's docstring for both sizing modes)."""
    usable = gpu_memory_gib * GIB * sizing.utilization
    if sizing.extensible:
        margin = max(_vllm_compat.EXTENSIBLE_MARGIN_FLOOR_GIB,
                     _vllm_compat.EXTENSIBLE_MARGIN_FRACTION * overhead_gib)
        usable = min(usable, (gpu_memory_gib - margin) * GIB)
    return usable - shape.weight_bytes / (tp * pp) - overhead_gib * GIB


def plan(shape: ModelShape, gpu_memory_gib: float, tp: int = 1, pp: int = 1,
         max_model_len: int | None = None, utilization: float | None = None,
         overhead_gib: float = 1.0, sizing: Sizing | None = None):
    """Rows of (dtype, bytes per token, tokens, sequences of max_model_len) plus the KV budget.

    sizing: the vLLM version's block size and memory rule (default: the installed vLLM's);
    utilization, where given, overrides its --gpu-memory-utilization."""
    sizing = sizing or Sizing.of()
    if utilization is not None:
        sizing = replace(sizing, utilization=utilization)
    block = sizing.block_size
    length = max_model_len or shape.max_model_len or 4096
    budget = kv_budget(shape, gpu_memory_gib, tp, pp, sizing, overhead_gib)
    rows = []
    for dtype in list(PLAIN_DTYPE_BYTES) + list(FORMATS):
        if dtype in FORMATS and shape.head_size not in SUPPORTED_HEAD_SIZES:
            rows.append((dtype, None, None, None))
            continue
        per_token = bytes_per_token(shape, dtype, tp, pp)
        blocks = max(0, int(budget // (per_token * block)))
        tokens = blocks * block
        sequences = blocks // math.ceil(length / block)
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
    parser.add_argument("--vllm-version", default=None,
                        help="size the cache as this vLLM does (default: the installed vLLM, "
                             "else the newest supported)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="vLLM's --block-size (default: the version's, 16 up to 0.33, 64 from 0.34)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="vLLM's --gpu-memory-utilization (default: the version's, 0.92; "
                             "1.0 under 0.34's extensible KV cache)")
    parser.add_argument("--no-extensible-kv-cache", dest="extensible", action="store_false",
                        default=None,
                        help="0.34 with --no-enable-extensible-kv-cache (estimate-based sizing, "
                             "as on 0.33)")
    parser.add_argument("--overhead-gib", type=float, default=1.0,
                        help="activations, CUDA graphs and the rest, per GPU (default 1)")


def run_kv_plan(args: argparse.Namespace) -> int:
    shape = read_shape(args.model)
    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    try:
        sizing = Sizing.of(args.vllm_version, args.block_size, args.gpu_memory_utilization,
                           args.extensible)
    except ValueError as e:
        print(f"vllm-gds kv-plan: {e}")
        return 2
    rows, budget, length = plan(shape, args.gpu_memory_gib, tp, pp, args.max_model_len,
                                overhead_gib=args.overhead_gib, sizing=sizing)
    print(f"{args.model.name}: {shape.num_layers} layers, {shape.num_kv_heads} KV heads, head size "
          f"{shape.head_size}; weights {shape.weight_bytes / GIB:.2f} GiB "
          f"({shape.weight_bytes / GIB / (tp * pp):.2f} GiB per GPU at TP={tp}, PP={pp})")
    memory = f"{args.gpu_memory_gib:g} GiB x {sizing.utilization:g}"
    if sizing.extensible:
        memory = f"min({memory}, {args.gpu_memory_gib:g} GiB - margin)"
    print(f"vLLM {sizing.vllm_version}: block size {sizing.block_size}, "
          + ("extensible KV cache (sized from memory measured after warmup)" if sizing.extensible
             else "KV cache sized from the profiling estimate"))
    print(f"KV cache per GPU: {memory} - weights - {args.overhead_gib:g} GiB overhead "
          f"= {budget / GIB:.2f} GiB")
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

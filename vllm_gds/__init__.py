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

    # Process 0 (the API server) makes the run's shared directory before vLLM starts the engine
    # core and the workers: the loader leaves its reports (for /metrics) and failures there, and
    # process 0 prints any failure again when it exits, after vLLM's tracebacks.
    from vllm_gds import run_dir

    shared = run_dir.claim()
    if shared is not None:
        import atexit

        from vllm_gds.loader.failures import print_recorded

        atexit.register(print_recorded, shared)  # runs before claim()'s removal (atexit is LIFO)

    from vllm_gds.loader.model_loader import register_loaders

    register_loaders()

    # The quantized KV cache dtypes (tq4, ...) and their attention backend: vLLM 0.33/0.34 hooks; a
    # no-op on builds without them (vLLM 0.32, the CPU build).
    from vllm_gds.kvcache.registration import register as register_kv_cache

    register_kv_cache()

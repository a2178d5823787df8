"""Register the quantized KV cache dtypes and attention backend with vLLM (0.33 and 0.34 hooks).

``--kv-cache-dtype tq4`` (or another name of formats.FORMATS) is accepted once the dtype is
registered; ``--attention-backend CUSTOM`` selects the backend (vLLM never auto-selects a CUSTOM
backend). On vLLM builds without ``register_kv_cache_dtype`` (0.32, the CPU build) this does
nothing: the quantized cache needs vLLM 0.33 or 0.34 and a GPU.
"""

from __future__ import annotations

BACKEND_PATH = "vllm_gds.kvcache.backend.TQAttentionBackend"


def _handler(name: str, custom_mode):
    import torch

    class Handler:
        """vLLM's KVCacheDTypeHandler for one format: uint8 storage, backend-managed kernels."""

        def torch_dtype(self):
            return torch.uint8

        def quant_mode(self):
            # vLLM 0.33 and 0.34 define KVQuantMode.CUSTOM = 12, an alias of OCTAVE_K3V4: the spec's
            # mode reads as "octave" and cannot tell our formats apart, so the backend reads
            # the format name from the cache config instead (backend.customize_spec).
            return custom_mode

    Handler.name = name
    Handler.__name__ = Handler.__qualname__ = f"VllmGds_{name}_Handler"
    return Handler


def register() -> bool:
    """Register every format and the backend; False (and no change) where vLLM lacks the hooks."""
    try:
        from vllm.config.cache import get_kv_cache_dtype_handler, register_kv_cache_dtype
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
        from vllm.v1.kv_cache_interface import KVQuantMode
    except ImportError:
        return False
    custom = getattr(KVQuantMode, "CUSTOM", None)
    if custom is None:
        return False
    from .formats import FORMATS

    for name in FORMATS:
        if get_kv_cache_dtype_handler(name) is None:  # idempotent: register() runs many times
            register_kv_cache_dtype(name)(_handler(name, custom))
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    return True

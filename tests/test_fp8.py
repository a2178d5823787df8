"""fp8 weights pass through quantize -> prepare (vLLM's own weight loaders) -> manifest -> reader unchanged.

vLLM's CPU build cannot run fp8 linear layers, so serving fp8 is not tested here.
"""

import json

import torch
from safetensors.torch import load_file

from vllm_gds.loader.parameters import install
from vllm_gds.io.reader import ReadOptions
from vllm_gds.prepare.fp8 import FP8_DTYPE, QUANTIZATION_CONFIG, quantize_checkpoint
from vllm_gds.shards.manifest import read_manifest
from test_loader_errors import _module_for


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_fp8_bytes_pass_through_unchanged(tiny_model, prepared_tiny_fp8, tmp_path):
    manifest = read_manifest(prepared_tiny_fp8)
    assert manifest.quantization == "fp8" and manifest.dtype == "bfloat16"
    config = json.loads((prepared_tiny_fp8 / "config.json").read_text())
    assert config["quantization_config"] == QUANTIZATION_CONFIG

    quantized = load_file(quantize_checkpoint(tiny_model, tmp_path / "fp8") / "model.safetensors")
    shards = manifest.ranks[0]
    module = _module_for(shards)
    install(module, prepared_tiny_fp8, shards, torch.device("cpu"), ReadOptions(), verify=True)
    params = dict(module.named_parameters())

    for layer in range(2):
        prefix = f"model.layers.{layer}"
        qkv = params[f"{prefix}.self_attn.qkv_proj.weight"]
        assert qkv.dtype == FP8_DTYPE
        expected = torch.cat([quantized[f"{prefix}.self_attn.{p}_proj.weight"] for p in "qkv"])
        assert torch.equal(_bytes(qkv), _bytes(expected))
        scales = params[f"{prefix}.self_attn.qkv_proj.weight_scale"]
        expected_scales = torch.stack([quantized[f"{prefix}.self_attn.{p}_proj.weight_scale"] for p in "qkv"])
        assert torch.equal(scales, expected_scales)
        down = params[f"{prefix}.mlp.down_proj.weight"]
        assert torch.equal(_bytes(down), _bytes(quantized[f"{prefix}.mlp.down_proj.weight"]))


def test_fp8_quantization_is_close_to_the_weights(tiny_model, tmp_path):
    original = load_file(tiny_model / "model.safetensors")
    quantized = load_file(quantize_checkpoint(tiny_model, tmp_path / "fp8") / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    restored = quantized[name].float() * quantized[name + "_scale"]
    w = original[name].float()
    assert quantized[name].dtype == FP8_DTYPE
    # e4m3 keeps 3 mantissa bits: relative error per element at most 2^-4 above the subnormal range.
    assert ((restored - w).abs() <= w.abs() / 16 + quantized[name + "_scale"] * 2**-6).all()
    assert quantized["model.embed_tokens.weight"].dtype == original["model.embed_tokens.weight"].dtype

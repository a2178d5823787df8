"""Offline fp8 quantization into vLLM's serialized-fp8 checkpoint form.

Every linear projection weight of the decoder layers becomes float8_e4m3fn with
one float32 scale per tensor (``<name>_scale``, i.e. ``weight_scale``);
activations stay dynamic. config.json gets vLLM's own
``{"quant_method": "fp8", "activation_scheme": "dynamic"}``, so vLLM loads the
result as a serialized fp8 checkpoint and never quantizes at load time.
Embeddings, norms and the LM head stay in their original dtype, as vLLM's fp8
method leaves them.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from vllm_gds.loader.hf_stream import INDEX_NAME, safetensors_files

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
# Linear projections of Llama-, Mistral- and Qwen-style decoder layers.
LINEAR_SUFFIXES = tuple(
    f"{proj}.weight" for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
)
QUANTIZATION_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic"}


def quantize_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor symmetric fp8: returns (fp8 weight, float32 scale) with weight ~= fp8 * scale."""
    w = weight.float()
    scale = (w.abs().max() / FP8_MAX).clamp(min=1e-12)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale.reshape(())


def quantize_checkpoint(source: Path, dest: Path) -> Path:
    """Write ``source`` (a HF safetensors directory) as a serialized fp8 checkpoint in ``dest``."""
    config = json.loads((source / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{source / 'config.json'} is already quantized ({config['quantization_config']}); "
                         "prepare it without --quantization")
    dest.mkdir(parents=True, exist_ok=True)
    files = safetensors_files(source)
    if not files:
        raise ValueError(f"{source} has no *.safetensors files to quantize")
    quantized = 0
    for path in tqdm(files, desc="quantizing to fp8", unit="file"):
        out = {}
        for name, tensor in load_file(path).items():
            if name.endswith(LINEAR_SUFFIXES) and tensor.dim() == 2:
                out[name], out[name + "_scale"] = quantize_tensor(tensor)
                quantized += 1
            else:
                out[name] = tensor
        save_file(out, dest / path.name, metadata={"format": "pt"})
    if quantized == 0:
        raise ValueError(f"{source}: no linear projection weights found to quantize "
                         f"(looked for names ending in {', '.join(LINEAR_SUFFIXES)})")
    index = source / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        for name in list(weight_map):
            if name.endswith(LINEAR_SUFFIXES):
                weight_map[name + "_scale"] = weight_map[name]
        (dest / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    for other in source.iterdir():
        if other.is_file() and not (dest / other.name).exists() and other.suffix != ".safetensors":
            shutil.copy2(other, dest / other.name)
    return dest

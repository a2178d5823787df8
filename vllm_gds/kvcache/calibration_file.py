"""The KV calibration file beside a model, and the rules that turn its statistics into transforms.

Two files in the model directory:
    kv-calibration.safetensors   float32 tensors, L layers, H KV heads, head size d:
        key_mean [L, H, d]     mean of post-RoPE keys
        key_var [L, H, d]      variance of post-RoPE keys around key_mean
        query_ms [L, H, d]     mean square of post-RoPE queries (over the query heads of each KV head)
        value_mean [L, H, d]   mean of values
        value_var [L, H, d]    variance of values
        key_absmax [L], value_absmax [L]   largest |key| and |value| (per-tensor FP8 scales)
    kv-calibration.json          what made it: model, text, tokens, date, format version

Subtracting a fixed vector from every key shifts all scores of a query by the same constant, and
a fixed per-channel key scale can be moved onto the query, so both are exact for attention;
subtracting a fixed vector from every value shifts the output by that vector (softmax weights
sum to one), also exact.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("vllm_gds.kvcache")

TENSORS_NAME = "kv-calibration.safetensors"
META_NAME = "kv-calibration.json"
FORMAT_VERSION = 1
STAT_NAMES = ("key_mean", "key_var", "query_ms", "value_mean", "value_var")
SCALE_FLOOR = 1e-2  # relative to the largest channel scale of the head: no channel is amplified >100x


@dataclass
class Calibration:
    key_mean: torch.Tensor
    key_var: torch.Tensor
    query_ms: torch.Tensor
    value_mean: torch.Tensor
    value_var: torch.Tensor
    key_absmax: torch.Tensor
    value_absmax: torch.Tensor
    meta: dict

    @property
    def num_layers(self) -> int:
        return self.key_mean.shape[0]

    def key_transform(self, layer: int, rule: str):
        """(mean, scale) [H, d] for keys of ``layer`` under ``rule`` (formats.KEY_CALIBRATIONS)."""
        if rule == "none":
            return None, None
        mean = self.key_mean[layer]
        if rule == "mean":
            return mean, None
        if rule == "mean_std":
            scale = self.key_var[layer].sqrt()
        elif rule == "mean_balanced":
            # Minimises the expected score error of an isotropic quantizer in the scaled space:
            # E[(q.e)^2] ~ (sum_c var_c / s_c^2) (sum_c E[q_c^2] s_c^2), least at s_c^4 = var_c / E[q_c^2].
            scale = (self.key_var[layer] / self.query_ms[layer].clamp_min(1e-12)).pow(0.25)
        else:
            raise ValueError(f"unknown key calibration rule {rule!r}")
        scale = scale.clamp_min(SCALE_FLOOR * scale.amax(-1, keepdim=True)).clamp_min(1e-12)
        # Only relative scales matter (each vector is normalised): make each head's geometric mean 1.
        scale = scale / scale.log().mean(-1, keepdim=True).exp()
        return mean, scale

    def value_transform(self, layer: int, rule: str):
        return None if rule == "none" else self.value_mean[layer]


def save_calibration(model_dir: Path, stats: dict[str, torch.Tensor], meta: dict) -> Path:
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    tensors = {k: v.float().contiguous() for k, v in stats.items()}
    missing = set(STAT_NAMES + ("key_absmax", "value_absmax")) - set(tensors)
    if missing:
        raise ValueError(f"calibration statistics missing: {sorted(missing)}")
    meta = {"format_version": FORMAT_VERSION, **meta}
    path = model_dir / TENSORS_NAME
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
    tmp.replace(path)
    (model_dir / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_calibration(model_dir: Path, warn: bool = True) -> Calibration | None:
    """The model's calibration, or None (with a warning naming the command that makes it)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    path = model_dir / TENSORS_NAME
    if not path.is_file():
        if warn:
            logger.warning(
                "no KV cache calibration in %s: the quantized KV cache runs uncalibrated, at "
                "lower quality. Make it once with: vllm-gds calibrate %s", model_dir, model_dir
            )
        return None
    tensors = load_file(str(path))
    meta_path = model_dir / META_NAME
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    version = meta.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has calibration format {version}, this vllm-gds reads {FORMAT_VERSION}: "
            f"run `vllm-gds calibrate {model_dir}` again"
        )
    try:
        return Calibration(**{k: tensors[k] for k in STAT_NAMES + ("key_absmax", "value_absmax")},
                           meta=meta)
    except KeyError as e:
        raise ValueError(
            f"{path} lacks tensor {e}: run `vllm-gds calibrate {model_dir}` again"
        ) from None

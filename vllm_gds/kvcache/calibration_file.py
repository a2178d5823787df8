"""The KV calibration file beside a model, and the rules that turn its statistics into transforms.

Two files in the model directory:
    kv-calibration.stats         float32 tensors in safetensors format (named so that no loader
                                 takes it for weights), L layers, H KV heads, head size d:
        key_mean [L, H, d]     mean of keys before RoPE
        key_var [L, H, d]      variance of keys before RoPE around key_mean
        query_ms [L, H, d]     mean square of queries before RoPE (over the query heads of each KV head)
        value_mean [L, H, d]   mean of values
        value_var [L, H, d]    variance of values
        key_absmax [L], value_absmax [L]   largest |key| (after RoPE) and |value|: per-tensor FP8 scales
        rope_inv_freq [r/2]    the model's RoPE frequencies (float32), r = rotary dims
    kv-calibration.json          what made it: model, text, tokens, date, format version, RoPE style
                                 and attention scaling

The cache subtracts RoPE_p(key_mean) from the (post-RoPE) key at position p: post-RoPE keys
have a large mean that rotates with the position, which no fixed post-RoPE vector removes. The
score of that key gets q . RoPE_p(key_mean) back exactly (tests/kv_reference.py). A fixed per-channel key
scale, equal on the two channels of each RoPE pair (so it commutes with RoPE), moves onto the
query. Subtracting a fixed vector from every value shifts the output by that vector (softmax
weights sum to one). All exact for attention.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("vllm.vllm_gds.kvcache")  # under "vllm": vLLM's handlers print it

# Not *.safetensors: vLLM's loaders (and hf_stream) read every *.safetensors of an unindexed model
# directory as weights.
TENSORS_NAME = "kv-calibration.stats"
LEGACY_TENSORS_NAME = "kv-calibration.safetensors"
META_NAME = "kv-calibration.json"
FORMAT_VERSION = 2
STAT_NAMES = ("key_mean", "key_var", "query_ms", "value_mean", "value_var")
EXTRA_NAMES = ("key_absmax", "value_absmax", "rope_inv_freq")
SCALE_FLOOR = 1e-2  # relative to the largest channel scale of the head: no channel is amplified >100x


def top_pairs(mean: torch.Tensor, scale: torch.Tensor | None, share: float, half: int,
              least: int = 16) -> torch.Tensor:
    """The key mean [..., d] on the round(share * half) RoPE pairs (i, i + half), at least
    ``least``, of most energy |mu|^2 / s^2 per head, zero on the other pairs; channels past the
    rotary ones are kept (formats.KVFormat.key_mean_pairs)."""
    keep = min(half, max(least, round(share * half)))
    if keep >= half:
        return mean
    w = mean[..., : 2 * half] ** 2
    if scale is not None:
        w = w / scale[..., : 2 * half] ** 2
    energy = w[..., :half] + w[..., half:]
    chosen = torch.zeros_like(energy, dtype=torch.bool)
    chosen.scatter_(-1, energy.topk(keep, dim=-1).indices, True)
    on = torch.cat([chosen, chosen, torch.ones_like(mean[..., 2 * half :], dtype=torch.bool)], -1)
    return torch.where(on, mean, torch.zeros_like(mean))


@dataclass
class Calibration:
    key_mean: torch.Tensor
    key_var: torch.Tensor
    query_ms: torch.Tensor
    value_mean: torch.Tensor
    value_var: torch.Tensor
    key_absmax: torch.Tensor
    value_absmax: torch.Tensor
    rope_inv_freq: torch.Tensor
    meta: dict

    @property
    def rope_attention_scaling(self) -> float:
        return float(self.meta.get("rope_attention_scaling", 1.0))

    @property
    def num_layers(self) -> int:
        return self.key_mean.shape[0]

    def key_transform(self, layer: int, rule: str, mean_pairs: float = 1.0):
        """(mean, scale) [H, d] for keys of ``layer`` under ``rule`` (formats.KEY_CALIBRATIONS),
        the mean kept on the share ``mean_pairs`` of RoPE pairs (formats.KVFormat.key_mean_pairs)."""
        if rule == "none":
            return None, None
        mean = self.key_mean[layer]
        if rule == "mean":
            return top_pairs(mean, None, mean_pairs, self.rope_inv_freq.shape[-1]), None
        mean, scale = self._balanced(mean, layer, rule)
        return top_pairs(mean, scale, mean_pairs, self.rope_inv_freq.shape[-1]), scale

    def _balanced(self, mean, layer: int, rule: str):
        var, qms = self._pair_mean(self.key_var[layer]), self._pair_mean(self.query_ms[layer])
        if rule == "mean_std":
            scale = var.sqrt()
        elif rule == "mean_balanced":
            # Minimises the expected score error of an isotropic quantizer in the scaled space:
            # E[(q.e)^2] ~ (sum_c var_c / s_c^2) (sum_c E[q_c^2] s_c^2), least at s_c^4 = var_c / E[q_c^2].
            scale = (var / qms.clamp_min(1e-12)).pow(0.25)
        else:
            raise ValueError(f"unknown key calibration rule {rule!r}")
        scale = scale.clamp_min(SCALE_FLOOR * scale.amax(-1, keepdim=True)).clamp_min(1e-12)
        # Only relative scales matter (each vector is normalised): make each head's geometric mean 1.
        scale = scale / scale.log().mean(-1, keepdim=True).exp()
        return mean, scale

    def _pair_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Average the two channels of each RoPE pair (i, i + r/2): a pair-equal scale commutes
        with RoPE."""
        half = self.rope_inv_freq.shape[-1]
        a, b = x[..., :half], x[..., half : 2 * half]
        m = (a + b) / 2
        return torch.cat([m, m, x[..., 2 * half :]], -1)

    def value_transform(self, layer: int, rule: str):
        return None if rule == "none" else self.value_mean[layer]


def save_calibration(model_dir: Path, stats: dict[str, torch.Tensor], meta: dict) -> Path:
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float().contiguous() for k, v in stats.items()}
    missing = set(STAT_NAMES + EXTRA_NAMES) - set(tensors)
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
    legacy = model_dir / LEGACY_TENSORS_NAME
    if not path.is_file() and legacy.is_file():
        logger.warning(
            "%s is the old name of the KV calibration: vLLM's loaders take it for weights in a "
            "directory without a safetensors index. Rename it to %s (or run vllm-gds calibrate "
            "again); read for now", legacy, TENSORS_NAME,
        )
        path = legacy
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
        return Calibration(**{k: tensors[k] for k in STAT_NAMES + EXTRA_NAMES}, meta=meta)
    except KeyError as e:
        raise ValueError(
            f"{path} lacks tensor {e}: run `vllm-gds calibrate {model_dir}` again"
        ) from None

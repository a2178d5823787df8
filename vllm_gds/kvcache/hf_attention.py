"""Run a Hugging Face causal LM with a function in place of its attention, to see K and V.

``use_kv_hook(model, hook)`` makes every attention layer of ``model`` call
``hook(layer_idx, query, key, value, scaling)`` with post-RoPE tensors ``query`` [b, H, T, d] and
``key``/``value`` [b, H_kv, T, d]; the hook returns the attention output [b, H, T, d]. Used by
calibration (to record statistics) and by the quality benchmark (to quantize K and V).

One full-sequence causal forward whose layers quantize every key and value vector before attention
is exactly a decode that writes each token's K and V to a quantized cache and then attends over the
whole cache, itself included: every query sees the quantized K and V of all earlier tokens and its
own, and nothing else.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

ATTENTION_NAME = "vllm_gds_kv_hook"
_hooks: dict[int, object] = {}


def causal_attention(query, key, value, scaling):
    """Plain causal attention (grouped-query aware); returns [b, H, T, d]."""
    return F.scaled_dot_product_attention(
        query, key.to(query.dtype), value.to(query.dtype), is_causal=True, scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if query.shape[2] != key.shape[2]:
        raise RuntimeError("the KV hook runs full-sequence forwards only (use_cache=False)")
    hook = _hooks.get(id(module.config))
    layer = module.layer_idx
    out = causal_attention(query, key, value, scaling) if hook is None else hook(
        layer, query, key, value, scaling
    )
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _attention)


@contextmanager
def use_kv_hook(model, hook):
    """Route ``model``'s attention through ``hook`` inside the ``with`` block."""
    _register()
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    _hooks[id(config)] = hook
    try:
        yield model
    finally:
        _hooks.pop(id(config), None)
        config._attn_implementation = previous


def load_causal_lm(model_dir, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()

"""Test only: the quantized-cache backend (vllm_gds/kvcache/backend.py) over vLLM 0.32 CPU's
attention slot, with its Triton kernels interpreted.

The CPU build can neither select a new --kv-cache-dtype nor a backend, so the engine runs with
``kv_cache_dtype="auto"`` and ``install(fmt)`` registers this subclass over ``CPU_ATTN`` in the
engine's own process (run it with VLLM_ENABLE_V1_MULTIPROCESSING=0). The subclass changes only
what the missing dtype name would have given: the format (from ``install``, not the cache config)
and a uint8 page of the format's slot bytes. Stores, attention, calibration and tables are the
backend's own.

It also records, for every stored token, the key and value vLLM passed in and the slot bytes the
store kernel wrote (``captured_sequences``), so that a test can check the store and run the
reference over exactly the cache that vLLM attended to.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import replace

import torch

from vllm_gds.kvcache.backend import TQAttentionBackend, TQAttentionImpl, _layer_index
from vllm_gds.kvcache.formats import get_format

FORMAT_ENV = "VLLM_GDS_TEST_KV_FORMAT"

# (layer, sequence, position) -> (stored slot bytes [H, S], key [H, d], value [H, d]). A sequence
# is named by the first block of its block-table row: fixed for the request's lifetime.
_stored: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _format_name() -> str:
    return get_format(os.environ[FORMAT_ENV]).name


class CPUTQAttentionBackend(TQAttentionBackend):
    supported_kv_cache_dtypes = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # the slot it sits in (vLLM maps layers to backends by this name)

    @staticmethod
    def get_impl_cls() -> type["CPUTQAttentionImpl"]:
        return CPUTQAttentionImpl

    @classmethod
    def supports_combination(cls, head_size, dtype, kv_cache_dtype, *args):
        return super().supports_combination(head_size, dtype, _format_name(), *args)

    @classmethod
    def customize_spec(cls, spec):
        if spec.state_content_bytes is not None:
            return spec
        return replace(spec, dtype=torch.uint8,
                       state_content_bytes=get_format(_format_name()).slot_bytes(spec.head_size))


class CPUTQAttentionImpl(TQAttentionImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None,
                 sliding_window=None, kv_cache_dtype="auto", *args, **kwargs):
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         _format_name(), *args, **kwargs)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        _record(layer, key, value, kv_cache, slot_mapping)


def _token_owners(meta, n: int) -> list[tuple[int, int]]:
    """(sequence, position) of each of the step's first n tokens, from the step's metadata."""
    starts = meta.query_start_loc.tolist()
    owners = []
    for row, seq_len in enumerate(meta.seq_lens.tolist()):
        q_len = starts[row + 1] - starts[row]
        seq = int(meta.block_table[row, 0])
        owners += [(seq, seq_len - q_len + i) for i in range(q_len)]
    return owners[:n]


def _record(layer, key, value, kv_cache, slot_mapping) -> None:
    from vllm.forward_context import get_forward_context

    meta = get_forward_context().attn_metadata[layer.layer_name]
    n = slot_mapping.shape[0]
    index = _layer_index(layer.layer_name)
    pages = kv_cache.transpose(1, 2)  # [blocks, page, H, slot bytes]
    page = pages.shape[1]
    h = pages.shape[2]
    for t, (seq, pos) in enumerate(_token_owners(meta, n)):
        slot = int(slot_mapping[t])
        if slot < 0:
            continue
        if (index, seq, pos) in _stored:
            raise RuntimeError("a sequence stored one position twice: requests reused blocks; "
                               "start every request of the run at once")
        _stored[index, seq, pos] = (pages[slot // page, slot % page].clone(),
                                    key[t].view(h, -1).clone(), value[t].view(h, -1).clone())


def captured_sequences() -> list[dict[str, torch.Tensor]]:
    """Every sequence's stored cache in position order: ``slots`` uint8 [layers, n, H, S] and the
    ``key`` and ``value`` vLLM stored, [layers, n, H, d]."""
    by_seq = defaultdict(dict)
    for (layer, seq, pos), record in _stored.items():
        by_seq[seq][layer, pos] = record
    out = []
    for records in by_seq.values():
        layers = 1 + max(layer for layer, _ in records)
        n = 1 + max(pos for _, pos in records)
        if len(records) != layers * n:
            raise RuntimeError("a sequence's cache was not stored at every layer and position")
        out.append({name: torch.stack([torch.stack([records[layer, pos][i] for pos in range(n)])
                                       for layer in range(layers)])
                    for i, name in enumerate(("slots", "key", "value"))})
    return out


def install(fmt: str) -> None:
    """Put the backend over the CPU attention slot of this process (before the engine starts)."""
    os.environ[FORMAT_ENV] = get_format(fmt).name
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.CPUTQAttentionBackend")

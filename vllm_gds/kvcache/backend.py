"""The vLLM 0.33/0.34 attention backend of the quantized KV cache (``--kv-cache-dtype tq4
--attention-backend CUSTOM``).

Cache: one uint8 slot per (token, KV head) in vLLM's paged cache, laid out as formats.py says
(``customize_spec`` sets the slot size). vLLM calls ``do_kv_cache_update`` before ``forward``:
the store kernel quantizes the new keys and values into their slots, then the attention kernel
reads everything, the current chunk included, from the quantized cache (kernels/tq_attention.py).

CUDA graphs: pure decode batches only (AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE). The decode
launch depends on the batch size alone (the split count never on sequence lengths) and its
scratch comes from the graph's memory pool; prefill and mixed batches run eagerly.

Supported: decoder self-attention, head sizes 64, 128 and 256, no MLA, sliding window, ALiBi,
logit soft-capping or attention sinks. Anything else fails at start-up with a message that
says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from .formats import FORMATS, get_format
from .rotation import SUPPORTED_HEAD_SIZES

logger = logging.getLogger("vllm.vllm_gds.kvcache")  # under "vllm": vLLM's handlers print it

ROTATION_SEED = 0  # the seed of every layer's rotation signs in the served cache
SUPPORTED = (
    f"the vllm-gds quantized KV cache ({', '.join(FORMATS)}) supports decoder self-attention "
    f"with head sizes {', '.join(map(str, SUPPORTED_HEAD_SIZES))}; no MLA, sliding window, "
    f"ALiBi, logit soft-capping or attention sinks"
)


def _current_format_name() -> str | None:
    name = get_current_vllm_config().cache_config.cache_dtype
    return name if name in FORMATS else None


class TQAttentionBackend(AttentionBackend):
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(FORMATS)

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # the registry slot it is registered in

    @staticmethod
    def get_impl_cls() -> type["TQAttentionImpl"]:
        return TQAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["TQMetadataBuilder"]:
        return TQMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBNHC,)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_SIZES)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_combination(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla,
                             has_sink, use_sparse, use_mm_prefix, device_capability):
        if kv_cache_dtype not in FORMATS or head_size not in SUPPORTED_HEAD_SIZES or use_mla \
                or has_sink or use_sparse:
            return (f"{SUPPORTED} (got kv-cache-dtype {kv_cache_dtype}, head size {head_size}"
                    f"{', MLA' if use_mla else ''}{', sinks' if has_sink else ''})")
        return None

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """One slot of the format's bytes per (token, KV head).

        The spec's kv_quant_mode cannot tell the formats apart (each is KVQuantMode.CUSTOM, which
        vLLM 0.33 and 0.34 alias to OCTAVE_K3V4), so the format comes from the current cache config."""
        name = _current_format_name()
        if spec.state_content_bytes is not None or name is None:
            return spec
        if spec.head_size not in SUPPORTED_HEAD_SIZES or spec.head_size_v != spec.head_size:
            raise ValueError(f"{SUPPORTED}; this model has head size {spec.head_size}"
                             f"/{spec.head_size_v} (keys/values)")
        return replace(spec, state_content_bytes=get_format(name).slot_bytes(spec.head_size))


@dataclass
class TQMetadata(AttentionMetadata):
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int


class TQMetadataBuilder(AttentionMetadataBuilder[TQMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    )

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TQMetadata:
        cam = common_attn_metadata
        return TQMetadata(
            seq_lens=cam.seq_lens, query_start_loc=cam.query_start_loc,
            block_table=cam.block_table_tensor, slot_mapping=cam.slot_mapping,
            num_actual_tokens=cam.num_actual_tokens, max_query_len=cam.max_query_len,
            max_seq_len=cam.max_seq_len,
        )


def token_positions(meta: TQMetadata, n: int) -> torch.Tensor:
    """The position in its sequence of each of the step's first ``n`` tokens: seq_len - query_len
    + its index in the query. Tensor operations only (no host sync), so a CUDA graph can hold it;
    tokens past the last request (graph padding, slot -1) get some valid position."""
    starts = meta.query_start_loc
    t = torch.arange(n, device=starts.device, dtype=starts.dtype)
    request = torch.searchsorted(starts[1:], t, right=True).clamp_(max=meta.seq_lens.shape[0] - 1)
    return meta.seq_lens[request] - (starts[request + 1] - t)


def _dot_dtype(device) -> torch.dtype:
    """The tables' tensor-core input type: bfloat16 on GPUs; float32 on the CPU, where the
    kernels run in Triton's interpreter and tq_attention computes its dots in float32."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def _layer_index(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


class TQAttentionImpl(AttentionImpl[TQMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: int | None = None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype: str = "auto", logits_soft_cap=None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 **kwargs):
        unsupported = [
            what for what, present in (
                ("ALiBi", alibi_slopes is not None),
                ("sliding window", sliding_window is not None),
                ("logit soft-capping", bool(logits_soft_cap)),
                (f"attention type {attn_type}", attn_type != AttentionType.DECODER),
                ("attention sinks", kwargs.get("sinks") is not None),
                (f"head size {head_size}", head_size not in SUPPORTED_HEAD_SIZES),
            ) if present
        ]
        if unsupported:
            raise NotImplementedError(f"{SUPPORTED}; this layer has {', '.join(unsupported)}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.format = get_format(kv_cache_dtype)
        vllm_config = get_current_vllm_config()
        self._model_dir = vllm_config.model_config.model if vllm_config.model_config else None
        self._tables = None

    def _layer_tables(self, layer, device):
        if self._tables is None or self._tables.signs.device != device:
            from .tables import LayerTables

            index = _layer_index(layer.layer_name)
            calibration = _calibration_of_layer(self._model_dir, index, self.format)
            self._tables = LayerTables(
                self.format, self.head_size, index, ROTATION_SEED, device, _dot_dtype(device),
                self.num_kv_heads, **calibration,
            )
        return self._tables

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        from vllm_gds.kernels import tq_store

        n = slot_mapping.shape[0]
        if n == 0:
            return
        tables = self._layer_tables(layer, key.device)
        positions = None
        if tables.has_mean:  # keys are centred on the key mean rotated to their position
            from vllm.forward_context import get_forward_context

            positions = token_positions(get_forward_context().attn_metadata[layer.layer_name], n)
        tq_store(key[:n].view(n, self.num_kv_heads, self.head_size),
                 value[:n].view(n, self.num_kv_heads, self.head_size),
                 kv_cache.transpose(1, 2), slot_mapping, tables, positions=positions)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata: TQMetadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        from vllm_gds.kernels import tq_attention

        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by " + SUPPORTED)
        tables = self._layer_tables(layer, query.device)
        if attn_metadata is None:  # the profiling run
            return output
        n = attn_metadata.num_actual_tokens
        tq_attention(
            query[:n].view(n, self.num_heads, self.head_size), kv_cache.transpose(1, 2),
            attn_metadata.block_table, attn_metadata.seq_lens, attn_metadata.query_start_loc,
            tables, self.scale, output[:n].view(n, self.num_heads, self.head_size),
            max_query_len=attn_metadata.max_query_len,
        )
        return output


_calibrations: dict[str, object] = {}


def _calibration_of_layer(model_dir, layer: int, fmt) -> dict:
    """The LayerTables keyword arguments from the model's calibration file (none: uncalibrated)."""
    from .calibration_file import load_calibration

    if model_dir is None or not Path(model_dir).is_dir():
        return {}
    key = str(model_dir)
    if key not in _calibrations:
        _calibrations[key] = load_calibration(Path(model_dir))
    calib = _calibrations[key]
    if calib is None:
        return {}
    key_mean, key_scale = calib.key_transform(layer, fmt.key_calibration, fmt.key_mean_pairs)
    rope = {}
    if key_mean is not None:  # pre-RoPE: the kernels rotate it to each key's position
        rope = dict(rope_inv_freq=calib.rope_inv_freq,
                    rope_attention_scaling=calib.rope_attention_scaling)
    return dict(key_mean=key_mean, key_scale=key_scale,
                value_mean=calib.value_transform(layer, fmt.value_calibration),
                key_weight=calib.query_ms[layer], **rope)

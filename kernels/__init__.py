"""Triton kernels of the quantized KV cache (installed as ``vllm_gds.kernels``)."""

from .tq_attention import default_splits, tq_attention
from .tq_params import LayerTables, SlotLayout
from .tq_store import tq_store

__all__ = ["LayerTables", "SlotLayout", "default_splits", "tq_attention", "tq_store"]

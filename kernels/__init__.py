"""Triton kernels of the quantized KV cache (installed as ``vllm_gds.kernels``).

Imports only triton, torch and the standard library: the launchers read a layer's host-side
tables (vllm_gds/kvcache/tables.LayerTables) by attribute, never importing the package.
"""

from .tq_attention import default_splits, tq_attention
from .tq_store import tq_store

__all__ = ["default_splits", "tq_attention", "tq_store"]

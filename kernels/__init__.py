"""Triton kernels of the quantized KV cache (installed as ``vllm_gds.kernels``).

Imports only triton, torch and the standard library: the launchers read a layer's host-side
tables (vllm_gds/kvcache/tables.LayerTables) by attribute, never importing the package.
``tq_store`` and ``tq_attention`` are the served launches (vllm_gds/kvcache/backend.py);
``StoreTuning`` and ``AttentionTuning`` carry the measurement switches benchmarks and tests pass.
"""

from .tq_attention import AttentionTuning, default_splits, tq_attention
from .tq_store import StoreTuning, tq_store

__all__ = ["AttentionTuning", "StoreTuning", "default_splits", "tq_attention", "tq_store"]

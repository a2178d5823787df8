"""`vllm-gds kv-plan MODEL`: tokens and sequences per KV cache dtype (arguments live beside the plan)."""

from vllm_gds.kvcache.kv_plan import add_kv_plan_arguments as add_arguments
from vllm_gds.kvcache.kv_plan import run_kv_plan as run

HELP = "how many tokens and sequences fit per KV cache dtype"

__all__ = ["HELP", "add_arguments", "run"]

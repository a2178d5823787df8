"""Run one real vLLM engine (CPU build) in a child process and print its greedy tokens as JSON.

Usage: python tests/engine_run.py '{"model": ..., "load_format": ..., ...}'
Each engine gets its own process, so a failed start cannot leak into other tests.
"""

import json
import sys

if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=spec["model"],
        load_format=spec.get("load_format", "auto"),
        dtype=spec.get("dtype", "float32"),
        tensor_parallel_size=spec.get("tensor_parallel_size", 1),
        pipeline_parallel_size=spec.get("pipeline_parallel_size", 1),
        model_loader_extra_config=spec.get("extra", {}),
        enforce_eager=True,
        max_model_len=512,
        gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.15),
    )
    outputs = llm.generate(
        spec["prompts"], SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 12))
    )
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)

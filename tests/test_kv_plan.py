"""vllm-gds kv-plan against hand arithmetic."""

import json

import pytest

from vllm_gds.kvcache.kv_plan import bytes_per_token, main, plan, read_shape

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
    rows, budget, length = plan(shape, 80, max_model_len=8192)
    assert budget == 55 * GIB  # 80 * 0.9 - 16 - 1
    rows = {r[0]: r for r in rows}
    assert rows["bf16"][2] == 55 * GIB // 131072 == 450560
    assert rows["bf16"][3] == 450560 // 8192 == 55
    assert rows["tq4"][2] == (55 * GIB // (33792 * 16)) * 16
    # TP=2: half the KV heads and half the weights per GPU
    rows2, budget2, _ = plan(shape, 80, tp=2, max_model_len=8192)
    assert budget2 == 63 * GIB
    assert dict((r[0], r[2]) for r in rows2)["bf16"] == 63 * GIB // 65536


def test_cli_prints_every_dtype(llama8b, capsys):
    assert main([str(llama8b), "--gpu-memory-gib", "80", "--max-model-len", "8192"]) == 0
    out = capsys.readouterr().out
    for name in ("bf16", "fp8", "tq4", "tq3", "tq5", "450,560"):
        assert name in out


def test_unsupported_head_size_is_reported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 384}))
    rows, _, _ = plan(read_shape(tmp_path), 24)
    assert dict((r[0], r[1]) for r in rows)["tq4"] is None

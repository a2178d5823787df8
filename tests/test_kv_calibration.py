"""The KV calibration file: round trip, the missing-file warning, a real calibration run."""

import json
import logging

import pytest
import torch

from vllm_gds.kvcache.calibration import calibrate
from vllm_gds.kvcache.calibration_file import (
    META_NAME,
    TENSORS_NAME,
    load_calibration,
    save_calibration,
)


def _stats(layers=3, heads=2, d=64):
    g = torch.Generator().manual_seed(0)
    s = {n: torch.rand(layers, heads, d, generator=g) + 0.1
         for n in ("key_mean", "key_var", "query_ms", "value_mean", "value_var")}
    s["key_absmax"] = torch.rand(layers, generator=g)
    s["value_absmax"] = torch.rand(layers, generator=g)
    s["rope_inv_freq"] = 1.0 / 10000.0 ** (torch.arange(0, d, 2).float() / d)
    return s


def test_round_trip(tmp_path):
    stats = _stats()
    save_calibration(tmp_path, stats, {"model": "m", "tokens": 10})
    cal = load_calibration(tmp_path)
    for name, t in stats.items():
        assert torch.equal(getattr(cal, name), t)
    assert cal.meta["model"] == "m" and cal.meta["format_version"] == 2
    mean, scale = cal.key_transform(1, "mean_balanced")
    assert torch.equal(mean, stats["key_mean"][1])
    # equal on the two channels of each RoPE pair (i, i + 32): it commutes with RoPE
    assert torch.equal(scale[:, :32], scale[:, 32:])
    pair = lambda x: ((x[:, :32] + x[:, 32:]) / 2).repeat(1, 2)
    expected = (pair(stats["key_var"][1]) / pair(stats["query_ms"][1])) ** 0.25
    ratio = scale / expected
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-5)  # up to one factor per head
    assert torch.allclose(scale.log().mean(-1), torch.zeros(2), atol=1e-5)


def test_key_mean_on_the_pairs_of_most_energy(tmp_path):
    """key_transform(..., mean_pairs=0.5): the mean stays on the 16 of 32 RoPE pairs with the
    largest |mu|^2 / s^2 (both channels of each), exactly zero on the others."""
    stats = _stats()
    save_calibration(tmp_path, stats, {})
    cal = load_calibration(tmp_path)
    full, scale = cal.key_transform(2, "mean_balanced")
    half_mean, half_scale = cal.key_transform(2, "mean_balanced", 0.5)
    assert torch.equal(scale, half_scale)
    energy = ((full / scale) ** 2)[:, :32] + ((full / scale) ** 2)[:, 32:]
    for h in range(2):
        kept = set(energy[h].topk(16).indices.tolist())
        for i in range(32):
            for c in (i, i + 32):
                want = full[h, c] if i in kept else 0.0
                assert half_mean[h, c] == want
    assert torch.equal(cal.key_transform(2, "mean_balanced", 0.25)[0], half_mean)  # at least 16


def test_missing_file_warns_with_the_command(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vllm.vllm_gds.kvcache"):
        assert load_calibration(tmp_path) is None
    assert f"vllm-gds calibrate {tmp_path}" in caplog.text


def test_other_format_version_is_refused(tmp_path):
    save_calibration(tmp_path, _stats(), {})
    meta = json.loads((tmp_path / META_NAME).read_text())
    meta["format_version"] = 99
    (tmp_path / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="calibrate"):
        load_calibration(tmp_path)


def test_calibrate_the_tiny_model(tmp_path):
    from tiny_model import tiny_llama

    model = tiny_llama()
    calibrate(model, tokens=600, window=300, device="cpu", out_dir=tmp_path)
    assert (tmp_path / TENSORS_NAME).is_file()
    cal = load_calibration(tmp_path)
    assert cal.key_mean.shape == (2, 2, 32) and cal.query_ms.shape == (2, 2, 32)
    assert (cal.key_var > 0).all() and (cal.query_ms > 0).all()
    assert cal.meta["tokens"] == 600 and cal.meta["head_size"] == 32
    assert cal.rope_inv_freq.shape == (16,) and cal.rope_inv_freq[0] == 1.0
    # Beside an unindexed model, no loader may take it for a weights file.
    from vllm_gds.loader.hf_stream import safetensors_files

    assert safetensors_files(tmp_path) == []


def test_the_old_file_name_is_still_read(tmp_path):
    from tiny_model import tiny_llama
    from vllm_gds.kvcache.calibration_file import LEGACY_TENSORS_NAME

    calibrate(tiny_llama(), tokens=300, window=300, device="cpu", out_dir=tmp_path)
    (tmp_path / TENSORS_NAME).rename(tmp_path / LEGACY_TENSORS_NAME)
    assert load_calibration(tmp_path).key_mean.shape == (2, 2, 32)


def test_kv_hook_with_plain_attention_reproduces_the_model():
    from tiny_model import tiny_llama
    from vllm_gds.kvcache.hf_attention import causal_attention, load_causal_lm, use_kv_hook

    model = load_causal_lm(tiny_llama())
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    seen = []

    def hook(layer, q, k, v, scaling):
        seen.append(layer)
        return causal_attention(q, k, v, scaling)

    with torch.inference_mode():
        expected = model(ids, use_cache=False).logits
        with use_kv_hook(model, hook):
            got = model(ids, use_cache=False).logits
        again = model(ids, use_cache=False).logits  # the hook is gone after the block
    assert seen == [0, 1]
    assert torch.allclose(got, expected, atol=1e-5) and torch.equal(again, expected)

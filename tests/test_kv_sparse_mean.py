"""calibration.sparse_mean: the pre-RoPE key mean kept on the top-m RoPE pairs by energy."""

import pytest
import torch

from vllm_gds.kvcache.calibration import mean_pair_energy, sparse_mean
from vllm_gds.kvcache.calibration_file import Calibration


def _calib(layers=3, heads=2, d=64, rotary=None):
    g = torch.Generator().manual_seed(1)
    rotary = rotary or d
    s = {n: torch.rand(layers, heads, d, generator=g) + 0.1
         for n in ("key_var", "query_ms", "value_mean", "value_var")}
    s["key_mean"] = torch.randn(layers, heads, d, generator=g)
    s["key_absmax"] = torch.rand(layers, generator=g)
    s["value_absmax"] = torch.rand(layers, generator=g)
    s["rope_inv_freq"] = 1.0 / 10000.0 ** (torch.arange(0, rotary, 2).float() / rotary)
    return Calibration(**s, meta={})


def _energy(cal, weight):
    """Independent of the code under test: pair i is channels (i, i + r/2) (rope.py)."""
    half = cal.rope_inv_freq.shape[-1]
    mu = cal.key_mean.double()
    w = {"none": torch.ones_like(mu), "query": cal.query_ms.double()}[weight]
    e = torch.zeros(*mu.shape[:2], half, dtype=torch.float64)
    for i in range(half):
        e[..., i] = mu[..., i] ** 2 * w[..., i] + mu[..., i + half] ** 2 * w[..., i + half]
    return e


@pytest.mark.parametrize("weight", ["none", "query"])
@pytest.mark.parametrize("m", [0, 1, 4, 8, 16, 32])
def test_keeps_the_top_m_pairs_by_energy(weight, m):
    cal = _calib()
    before = cal.key_mean.clone()
    out = sparse_mean(cal, m, weight)
    assert torch.equal(cal.key_mean, before)  # the input is not changed
    energy = _energy(cal, weight)
    assert torch.allclose(mean_pair_energy(cal, weight), energy)
    L, H, d = cal.key_mean.shape
    for layer in range(L):
        for h in range(H):
            e = energy[layer, h]
            kept = [i for i in range(d // 2) if out.key_mean[layer, h, i] != 0]
            assert len(kept) == m
            # every kept pair has at least the energy of every dropped one: the top m
            dropped = [i for i in range(d // 2) if i not in kept]
            if kept and dropped:
                assert min(e[i] for i in kept) >= max(e[i] for i in dropped)
            for i in range(d // 2):
                for c in (i, i + d // 2):
                    if i in kept:
                        assert out.key_mean[layer, h, c] == before[layer, h, c]  # as it was
                    else:
                        assert out.key_mean[layer, h, c].item() == 0.0  # exactly zero
    # everything else is the same calibration
    for name in ("key_var", "query_ms", "value_mean", "value_var", "rope_inv_freq"):
        assert torch.equal(getattr(out, name), getattr(cal, name))


def test_all_pairs_is_the_mean_and_scaled_weight_matches_top_pairs():
    from vllm_gds.kvcache.calibration_file import top_pairs

    cal = _calib()
    assert torch.equal(sparse_mean(cal, 32).key_mean, cal.key_mean)
    # weight "scaled" is the served selection (calibration_file.top_pairs, |mu|^2 / s^2)
    out = sparse_mean(cal, 16, "scaled")
    for layer in range(cal.num_layers):
        _, scale = cal.key_transform(layer, "mean_balanced")
        assert torch.equal(out.key_mean[layer], top_pairs(cal.key_mean[layer], scale, 0.5, 32))


def test_partial_rotary_channels_are_kept():
    cal = _calib(d=64, rotary=32)  # 16 RoPE pairs (i, i + 16), channels 32..63 not rotated
    out = sparse_mean(cal, 4)
    assert torch.equal(out.key_mean[..., 32:], cal.key_mean[..., 32:])
    nonzero_pairs = (out.key_mean[..., :16] != 0)
    assert torch.equal(nonzero_pairs, out.key_mean[..., 16:32] != 0)
    assert (nonzero_pairs.sum(-1) == 4).all()


def test_bad_arguments():
    cal = _calib()
    with pytest.raises(ValueError):
        sparse_mean(cal, 33)
    with pytest.raises(ValueError):
        sparse_mean(cal, 4, "energy")

"""The torch reference of the quantized KV cache: error bound, determinism, layout, attention."""

import math

import pytest
import kv_reference
import torch

from vllm_gds.kvcache.codebook import mse_per_coordinate
from vllm_gds.kvcache.formats import FORMATS, KVFormat, VectorCode, get_format
from vllm_gds.kvcache.layer_calibration import fallback_error_weights
from vllm_gds.kvcache.quantizer import KVLayerQuantizer, VectorQuantizer
from vllm_gds.kvcache.rope import apply_rope
from vllm_gds.kvcache.rotation import Rotation

INV_FREQ = 1.0 / 10000.0 ** (torch.arange(0, 64, 2).float() / 64)


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("norm", ["plain", "ls"])
def test_mse_of_unit_vectors_under_the_theory_bound(d, bits, norm):
    x = _unit(4000, d, seed=1000 * bits + d)  # fresh inputs, not the calibration of anything
    q = VectorQuantizer(d, VectorCode(bits, norm=norm), Rotation(d, layer=0, seed=7))
    mse = ((q.roundtrip(x) - x) ** 2).sum(-1).mean().item()
    assert mse < math.sqrt(3) * math.pi / 2 * 4.0**-bits
    # and close to what the codebook promises (plain), or better (least-squares norm)
    expected = mse_per_coordinate(d, bits) * d
    if norm == "plain":
        assert mse == pytest.approx(expected, rel=0.08)
    else:
        assert mse < expected


def test_encode_decode_matches_roundtrip_and_is_deterministic_per_seed():
    fmt = KVFormat("t", VectorCode(3, extra=16), VectorCode(2))
    k, v = torch.randn(33, 2, 64) * 3, torch.randn(33, 2, 64)
    pos = torch.arange(100, 133)
    cal = dict(key_mean=torch.randn(2, 64), key_scale=torch.rand(2, 64) + 0.5, rope_inv_freq=INV_FREQ)
    a = KVLayerQuantizer(fmt, 64, layer=2, seed=1, **cal)
    b = KVLayerQuantizer(fmt, 64, layer=2, seed=1, **cal)
    c = KVLayerQuantizer(fmt, 64, layer=2, seed=2, **cal)
    ea, eb, ec = a.encode_keys(k, pos), b.encode_keys(k, pos), c.encode_keys(k, pos)
    assert torch.equal(ea.codes, eb.codes) and torch.equal(ea.norms, eb.norms)
    assert not torch.equal(ea.codes, ec.codes)
    assert ea.codes.shape == (33, 2, fmt.key.code_bytes(64)) and ea.norms.dtype == torch.float16
    assert torch.allclose(a.decode_keys(ea, pos), a.roundtrip_keys(k, pos), atol=1e-5)
    assert torch.allclose(a.decode_values(a.encode_values(v)), a.roundtrip_values(v), atol=1e-5)


def test_raw_fallback_keeps_an_outlier_key_accurate():
    fmt = KVFormat("t", VectorCode(4), VectorCode(4))
    g = torch.Generator().manual_seed(0)
    mean = torch.full((1, 64), 4.0)
    scale = torch.rand(1, 64, generator=g) * 0.2 + 0.01  # calibrated on keys near the mean
    keys = mean + scale * torch.randn(200, 1, 64, generator=g)
    keys[0] = -mean  # an attention-sink-like key, far from the mean
    pos = torch.zeros(200, dtype=torch.long)  # position 0: RoPE is the identity
    cal = dict(key_mean=mean, key_scale=scale, rope_inv_freq=INV_FREQ)
    lq = KVLayerQuantizer(fmt, 64, 0, 0, **cal)
    off = KVLayerQuantizer(KVFormat("t", VectorCode(4), VectorCode(4), key_raw_fallback=False),
                           64, 0, 0, **cal)
    enc = lq.encode_keys(keys, pos)
    assert enc.norms[0, 0] < 0 and (enc.norms[1:] > 0).all()
    err = lambda x: ((x[0] - keys[0]) ** 2).sum().item()
    assert err(lq.decode_keys(enc, pos)) < 0.1 * err(off.roundtrip_keys(keys, pos))


def test_key_mean_follows_the_position():
    mean = torch.randn(1, 64)
    lq = KVLayerQuantizer(get_format("tq4"), 64, 0, 0, key_mean=mean, rope_inv_freq=INV_FREQ)
    pos = torch.tensor([0, 7, 1000])
    at = lq.key_mean_at(pos)
    assert torch.allclose(at[0], mean)
    # exact angles (float64), within float32 angle rounding of the model's own RoPE
    assert torch.allclose(at[2], apply_rope(mean, torch.tensor(1000), INV_FREQ, exact=True))
    assert torch.allclose(at[2], apply_rope(mean, torch.tensor(1000), INV_FREQ), atol=1e-3)
    assert torch.allclose(at.norm(dim=-1), mean.norm(dim=-1).expand(3, 1), rtol=1e-5)
    # a key equal to its position's mean is coded (almost) exactly
    assert torch.allclose(lq.roundtrip_keys(at, pos), at, atol=1e-2)


def test_rotated_domain_attention_equals_attention_over_decoded_cache():
    fmt = get_format("tq4")
    g = torch.Generator().manual_seed(0)
    k = torch.randn(40, 3, 128, generator=g) + 2
    k[0] *= 8
    v = torch.randn(40, 3, 128, generator=g)
    q = torch.randn(3, 128, generator=g)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, 128, 2).float() / 128)
    lq = KVLayerQuantizer(fmt, 128, 1, 4, key_mean=torch.full((3, 128), 2.0),
                          key_scale=torch.rand(3, 128, generator=g) + 0.5,
                          key_weight=torch.ones(3, 128), rope_inv_freq=inv_freq)
    pos = torch.arange(40) * 997
    k[1:6] = lq.key_mean_at(pos[1:6]) + 0.1 * k[1:6]  # keys near their mean: calibrated
    ek, ev = lq.encode_keys(k, pos), lq.encode_values(v)
    assert (ek.norms < 0).any() and (ek.norms > 0).any()  # both kinds of key are exercised
    k_hat, v_hat = lq.decode_keys(ek, pos), lq.decode_values(ev)
    expected = (q[:, None, :] * k_hat.transpose(0, 1)).sum(-1)  # [H, T]
    assert torch.allclose(kv_reference.scores(lq, q, ek, pos), expected, atol=1e-3)
    p = torch.softmax(expected / 11.3, -1)
    assert torch.allclose(kv_reference.output(lq, p, ev), torch.einsum("ht,thd->hd", p, v_hat),
                          atol=1e-4)


def test_format_bytes():
    # tq4: 4-bit codes + fp16 norm, keys and values: (32 + 2) * 2 at d=64, (64 + 2) * 2 at 128
    assert FORMATS["tq4"].slot_bytes(64) == 68 and FORMATS["tq4"].slot_bytes(128) == 132
    assert FORMATS["tq3"].slot_bytes(64) == 52 and FORMATS["tq3"].slot_bytes(128) == 100
    assert FORMATS["tq4"].bits_per_element(64) == 4.25
    # tq5: 5-bit keys (40 / 80 B) and 4-bit values
    assert FORMATS["tq5"].slot_bytes(64) == 76 and FORMATS["tq5"].slot_bytes(128) == 148
    assert VectorCode(3, extra=32).vector_bytes(64) == 16 + 12 + 2
    with pytest.raises(ValueError, match="tq4"):
        get_format("tq6")


@pytest.mark.parametrize("d", [64, 128])
def test_fallback_error_weights_are_the_rotated_weights_diagonal(d):
    """Every diagonal entry of R diag(w) R^T is mean(w) for the randomized Hadamard R, which is
    why the fallback can weigh residuals in rotated coordinates by one number a head."""
    g = torch.Generator().manual_seed(d)
    w = torch.rand(3, d, generator=g) * 4 - 1  # negatives count as 0
    s = torch.rand(3, d, generator=g) + 0.5
    ew = fallback_error_weights(w, s, d)
    assert ew.shape == (3, 2)
    r = Rotation(d, layer=5, seed=11)
    rot = r.forward(torch.eye(d, dtype=torch.float64).float()).double()  # rows: rotate(e_i)
    for h in range(3):
        for j, diag in enumerate((w[h].clamp_min(0), w[h].clamp_min(0) * s[h] ** 2)):
            m = rot.t() @ torch.diag(diag.double()) @ rot
            assert torch.allclose(m.diagonal(), torch.full((d,), ew[h, j].item(), dtype=torch.float64),
                                  rtol=1e-5)
    assert torch.equal(fallback_error_weights(None, None, d), torch.ones(2))


def test_fallback_codes_raw_where_the_weighted_norm_is_smaller():
    """The raw-key fallback codes a key raw exactly where mean(w) |k|^2 < mean(w s^2) |x|^2 (x
    = (k - RoPE_p(mean)) / s, the calibrated key), once: its codes and norm are those of that
    one input's coding. The rule predicts which coding has the smaller query-weighted error
    (each coding's error about the same share of its input's squared norm): it agrees with the
    errors measured after coding both on most keys, and the errors it keeps are nearly as
    small."""
    fmt = get_format("tq4")
    g = torch.Generator().manual_seed(3)
    h, d, t = 2, 64, 300
    pos = torch.randint(0, 4096, (t,), generator=g)
    w = torch.rand(h, d, generator=g) + 0.1
    s = torch.rand(h, d, generator=g) + 0.5
    lq = KVLayerQuantizer(fmt, d, 2, 9, key_mean=torch.randn(h, d, generator=g), key_scale=s,
                          key_weight=w, rope_inv_freq=INV_FREQ)
    k = lq.key_mean_at(pos) + torch.randn(t, h, d, generator=g) * torch.rand(t, h, 1, generator=g) * 3
    x = (k - lq.key_mean_at(pos)) / s
    want_raw = w.mean(-1) * (k * k).sum(-1) < (w * s * s).mean(-1) * (x * x).sum(-1)
    assert 0.1 < want_raw.float().mean() < 0.9  # both codings chosen
    enc = lq.encode_keys(k, pos)
    got_raw = enc.norms < 0
    assert (got_raw != want_raw).sum() <= 1  # a float32 tie at most
    raw_enc, cal_enc = lq.keys.encode(k), lq.keys.encode(lq._calibrate_keys(k, pos))
    assert torch.equal(enc.codes, torch.where(got_raw[..., None], raw_enc.codes, cal_enc.codes))
    assert torch.equal(enc.norms.abs(), torch.where(got_raw, raw_enc.norms, cal_enc.norms).abs())
    cal = lq._uncalibrate_keys(lq.keys.roundtrip(lq._calibrate_keys(k, pos)), pos)
    raw = lq.keys.roundtrip(k)
    assert torch.allclose(lq.roundtrip_keys(k, pos), torch.where(got_raw[..., None], raw, cal),
                          atol=1e-2)
    # against the errors measured after coding both (the weights by their rotated diagonal)
    err_raw = w.mean(-1) * ((k - raw) ** 2).sum(-1)
    err_cal = (w * s * s).mean(-1) * (((k - cal) / s) ** 2).sum(-1)
    assert (got_raw == (err_raw < err_cal)).float().mean() > 0.75  # these keys sit near the line
    best = torch.minimum(err_raw, err_cal).sum()
    kept = torch.where(got_raw, err_raw, err_cal).sum()
    assert kept < 1.1 * best and kept < 0.9 * err_cal.sum()  # (1.05, 1.25 x best here)

"""The torch reference of the quantized KV cache: error bound, determinism, layout, attention."""

import math

import pytest
import torch

from vllm_gds.kvcache import attention_ref
from vllm_gds.kvcache.codebook import mse_per_coordinate
from vllm_gds.kvcache.formats import FORMATS, KVFormat, VectorCode, get_format
from vllm_gds.kvcache.quantizer import KVLayerQuantizer, VectorQuantizer
from vllm_gds.kvcache.rotation import Rotation


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
    mean, scale = torch.randn(2, 64), torch.rand(2, 64) + 0.5
    a = KVLayerQuantizer(fmt, 64, layer=2, seed=1, key_mean=mean, key_scale=scale)
    b = KVLayerQuantizer(fmt, 64, layer=2, seed=1, key_mean=mean, key_scale=scale)
    c = KVLayerQuantizer(fmt, 64, layer=2, seed=2, key_mean=mean, key_scale=scale)
    ea, eb, ec = a.encode_keys(k), b.encode_keys(k), c.encode_keys(k)
    assert torch.equal(ea.codes, eb.codes) and torch.equal(ea.norms, eb.norms)
    assert not torch.equal(ea.codes, ec.codes)
    assert ea.codes.shape == (33, 2, fmt.key.code_bytes(64)) and ea.norms.dtype == torch.float16
    assert torch.allclose(a.decode_keys(ea), a.roundtrip_keys(k), atol=1e-5)
    assert torch.allclose(a.decode_values(a.encode_values(v)), a.roundtrip_values(v), atol=1e-5)


def test_raw_fallback_keeps_an_outlier_key_accurate():
    fmt = KVFormat("t", VectorCode(4), VectorCode(4))
    g = torch.Generator().manual_seed(0)
    mean = torch.full((1, 64), 4.0)
    scale = torch.rand(1, 64, generator=g) * 0.2 + 0.01  # calibrated on keys near the mean
    keys = mean + scale * torch.randn(200, 1, 64, generator=g)
    keys[0] = -mean  # an attention-sink-like key, far from the mean
    lq = KVLayerQuantizer(fmt, 64, 0, 0, key_mean=mean, key_scale=scale)
    off = KVLayerQuantizer(KVFormat("t", VectorCode(4), VectorCode(4), key_raw_fallback=False),
                           64, 0, 0, key_mean=mean, key_scale=scale)
    enc = lq.encode_keys(keys)
    assert enc.norms[0, 0] < 0 and (enc.norms[1:] > 0).all()
    err = lambda x: ((x[0] - keys[0]) ** 2).sum().item()
    assert err(lq.decode_keys(enc)) < 0.1 * err(off.roundtrip_keys(keys))


def test_rotated_domain_attention_equals_attention_over_decoded_cache():
    fmt = get_format("tq4")
    g = torch.Generator().manual_seed(0)
    k = torch.randn(40, 3, 128, generator=g) + 2
    k[0] *= 8
    v = torch.randn(40, 3, 128, generator=g)
    q = torch.randn(3, 128, generator=g)
    lq = KVLayerQuantizer(fmt, 128, 1, 4, key_mean=torch.full((3, 128), 2.0),
                          key_scale=torch.rand(3, 128, generator=g) + 0.5,
                          key_weight=torch.ones(3, 128))
    ek, ev = lq.encode_keys(k), lq.encode_values(v)
    assert (ek.norms < 0).any() and (ek.norms > 0).any()  # both kinds of key are exercised
    k_hat, v_hat = lq.decode_keys(ek), lq.decode_values(ev)
    expected = (q[:, None, :] * k_hat.transpose(0, 1)).sum(-1)  # [H, T]
    got = attention_ref.scores(lq, q, ek)
    # equal up to one constant per query (q . key_mean)
    shift = (q * lq.key_mean).sum(-1, keepdim=True)
    assert torch.allclose(got + shift, expected, atol=1e-3)
    p = torch.softmax(expected / 11.3, -1)
    assert torch.allclose(attention_ref.output(lq, p, ev), torch.einsum("ht,thd->hd", p, v_hat),
                          atol=1e-4)


def test_format_bytes():
    # tq4: 4-bit codes + fp16 norm, keys and values: (32 + 2) * 2 at d=64, (64 + 2) * 2 at 128
    assert FORMATS["tq4"].slot_bytes(64) == 68 and FORMATS["tq4"].slot_bytes(128) == 132
    assert FORMATS["tq3"].slot_bytes(64) == 52 and FORMATS["tq3"].slot_bytes(128) == 100
    assert FORMATS["tq4"].bits_per_element(64) == 4.25
    assert VectorCode(3, extra=32).vector_bytes(64) == 16 + 12 + 2
    with pytest.raises(ValueError, match="tq4"):
        get_format("tq5")

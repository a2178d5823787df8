"""The seeded randomized Hadamard rotation and the bit packing layout."""

import pytest
import torch

from vllm_gds.kvcache.packing import pack, packed_bytes, unpack
from vllm_gds.kvcache.rotation import Rotation, hadamard, signs, splitmix64


def test_splitmix64_reference_value():
    # The first output of the reference splitmix64 generator seeded with 0.
    assert splitmix64(0) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("d", [64, 128, 256])
def test_rotation_is_orthogonal_and_preserves_inner_products(d):
    rot = Rotation(d, layer=5, seed=3)
    eye = torch.eye(d)
    m = rot.forward(eye)  # rows: images of the basis vectors
    assert torch.allclose(m @ m.T, eye, atol=1e-5)
    x, y = torch.randn(50, d), torch.randn(50, d)
    assert torch.allclose((rot.forward(x) * rot.forward(y)).sum(-1), (x * y).sum(-1), atol=1e-4)
    assert torch.allclose(rot.inverse(rot.forward(x)), x, atol=1e-5)
    h = hadamard(d)
    assert torch.equal(h, h.T)


def test_signs_are_deterministic_and_differ_by_layer_and_seed():
    a = signs(128, 0, 0)
    assert torch.equal(a, signs(128, 0, 0))
    assert set(a.tolist()) == {-1.0, 1.0}
    assert 40 < (a > 0).sum() < 88
    assert not torch.equal(a, signs(128, 1, 0))
    assert not torch.equal(a, signs(128, 0, 1))


def test_unsupported_head_size_names_the_supported_ones():
    with pytest.raises(ValueError, match="64, 128, 256"):
        Rotation(96, 0, 0)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [64, 40, 5])
def test_pack_unpack_round_trips_every_code(bits, n):
    codes = torch.arange(2**bits).repeat(n)[: max(n, 2**bits)]
    codes = codes[torch.randperm(codes.numel())]
    codes = torch.nn.functional.pad(codes, (0, (-codes.numel()) % n)).reshape(-1, n)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == packed_bytes(n, bits)
    assert torch.equal(unpack(packed, bits, n), codes)


def test_layout_little_endian_bit_stream():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]])
    assert pack(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x07]]
    p3 = pack(codes, 3)[0].tolist()
    word = p3[0] | p3[1] << 8 | p3[2] << 16
    assert word == sum(c << (3 * i) for i, c in enumerate(codes[0].tolist()))
    assert pack(torch.tensor([[1, 0, 3, 2]]), 2).tolist() == [[0b10110001]]


def test_rope_matches_transformers_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from vllm_gds.kvcache.rope import apply_rope

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=4096)
    emb = LlamaRotaryEmbedding(cfg)
    x = torch.randn(1, 2, 50, 64)  # [b, H, T, d]
    pos = torch.arange(3000, 3050)[None]
    cos, sin = emb(x, pos)
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    got = apply_rope(x, pos[0][:, None].squeeze(-1), emb.inv_freq, emb.attention_scaling)
    assert torch.allclose(got, expected, atol=1e-5)
    back = apply_rope(got, pos[0], emb.inv_freq, emb.attention_scaling, inverse=True)
    assert torch.allclose(back, x, atol=1e-5)

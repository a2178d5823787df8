"""Bit packing of b-bit codes (b = 1..8) into bytes.

Layout (the one every kernel reads): the codes of one vector form a little-endian bit stream.
Code ``i`` occupies bits ``[i*b, (i+1)*b)`` of that stream, least significant bit first, and bit
``k`` of the stream is bit ``k % 8`` of byte ``k // 8``. So for b = 4 the low nibble of byte j is
code 2j; for b = 2 byte j holds codes 4j..4j+3 from the low bits up; for b = 3 every 3 bytes hold
8 codes (``b0 | b1 << 8 | b2 << 16 == sum_k code[8g+k] << 3k``, the layout vLLM's TurboQuant also
uses). A vector of n codes takes ``ceil(n * b / 8)`` bytes (whole bytes for n a multiple of 8).
"""

from __future__ import annotations

import torch


def packed_bytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., n] integer codes < 2^bits -> [..., ceil(n*bits/8)] uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    n = codes.shape[-1]
    c = codes.to(torch.int32)
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)
    stream = ((c[..., None] >> shifts) & 1).reshape(*codes.shape[:-1], n * bits)
    pad = packed_bytes(n, bits) * 8 - n * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.reshape(*codes.shape[:-1], -1, 8)
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32))
    return (stream * weights).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """[..., ceil(n*bits/8)] uint8 -> [..., n] int64 codes."""
    if packed.shape[-1] != packed_bytes(n, bits):
        raise ValueError(
            f"expected {packed_bytes(n, bits)} bytes for {n} codes of {bits} bits, "
            f"got {packed.shape[-1]}"
        )
    p = packed.to(torch.int32)
    stream = (p[..., None] >> torch.arange(8, device=p.device, dtype=torch.int32)) & 1
    stream = stream.reshape(*packed.shape[:-1], -1)[..., : n * bits]
    stream = stream.reshape(*packed.shape[:-1], n, bits)
    weights = (1 << torch.arange(bits, device=p.device, dtype=torch.int32))
    return (stream * weights).sum(-1).to(torch.int64)

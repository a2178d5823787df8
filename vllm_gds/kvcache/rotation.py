"""The seeded randomized Hadamard rotation applied to every key and value vector.

For head size d (a power of two: 64, 128, 256), layer ``layer`` and seed ``seed``:

    rotate(x)[j]   = sum_i x[i] * s[i] * H[i, j] / sqrt(d)      (y = x D H / sqrt(d), row vectors)
    unrotate(y)[i] = s[i] * sum_j y[j] * H[i, j] / sqrt(d)

where ``H[i, j] = (-1)^popcount(i & j)`` is the Sylvester Hadamard matrix (symmetric, H H = d I)
and ``s = signs(d, layer, seed)`` is a vector of +-1. Kernels may use a fast Walsh-Hadamard
transform or a matmul with ``hadamard(d)``; both give the same rotation.

The signs come from splitmix64, a fixed integer hash, so that they are identical in every
process, on every platform and in every torch version: ``s[i] = +1`` if the lowest bit of
``splitmix64(seed * 2^32 + layer * 2^16 + i)`` is 0, else -1.
"""

from __future__ import annotations

from functools import lru_cache

import torch

SUPPORTED_HEAD_SIZES = (64, 128, 256)
_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def check_head_size(d: int) -> None:
    if d not in SUPPORTED_HEAD_SIZES:
        raise ValueError(
            f"head size {d} is not supported by the quantized KV cache; "
            f"supported head sizes: {', '.join(map(str, SUPPORTED_HEAD_SIZES))}"
        )


@lru_cache(maxsize=None)
def _signs(d: int, layer: int, seed: int) -> torch.Tensor:
    base = (seed << 32) + (layer << 16)
    return torch.tensor(
        [1.0 if splitmix64(base + i) & 1 == 0 else -1.0 for i in range(d)], dtype=torch.float32
    )


def signs(d: int, layer: int, seed: int) -> torch.Tensor:
    """The +-1 sign vector (float32, [d]) of layer ``layer`` for ``seed``."""
    check_head_size(d)
    if not (0 <= layer < 1 << 16 and 0 <= seed < 1 << 31):
        raise ValueError(f"layer {layer} or seed {seed} out of range")
    return _signs(d, layer, seed).clone()


@lru_cache(maxsize=None)
def _hadamard_pm1(d: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_pm1(d: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix H itself (float32, entries +-1: exact in any dtype)."""
    check_head_size(d)
    return _hadamard_pm1(d).clone()


@lru_cache(maxsize=None)
def _hadamard(d: int) -> torch.Tensor:
    return _hadamard_pm1(d) / d**0.5


def hadamard(d: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix H / sqrt(d) (float32, symmetric)."""
    check_head_size(d)
    return _hadamard(d).clone()


class Rotation:
    """The rotation of one layer: ``forward`` and ``inverse`` on the last dimension."""

    def __init__(self, d: int, layer: int, seed: int):
        self.d, self.layer, self.seed = d, layer, seed
        self.signs = signs(d, layer, seed)
        self.matrix = hadamard(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, m = self.signs.to(x.device), self.matrix.to(x.device)
        return (x.float() * s) @ m

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        s, m = self.signs.to(y.device), self.matrix.to(y.device)
        return (y.float() @ m) * s

"""Lloyd-Max codebooks for one coordinate of a randomly rotated unit vector.

If ``u`` is uniform on the unit sphere of R^d, each coordinate ``x = u_i`` has the density

    f_d(x) = (1 - x^2)^((d-3)/2) / B(1/2, (d-1)/2),    -1 <= x <= 1,

which is what a coordinate of ``H D (k / |k|)`` follows after a randomized Hadamard rotation (for
d >= 64 it is close to N(0, 1/d), but the codebook here is solved for the exact density, not the
Gaussian approximation that vLLM's TurboQuant uses).

A ``b``-bit codebook has ``2^b`` levels ``c_0 < ... < c_{2^b-1}`` and ``2^b - 1`` thresholds
``t_i = (c_i + c_{i+1}) / 2``; a coordinate is coded as the number of thresholds strictly below it
(``torch.bucketize(x, t, right=False)`` counts thresholds < x; ties go to the lower code). The
levels are the conditional means of their cells (the Lloyd-Max conditions), solved in float64 by
Gauss-Legendre quadrature and returned as float32: the kernels load exactly these float32 values.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6)

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(48)
_SUBCELLS = 16


def coordinate_density(x: np.ndarray, d: int) -> np.ndarray:
    """The exact density of one coordinate of a uniform random unit vector in R^d."""
    a = (d - 3) / 2.0
    log_norm = math.lgamma(d / 2.0) - math.lgamma(0.5) - math.lgamma((d - 1) / 2.0)
    inside = np.clip(1.0 - np.asarray(x, dtype=np.float64) ** 2, 0.0, None)
    with np.errstate(divide="ignore"):
        return np.where(inside > 0, np.exp(log_norm + a * np.log(inside)), 0.0)


def cell_moments(edges: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Probability mass and first moment of each cell [edges[i], edges[i+1]], by quadrature."""
    lo, hi = edges[:-1], edges[1:]
    # Split each cell into sub-intervals so that wide outer cells are integrated as accurately
    # as narrow inner ones.
    fractions = np.linspace(0.0, 1.0, _SUBCELLS + 1)
    sub_lo = lo[:, None] + (hi - lo)[:, None] * fractions[None, :-1]
    sub_hi = lo[:, None] + (hi - lo)[:, None] * fractions[None, 1:]
    half = (sub_hi - sub_lo) / 2.0
    mid = (sub_hi + sub_lo) / 2.0
    x = mid[..., None] + half[..., None] * _GL_NODES
    w = half[..., None] * _GL_WEIGHTS
    f = coordinate_density(x, d)
    mass = (w * f).sum(axis=(1, 2))
    first = (w * f * x).sum(axis=(1, 2))
    return mass, first


def solve_lloyd_max(d: int, bits: int, iterations: int = 20000, tol: float = 1e-13):
    """Levels and thresholds (float64 numpy) of the b-bit Lloyd-Max quantizer of f_d."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"codebook bits must be one of {SUPPORTED_BITS}, got {bits}")
    if d < 4:
        raise ValueError(f"head size {d} is too small for the rotated-coordinate codebook")
    n = 2**bits
    sigma = 1.0 / math.sqrt(d)
    # Start from the Gaussian quantiles' neighbourhood: evenly spaced in +-3 sigma.
    levels = np.linspace(-3.0 * sigma, 3.0 * sigma, n) * (1.0 - 1.0 / n)
    for _ in range(iterations):
        thresholds = (levels[:-1] + levels[1:]) / 2.0
        edges = np.concatenate([[-1.0], thresholds, [1.0]])
        mass, first = cell_moments(edges, d)
        new = first / mass
        new = (new - new[::-1]) / 2.0  # the density is symmetric: keep the codebook exactly so
        if np.max(np.abs(new - levels)) < tol * sigma:
            levels = new
            break
        levels = new
    thresholds = (levels[:-1] + levels[1:]) / 2.0
    return levels, thresholds


@lru_cache(maxsize=None)
def _codebook_f32(d: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    levels, _ = solve_lloyd_max(d, bits)
    levels32 = torch.tensor(levels, dtype=torch.float32)
    # Thresholds are the float32 midpoints of the float32 levels, so that a kernel that computes
    # them on the fly from the levels gets bit-identical codes.
    thresholds32 = (levels32[:-1] + levels32[1:]) / 2
    return levels32, thresholds32


def codebook(d: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels [2^bits], thresholds [2^bits - 1]) as float32 CPU tensors (copies)."""
    levels, thresholds = _codebook_f32(int(d), int(bits))
    return levels.clone(), thresholds.clone()


def mse_per_coordinate(d: int, bits: int) -> float:
    """Expected squared error of one coordinate under the codebook (times d: of a unit vector)."""
    levels, thresholds = solve_lloyd_max(d, bits)
    edges = np.concatenate([[-1.0], thresholds, [1.0]])
    mass, first = cell_moments(edges, d)
    # E[(x - c)^2] = E[x^2] - sum_i c_i * first_i * 2 + sum_i c_i^2 mass_i
    second = 1.0 / d
    return float(second - 2 * np.sum(levels * first) + np.sum(levels**2 * mass))

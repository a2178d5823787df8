"""Lloyd-Max codebooks for the exact density of a rotated unit vector's coordinate."""

import math

import numpy as np
import pytest
import torch

from vllm_gds.kvcache.codebook import codebook, coordinate_density, mse_per_coordinate


def _fine_grid_centroids(d, thresholds):
    # An independent check: plain trapezoid sums on a fine grid, not the module's quadrature.
    edges = np.concatenate([[-1.0], thresholds, [1.0]])
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        x = np.linspace(lo, hi, 200001)
        f = coordinate_density(x, d)
        out.append(np.trapezoid(x * f, x) / np.trapezoid(f, x))
    return np.array(out)


def test_density_integrates_to_one_and_has_variance_one_over_d():
    x = np.linspace(-1, 1, 200001)
    for d in (64, 128, 256):
        f = coordinate_density(x, d)
        assert np.trapezoid(f, x) == pytest.approx(1.0, abs=1e-6)
        assert np.trapezoid(x * x * f, x) == pytest.approx(1.0 / d, rel=1e-5)


@pytest.mark.parametrize("d,bits", [(64, 2), (64, 3), (64, 4), (128, 3), (256, 4)])
def test_lloyd_max_conditions(d, bits):
    levels, thresholds = codebook(d, bits)
    assert levels.dtype == torch.float32 and levels.shape == (2**bits,)
    assert torch.all(levels[1:] > levels[:-1])
    # Each threshold is the midpoint of its neighbouring levels (exactly, in float32).
    assert torch.equal(thresholds, (levels[:-1] + levels[1:]) / 2)
    # Each level is the centroid of its cell under the exact density.
    centroids = _fine_grid_centroids(d, thresholds.double().numpy())
    sigma = 1 / math.sqrt(d)
    np.testing.assert_allclose(levels.double().numpy(), centroids, atol=2e-5 * sigma)
    # Symmetric density, symmetric codebook.
    assert torch.allclose(levels, -levels.flip(0), atol=1e-7)


def test_codebook_is_not_the_gaussian_one_at_small_d():
    # The exact density has lighter tails than N(0, 1/d): the outer level sits inside the
    # Gaussian Lloyd-Max outer level (2.7326 sigma at 4 bits).
    levels, _ = codebook(64, 4)
    assert levels[-1].item() * 8 < 2.70


@pytest.mark.parametrize("bits,expected", [(2, 0.1175), (3, 0.03454), (4, 0.009497)])
def test_mse_close_to_the_gaussian_lloyd_max_at_large_d(bits, expected):
    assert mse_per_coordinate(256, bits) * 256 == pytest.approx(expected, rel=0.02)

"""Diversity, Frechet distance, precision/recall, mode metrics and confidence intervals against
closed forms and constructed cases."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from phased_dmd_mp.eval.extractors import PointFeatures
from phased_dmd_mp.eval.metrics import (
    MAX_PAIRS,
    cosine_diversity,
    frechet_distance,
    frechet_distance_from_statistics,
    mean_confidence_interval,
    perceptual_diversity,
    precision_recall,
    seed_pairs,
)
from phased_dmd_mp.eval.mixture import Mixture, mode_statistics


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_cosine_diversity_matches_the_pairwise_mean():
    features = torch.randn(3, 7, 5, generator=_generator(), dtype=torch.float64)
    unit = torch.nn.functional.normalize(features, dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    first, second = torch.triu_indices(7, 7, offset=1)
    torch.testing.assert_close(cosine_diversity(features), similarity[:, first, second].mean(1))


def test_identical_samples_have_no_diversity_and_spread_ones_some():
    points = PointFeatures()
    identical = torch.tensor([3.0, 4.0]).expand(2, 8, 2)
    spread = torch.randn(2, 8, 2, generator=_generator())
    torch.testing.assert_close(cosine_diversity(identical), torch.ones(2, dtype=torch.float64))
    assert perceptual_diversity(identical, points, progress=False).abs().max() == 0
    assert (cosine_diversity(spread) < 0.5).all()
    assert (perceptual_diversity(spread, points, progress=False) > 0.5).all()


def test_sampled_pairs_are_distinct_and_uniform():
    seeds = 60  # 1770 pairs > MAX_PAIRS
    first, second = seed_pairs(seeds, _generator())
    assert len(first) == MAX_PAIRS and (first != second).all()
    counts = torch.bincount(torch.cat([first, second]), minlength=seeds).double()
    assert abs(counts.mean() - 2 * MAX_PAIRS / seeds) < 1e-9 and counts.std() < 0.25 * counts.mean()
    # The estimate from sampled pairs is close to the exact mean over all pairs.
    samples = torch.randn(1, seeds, 2, generator=_generator(1), dtype=torch.float64)
    exact = torch.pdist(samples[0]).mean()
    estimate = perceptual_diversity(samples, PointFeatures(), progress=False)
    assert abs(float(estimate[0]) - float(exact)) < 0.05 * float(exact)


def _random_spd(dim, generator):
    matrix = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return matrix @ matrix.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)


def test_frechet_distance_matches_closed_forms():
    # Diagonal covariances: |mu_a - mu_b|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    mean_b = torch.tensor([1.0, 2.0, 0.0])
    expected = 5.0 + float(((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance_from_statistics(
        torch.zeros(3), a.diag(), mean_b, b.diag()
    ) == pytest.approx(expected, rel=1e-12)
    # Non-commuting covariances: tr(S_a) + tr(S_b) - 2 tr(sqrtm(S_a S_b)), sqrtm from scipy.
    generator = _generator()
    cov_a, cov_b = _random_spd(6, generator), _random_spd(6, generator)
    trace_sqrt = np.trace(scipy.linalg.sqrtm(cov_a.numpy() @ cov_b.numpy())).real
    expected = float(cov_a.trace() + cov_b.trace()) - 2 * trace_sqrt
    zero = torch.zeros(6)
    assert frechet_distance_from_statistics(zero, cov_a, zero, cov_b) == pytest.approx(expected)
    assert frechet_distance_from_statistics(zero, cov_a, zero, cov_a) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_from_samples():
    generator = _generator()
    dim, n = 4, 20000
    cov = _random_spd(dim, generator)
    root = torch.linalg.cholesky(cov)

    def draw():
        return torch.randn(n, dim, generator=generator, dtype=torch.float64) @ root.T

    # Same distribution: only the finite-sample bias, for S = I about 2 d / n from the means and
    # (d^2 + d) / 2n from the covariances (Bures distance ~ |S_a - S_b|_F^2 / 4); allow twice it.
    bias = (2 + (dim + 1) / 2) * float(cov.trace()) / n
    assert frechet_distance(draw(), draw()) < 2 * bias
    shift = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert frechet_distance(draw(), draw() * 2 + shift) == pytest.approx(
        frechet_distance_from_statistics(torch.zeros(dim), cov, shift, 4 * cov), rel=0.05
    )


def _mixture_samples(means, n, generator, std=0.1):
    means = torch.tensor(means, dtype=torch.float64)
    modes = torch.randint(len(means), (n,), generator=generator)
    return means[modes] + std * torch.randn(n, 2, generator=generator, dtype=torch.float64)


def test_precision_recall():
    generator = _generator()
    modes = [[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0]]
    real = _mixture_samples(modes, 2000, generator)
    precision, recall = precision_recall(real, _mixture_samples(modes, 2000, generator))
    assert precision > 0.9 and recall > 0.9
    # Two of the four modes dropped: every fake sample is realistic, half the real ones missed.
    precision, recall = precision_recall(real, _mixture_samples(modes[:2], 2000, generator))
    assert precision > 0.9 and 0.4 < recall < 0.6
    precision, recall = precision_recall(real, _mixture_samples(modes, 2000, generator) + 1.0)
    assert precision < 0.1 and recall < 0.1


def test_mode_statistics_on_a_constructed_case():
    mixture = Mixture.from_values([[0, 0], [10, 0], [0, 10]], [2, 1, 1], std=1.0)
    torch.testing.assert_close(
        mixture.weights, torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    )
    # Two samples on mode 0, two near mode 1 (one at 2.9 std), none on mode 2, one off-mode
    # (3.1 std from mode 0, its nearest).
    points = torch.tensor([[0, 0], [0.5, 0], [10, 0], [10, 2.9], [3.1, 0]], dtype=torch.float64)
    stats = mode_statistics(points, mixture, radius=3.0)
    assert stats["mode_coverage"] == pytest.approx(2 / 3)
    assert stats["mode_fractions"] == pytest.approx([0.4, 0.4, 0.0])
    assert stats["mass_error_mean"] == pytest.approx((0.1 + 0.15 + 0.25) / 3)
    assert stats["mass_error_max"] == pytest.approx(0.25)
    assert stats["on_mode_fraction"] == pytest.approx(0.8)
    # Samples drawn from the mixture itself: full coverage, small mass errors.
    stats = mode_statistics(mixture.sample(20000, seed=0), mixture)
    assert stats["mode_coverage"] == 1 and stats["mass_error_max"] < 0.02
    assert stats["on_mode_fraction"] == pytest.approx(1 - math.exp(-4.5), abs=0.005)


@pytest.mark.parametrize(
    "means, weights, std, message",
    [
        ([0, 1], [1], 1.0, "means must be"),
        ([[0, 1]], [1, 1], 1.0, "one per mode"),
        ([[0, 1]], [0], 1.0, "weights must be > 0"),
        ([[0, 1]], [1], 0.0, "std must be > 0"),
    ],
)
def test_mixture_validation(means, weights, std, message):
    with pytest.raises(ValueError, match=message):
        Mixture.from_values(means, weights, std)


def test_mean_confidence_interval():
    mean, half_width = mean_confidence_interval([1.0, 2.0, 3.0])
    # Sample std 1, t_{0.975, 2} = 4.3027.
    assert mean == 2.0 and half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert mean_confidence_interval([0.5]) == (0.5, None)

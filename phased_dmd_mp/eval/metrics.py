"""Diversity and fidelity metrics on features, in float64.

- Diversity per condition over S seeds, as in the paper's Table 2: the mean over the S (S - 1) / 2
  pairs of seeds of the cosine similarity of their features (lower = more diverse) and of their
  perceptual distance (higher = more diverse; a random subset of MAX_PAIRS pairs when there are
  more).
- Frechet distance between Gaussians fitted to two feature sets (FID's formula).
- Precision and recall with k-NN manifolds (Kynkaanniemi et al., 2019).
- Mean and t-distribution confidence interval of a metric over training seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor
from tqdm import tqdm

from phased_dmd_mp.eval.extractors import PerceptualDistance

PAIR_BATCH = 1024  # pairs per perceptual-distance call
MAX_PAIRS = 1024  # per condition; beyond it a seeded random subset of pairs estimates the mean
ROW_CHUNK = 1024  # rows per block of a distance matrix, to bound memory


def cosine_diversity(features: Tensor) -> Tensor:
    """features [C, S, F] -> [C]: mean pairwise cosine similarity within each condition.

    Over the pairs i != j, sum u_i . u_j = ||sum_i u_i||^2 - sum_i ||u_i||^2 for the unit vectors
    u_i, so the mean is exact in O(S F) instead of forming the S x S similarity matrix."""
    seeds = features.shape[1]
    unit = F.normalize(features.double(), dim=-1)  # an all-zero feature stays zero
    cross = unit.sum(dim=1).square().sum(dim=-1) - unit.square().sum(dim=(1, 2))
    return cross / (seeds * (seeds - 1))


def seed_pairs(seeds: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """All pairs i < j of seeds, or MAX_PAIRS uniformly drawn pairs i != j if there are more."""
    if seeds * (seeds - 1) // 2 <= MAX_PAIRS:
        first, second = torch.triu_indices(seeds, seeds, offset=1)
        return first, second
    first = torch.randint(seeds, (MAX_PAIRS,), generator=generator)
    second = torch.randint(seeds - 1, (MAX_PAIRS,), generator=generator)
    return first, second + (second >= first)  # skip i itself: uniform over j != i


def perceptual_diversity(
    samples: Tensor, perceptual: PerceptualDistance, progress: bool = True, seed: int = 0
) -> Tensor:
    """samples [C, S, ...] -> [C]: mean pairwise perceptual distance within each condition (over
    at most MAX_PAIRS pairs per condition, see seed_pairs)."""
    generator = torch.Generator().manual_seed(seed)
    pairs = [seed_pairs(samples.shape[1], generator) for _ in range(samples.shape[0])]
    bar = tqdm(
        total=sum(len(first) for first, _ in pairs),
        desc=f"{perceptual.name} pairs",
        disable=not progress,
        leave=False,
    )
    means = []
    for condition, (first, second) in zip(samples, pairs):
        total = 0.0
        for start in range(0, len(first), PAIR_BATCH):
            a, b = first[start : start + PAIR_BATCH], second[start : start + PAIR_BATCH]
            total += float(perceptual.distance(condition[a], condition[b]).double().sum())
            bar.update(len(a))
        means.append(total / len(first))
    bar.close()
    return torch.tensor(means, dtype=torch.float64)


def gaussian_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [F] and unbiased covariance [F, F] of features [N, F], in float64."""
    features = features.double()
    return features.mean(dim=0), torch.atleast_2d(torch.cov(features.T))


def _sqrt_psd(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix via eigh (negative round-off
    eigenvalues clipped to 0), so the result is real and symmetric, unlike a general sqrtm."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance_from_statistics(
    mean_a: Tensor, cov_a: Tensor, mean_b: Tensor, cov_b: Tensor
) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2).

    tr((S_a S_b)^1/2) equals the trace of the square root of the symmetric S_a^1/2 S_b S_a^1/2,
    whose eigenvalues are real and >= 0, so everything stays an eigh of a symmetric matrix.
    """
    mean_a, cov_a, mean_b, cov_b = (x.double() for x in (mean_a, cov_a, mean_b, cov_b))
    root_a = _sqrt_psd(cov_a)
    cross = root_a @ cov_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((cross + cross.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return max(float(distance), 0.0)


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to features [N_a, F] and [N_b, F]. Its estimate is
    biased upwards by about (tr S_a / N_a + tr S_b / N_b): compare models at equal sample counts."""
    return frechet_distance_from_statistics(
        *gaussian_statistics(features_a), *gaussian_statistics(features_b)
    )


def _blocks(queries: Tensor, keys: Tensor):
    """Distance matrix queries x keys, yielded ROW_CHUNK rows at a time."""
    for start in range(0, len(queries), ROW_CHUNK):
        yield torch.cdist(queries[start : start + ROW_CHUNK], keys)


def knn_radii(features: Tensor, k: int) -> Tensor:
    """Distance from each point to its k-th nearest other point."""
    if len(features) <= k:
        raise ValueError(f"k-NN radii with k = {k} need more than {k} points, got {len(features)}")
    features = features.double()
    # Index 0 of the sorted distances is the point itself (distance 0).
    return torch.cat(
        [block.topk(k + 1, largest=False).values[:, k] for block in _blocks(features, features)]
    )


def _inside_manifold(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """Whether each point lies in some ball (centre, radius) of the k-NN manifold."""
    return torch.cat(
        [(block <= radii).any(dim=1) for block in _blocks(points.double(), centres.double())]
    )


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Kynkaanniemi et al. (2019): precision = fraction of fake samples inside the real k-NN
    manifold (fidelity), recall = fraction of real samples inside the fake one (coverage).
    Both manifolds depend on their sample count; pass equally many real and fake samples."""
    precision = _inside_manifold(fake, real, knn_radii(real, k)).double().mean()
    recall = _inside_manifold(real, fake, knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


def mean_confidence_interval(
    values: Sequence[float], confidence: float = 0.95
) -> tuple[float, float | None]:
    """Mean and half-width of its t-distribution confidence interval (None for one value)."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n))

"""Gaussian mixtures (the synthetic point benchmarks) and their exact mode metrics.

Assignment rule: each sample goes to its nearest mode mean and counts for that mode only if it lies
within `radius` mixture standard deviations of it (3 by default, which holds 98.9% of a 2D
Gaussian's mass); a sample farther than that from its nearest mode is off-mode.
- mode coverage: the fraction of modes with at least one sample;
- per-mode mass error: |observed fraction - true weight|, the observed fraction being the mode's
  count over all samples (so off-mode samples count against every mode); mean and max over modes;
- on-mode fraction: the fraction of samples that count for some mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class Mixture:
    """Isotropic Gaussian mixture: means [M, D], weights [M] summing to 1, one shared std."""

    means: Tensor
    weights: Tensor
    std: float

    @classmethod
    def from_values(cls, means: Sequence, weights: Sequence, std: float) -> Mixture:
        """Validated mixture; weights only need to be positive, they are normalised here."""
        means = torch.as_tensor(means, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if means.ndim != 2 or len(means) < 1:
            raise ValueError(f"mixture means must be [modes, dims], got shape {tuple(means.shape)}")
        if weights.shape != (len(means),):
            raise ValueError(
                f"mixture weights must be one per mode ({len(means)}), got {tuple(weights.shape)}"
            )
        if not (weights > 0).all() or not torch.isfinite(means).all():
            raise ValueError("mixture weights must be > 0 and means finite")
        if not float(std) > 0:
            raise ValueError(f"mixture std must be > 0, got {std}")
        return cls(means, weights / weights.sum(), float(std))

    def same_as(self, other: Mixture) -> bool:
        return (
            torch.equal(self.means, other.means)
            and torch.equal(self.weights, other.weights)
            and self.std == other.std
        )

    def sample(self, n: int, seed: int) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        modes = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], dtype=torch.float64, generator=generator)
        return self.means[modes] + self.std * noise

    def to_json(self) -> dict:
        return {"means": self.means.tolist(), "weights": self.weights.tolist(), "std": self.std}


def mode_statistics(points: Tensor, mixture: Mixture, radius: float = 3.0) -> dict:
    """Coverage, mass errors and on-mode fraction of points [N, D] (module docstring's rule)."""
    distances = torch.cdist(points.double(), mixture.means)
    nearest_distance, nearest = distances.min(dim=1)
    on_mode = nearest_distance <= radius * mixture.std
    counts = torch.bincount(nearest[on_mode], minlength=len(mixture.means))
    fractions = counts.double() / len(points)
    errors = (fractions - mixture.weights).abs()
    return {
        "mode_coverage": float((counts > 0).double().mean()),
        "mass_error_mean": float(errors.mean()),
        "mass_error_max": float(errors.max()),
        "on_mode_fraction": float(on_mode.double().mean()),
        "mode_fractions": fractions.tolist(),
    }

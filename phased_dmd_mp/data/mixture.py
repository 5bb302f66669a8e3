"""The second embedded teacher's data: a 2D Gaussian mixture with many modes, unconditional.

Its modes sit on a square grid (5 x 5 by default) with equal weights and one small shared std, so
how many modes a few-step generator keeps and how evenly it spreads its mass over them are known
exactly (phased_dmd_mp.eval.mixture), which no image benchmark gives. A point is a one-token
"video latent" [2, 1, 1, 1] (C, F, H, W): the Wan DiT sees it with (1, 1, 1) patches. Generation
is unconditional, but the runner always draws from a condition set: it holds a single item (a
fixed, seeded random embedding, label 0) and the zero null condition.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from phased_dmd_mp.data.condition_writer import write_condition_set
from phased_dmd_mp.data.conditions import ConditionSet
from phased_dmd_mp.eval.mixture import Mixture
from phased_dmd_mp.schedule import FLOW_MATCHING

LATENT_SHAPE = (2, 1, 1, 1)  # channels (the point's coordinates), frames, height, width


def grid_mixture(side: int, spacing: float, std: float) -> Mixture:
    """side x side equally weighted modes spaced `spacing` apart, centred on the origin (5, 1.0:
    means {-2, -1, 0, 1, 2}^2), each an isotropic Gaussian of `std`."""
    axis = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    means = torch.cartesian_prod(axis, axis).view(-1, 2)  # view: side 1 gives [1, 2] too
    return Mixture.from_values(means, torch.ones(len(means)), std)


def points_to_latents(points: Tensor) -> Tensor:
    """Points [N, 2] as latents [N, 2, 1, 1, 1] (float32)."""
    return points.float().view(len(points), *LATENT_SHAPE)


def latents_to_points(latents: Tensor) -> Tensor:
    """Latents [..., 2, 1, 1, 1] back to points [..., 2]."""
    return latents.flatten(-len(LATENT_SHAPE))


def posterior_means(mixture: Mixture, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """E[x_0 | x_t] and E[eps | x_t] for latents x_t [N, 2, 1, 1, 1] at times t [N], where
    x_t = alpha_t x_0 + sigma_t eps (flow matching) and x_0 follows the mixture.

    Their difference is the exact velocity, the minimiser of Eq. 4: regressing on it instead of
    on the drawn eps - x_0 trains the same model without the target's variance, which at this
    mixture's sharp modes otherwise dominates (1000 steps of 512 put 89% of the teacher's samples
    on a mode; with drawn targets no learning rate, batch or std tried passed 50%).
    Given its mode k, x_t ~ N(alpha mu_k, v I) with v = alpha^2 std^2 + sigma^2, from which the
    mode's posterior weight and the Gaussian conditional means follow.
    """
    alpha, sigma = (c.view(-1, 1, 1) for c in FLOW_MATCHING.coefficients(t))  # float64
    offset = latents_to_points(x_t).double()[:, None] - alpha * mixture.means  # [N, modes, 2]
    variance = alpha**2 * mixture.std**2 + sigma**2  # the same for every mode: no log-det term
    log_weights = mixture.weights.log()[:, None] - offset.square().sum(-1, keepdim=True) / (
        2 * variance
    )
    responsibility = torch.softmax(log_weights, dim=1)
    x0 = (responsibility * (mixture.means + alpha * mixture.std**2 / variance * offset)).sum(1)
    eps = (responsibility * sigma / variance * offset).sum(1)
    return points_to_latents(x0).to(x_t.dtype), points_to_latents(eps).to(x_t.dtype)


def write_mixture_condition_set(path: str | Path, text_dim: int, seed: int) -> ConditionSet:
    """The single-item condition set: one token of seeded standard normals (label 0), null
    condition = zeros."""
    generator = torch.Generator().manual_seed(seed)
    return write_condition_set(
        path,
        items={
            "text": torch.randn(1, 1, text_dim, generator=generator),
            "labels": torch.zeros(1, dtype=torch.long),
        },
        uncond={"text": torch.zeros(1, text_dim)},
    )

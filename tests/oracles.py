"""Closed forms the tests compare against (Gaussian data, a second schedule)."""

import math

import torch

from phased_dmd_mp.schedule import NoiseSchedule


class CosineSchedule(NoiseSchedule):
    """Variance-preserving alpha = cos(pi t / 2), sigma = sin(pi t / 2): a non-flow schedule
    to show the schedule math is written for any (alpha_t, sigma_t)."""

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t):
        return torch.sin(0.5 * math.pi * t)


def gaussian_posterior(x, t, schedule, mean, var):
    """For x_0 ~ N(mean, var): (E[x_0 | x_t], E[eps | x_t], score of p(x_t)) at x_t = x."""
    alpha, sigma = (c.to(x.dtype) for c in schedule.coefficients(t))
    marginal_var = alpha**2 * var + sigma**2
    centred = x - alpha * mean
    return (
        mean + alpha * var * centred / marginal_var,
        sigma * centred / marginal_var,
        -centred / marginal_var,
    )


def gaussian_velocity(x, t, schedule, mean, var):
    """The exact velocity E[eps - x_0 | x_t] for x_0 ~ N(mean, var)."""
    x0_mean, eps_mean, _ = gaussian_posterior(x, t, schedule, mean, var)
    return eps_mean - x0_mean

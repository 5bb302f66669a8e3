"""Noise schedules, timestep shift, step tables, phase boundaries and interval samplers.

This module is the one home of the schedule math; everything else imports it.
Time runs from data (t = 0) to noise (t = 1): x_t = alpha_t x_0 + sigma_t eps.

Every coefficient is computed in float64 from the timesteps it is given, whatever the data
dtype: t and s are per-sample (a handful of numbers), and float64 keeps sigma_{t|s}, which
is a difference of nearly equal terms as t -> s, accurate down to t - s ~ 1e-12.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal, get_args

import torch
from torch import Tensor

TimeLike = Tensor | float

IntervalKind = Literal["nested", "disjoint"]
INTERVAL_KINDS: tuple[str, ...] = get_args(IntervalKind)


def as_time(t: TimeLike) -> Tensor:
    """A timestep (python float or tensor of any float dtype) as a float64 tensor."""
    return torch.as_tensor(t, dtype=torch.float64)


def compute_dtype(x: Tensor) -> torch.dtype:
    """Arithmetic on data runs in at least float32 (bf16/fp16 inputs are upcast)."""
    return torch.promote_types(x.dtype, torch.float32)


def per_sample(coef: Tensor, like: Tensor) -> Tensor:
    """A per-sample coefficient (shape () or (B,)) shaped to broadcast against data (B, ...),
    in the data's compute dtype."""
    coef = coef.to(device=like.device, dtype=compute_dtype(like))
    if coef.ndim == 1 and like.ndim > 1:
        coef = coef.view(-1, *([1] * (like.ndim - 1)))
    return coef


class NoiseSchedule(ABC):
    """x_t = alpha_t x_0 + sigma_t eps with SNR = alpha_t^2 / sigma_t^2 strictly decreasing in t.

    A schedule defines only alpha(t) and sigma(t) (float64 in, float64 out); every derived
    quantity below is written in terms of those two, so the paper's derivations, which hold for
    any such schedule, hold for every subclass. Networks predict the velocity v = eps - x_0.
    """

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor: ...

    def coefficients(self, t: TimeLike) -> tuple[Tensor, Tensor]:
        t = as_time(t)
        return self.alpha(t), self.sigma(t)

    def conditional(self, t: TimeLike, s: TimeLike) -> tuple[Tensor, Tensor]:
        """(alpha_{t|s}, sigma_{t|s}) of p(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2), s <= t.

        alpha_{t|s} = alpha_t / alpha_s and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2;
        rounding can push the latter a hair below zero at t = s, so it is clamped there.
        """
        alpha_t, sigma_t = self.coefficients(t)
        alpha_s, sigma_s = self.coefficients(s)
        alpha_ts = alpha_t / alpha_s
        sigma_ts = (sigma_t**2 - alpha_ts**2 * sigma_s**2).clamp_min(0.0).sqrt()
        return alpha_ts, sigma_ts

    def velocity_to_score_scale(self, t: TimeLike) -> Tensor:
        """lambda_t = 1 / (sigma_t + sigma_t^2 / alpha_t): score = -lambda_t (v + x_t / alpha_t).

        Written as alpha / (sigma (alpha + sigma)) so that it is 0, not nan, where alpha_t = 0.
        """
        alpha, sigma = self.coefficients(t)
        return alpha / (sigma * (alpha + sigma))

    def dmd_weight(self, t: TimeLike, s: TimeLike) -> Tensor:
        """w_{t|s} = lambda_t alpha_{t|s} of the phased DMD generator gradient (Eq. 11)."""
        alpha_ts, _ = self.conditional(t, s)
        return self.velocity_to_score_scale(t) * alpha_ts

    def jump_coefficients(self, t: TimeLike, s: TimeLike) -> tuple[Tensor, Tensor]:
        """(A, C) with A x_t + C v = alpha_s x^_0 + sigma_s eps^: the deterministic jump from t
        back to s that a velocity v implies (for flow matching A = 1, C = -(t - s))."""
        alpha_t, sigma_t = self.coefficients(t)
        alpha_s, sigma_s = self.coefficients(s)
        return (
            (alpha_s + sigma_s) / (alpha_t + sigma_t),
            (sigma_s * alpha_t - alpha_s * sigma_t) / (alpha_t + sigma_t),
        )

    def add_noise(self, x0: Tensor, eps: Tensor, t: TimeLike) -> Tensor:
        alpha, sigma = self.coefficients(t)
        return (per_sample(alpha, x0) * x0 + per_sample(sigma, x0) * eps).to(x0.dtype)

    def add_noise_from(self, x_s: Tensor, eps: Tensor, t: TimeLike, s: TimeLike) -> Tensor:
        """Draw from the conditional kernel: x_t = alpha_{t|s} x_s + sigma_{t|s} eps."""
        alpha_ts, sigma_ts = self.conditional(t, s)
        return (per_sample(alpha_ts, x_s) * x_s + per_sample(sigma_ts, x_s) * eps).to(x_s.dtype)

    def x0_from_velocity(self, x_t: Tensor, v: Tensor, t: TimeLike) -> Tensor:
        """x_0 = (x_t - sigma_t v) / (alpha_t + sigma_t); for flow matching x_t - t v."""
        alpha, sigma = self.coefficients(t)
        return ((x_t - per_sample(sigma, x_t) * v) / per_sample(alpha + sigma, x_t)).to(x_t.dtype)

    def eps_from_velocity(self, x_t: Tensor, v: Tensor, t: TimeLike) -> Tensor:
        """eps = (x_t + alpha_t v) / (alpha_t + sigma_t)."""
        alpha, sigma = self.coefficients(t)
        return ((x_t + per_sample(alpha, x_t) * v) / per_sample(alpha + sigma, x_t)).to(x_t.dtype)

    def denoise_step(
        self, x_t: Tensor, v: Tensor, t: TimeLike, t_next: TimeLike, noise: Tensor | None = None
    ) -> Tensor:
        """One few-step sampler step from t to t_next < t.

        Predict x_0 from the velocity, then move to t_next: with `noise=None` deterministically
        (DDIM; for flow matching this is exactly an Euler step x_t - (t - t_next) v), otherwise
        by re-noising x_0 with the given fresh noise as DMD2 does.
        """
        x0 = self.x0_from_velocity(x_t, v, t)
        if noise is None:
            noise = self.eps_from_velocity(x_t, v, t)
        return self.add_noise(x0, noise, t_next)


class FlowMatchingSchedule(NoiseSchedule):
    """alpha_t = 1 - t, sigma_t = t: the convention of Wan and Qwen-Image."""

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t


FLOW_MATCHING = FlowMatchingSchedule()


# --- timestep shift, step tables and phases ------------------------------------------------


def _check_shift(shift: float) -> None:
    if not shift > 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")


def shift_time(u: TimeLike, shift: float) -> Tensor:
    """t = shift u / (1 + (shift - 1) u): Wan uses shift 5, Qwen-Image 3; shift 1 is identity."""
    _check_shift(shift)
    u = as_time(u)
    return shift * u / (1.0 + (shift - 1.0) * u)


def unshift_time(t: TimeLike, shift: float) -> Tensor:
    """Inverse of `shift_time`: u = t / (shift - (shift - 1) t)."""
    _check_shift(shift)
    t = as_time(t)
    return t / (shift - (shift - 1.0) * t)


def timestep_table(num_steps: int, shift: float) -> Tensor:
    """The N-step sampler's timesteps 1 = t_0 > t_1 > ... > t_N = 0, evenly spaced before shift.

    4 steps with shift 5 give (1, 0.9375, 0.8333, 0.625, 0) (paper Table 1 / Fig. 8).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_time(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)


def phase_step_boundaries(num_steps: int, num_phases: int) -> list[int]:
    """Step indices where phases start and end: phase k (1-based) owns steps [b_{k-1}, b_k).

    Phases split the steps evenly, so num_phases must divide num_steps.
    """
    if num_phases < 1 or num_steps < 1:
        raise ValueError(f"need num_steps >= 1 and num_phases >= 1, got {num_steps}, {num_phases}")
    if num_steps % num_phases:
        raise ValueError(
            f"{num_phases} phases cannot split {num_steps} steps evenly; "
            "choose num_phases dividing num_steps (the paper uses 4 steps with 2 or 4 phases)"
        )
    per_phase = num_steps // num_phases
    return [k * per_phase for k in range(num_phases + 1)]


def phase_boundaries(num_steps: int, num_phases: int, shift: float) -> Tensor:
    """Phase boundary timesteps 1 = t_{b_0} > t_{b_1} > ... > t_{b_K} = 0 (K + 1 values).

    Expert k maps p(x at boundary k-1) to p(x at boundary k); 4 steps, 2 phases, shift 5
    give (1, 0.8333, 0).
    """
    steps = phase_step_boundaries(num_steps, num_phases)
    return timestep_table(num_steps, shift)[steps]


def injection_interval(
    phase: int, num_steps: int, num_phases: int, shift: float, kind: IntervalKind = "nested"
) -> tuple[float, float]:
    """Noise-injection interval (low, high) of phase k (1-based) in shifted time.

    "nested" is the paper's reverse nested T(t; t_k, 1); "disjoint" is TDM's T(t; t_k, t_{k-1}).
    """
    if kind not in INTERVAL_KINDS:
        raise ValueError(f"interval kind must be one of {INTERVAL_KINDS}, got {kind!r}")
    if not 1 <= phase <= num_phases:
        raise ValueError(f"phase must be in 1..{num_phases}, got {phase}")
    bounds = phase_boundaries(num_steps, num_phases, shift)
    high = 1.0 if kind == "nested" else float(bounds[phase - 1])
    return float(bounds[phase]), high


def sample_timesteps(
    n: int,
    low: float,
    high: float,
    shift: float,
    *,
    restrict_to: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw n timesteps in (low, high) (shifted time), uniformly *before* the shift.

    That is: u ~ U(unshift(low), unshift(high)), t = shift(u) (paper appendix C, Fig. 8). With
    `restrict_to=(lo, hi)` the draw is further limited to (lo, hi), e.g. Wan2.2's high-noise
    expert range (0.875, 1): the u-range is intersected with the unshifted restriction, so the
    samples stay uniform-before-shift inside it. (The paper clamps t instead, which puts the
    probability mass below the boundary onto the boundary itself.) Returns float32.
    """
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"need 0 <= low < high <= 1, got ({low}, {high})")
    if restrict_to is not None:
        lo, hi = restrict_to
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"restrict_to needs 0 <= lo < hi <= 1, got {restrict_to}")
        low, high = max(low, lo), min(high, hi)
        if low >= high:
            raise ValueError(f"restrict_to={restrict_to} does not overlap the interval")
    u_low, u_high = float(unshift_time(low, shift)), float(unshift_time(high, shift))
    u = torch.rand(n, dtype=torch.float64, generator=generator, device=device)
    t = shift_time(u_low + (u_high - u_low) * u, shift)
    return t.to(torch.float32)

import math

import pytest
import torch
from oracles import CosineSchedule, gaussian_posterior, gaussian_velocity

from phased_dmd_mp.schedule import (
    FLOW_MATCHING,
    injection_interval,
    phase_boundaries,
    phase_step_boundaries,
    sample_timesteps,
    shift_time,
    timestep_table,
    unshift_time,
)

SCHEDULES = [FLOW_MATCHING, CosineSchedule()]


def _pairs():
    s = torch.tensor([0.0, 0.1, 0.5, 0.8333, 0.9])
    t = torch.tensor([0.3, 0.6, 0.75, 0.95, 1.0])
    return t.double(), s.double()


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["flow", "cosine"])
def test_conditional_kernel_composes_to_marginal(schedule):
    # x_t = a_{t|s} (a_s x0 + s_s e1) + s_{t|s} e2 must have mean a_t x0 and variance s_t^2.
    t, s = _pairs()
    alpha_t, sigma_t = schedule.coefficients(t)
    alpha_s, sigma_s = schedule.coefficients(s)
    alpha_ts, sigma_ts = schedule.conditional(t, s)
    torch.testing.assert_close(alpha_ts * alpha_s, alpha_t)
    torch.testing.assert_close(sigma_ts**2 + alpha_ts**2 * sigma_s**2, sigma_t**2)


def test_conditional_sigma_is_accurate_as_t_approaches_s():
    # Flow matching has the cancellation-free form (t - s)(t + s - 2ts) / (1 - s)^2.
    s = torch.full((4,), 0.625, dtype=torch.float64)
    t = s + torch.tensor([0.0, 1e-10, 1e-6, 1e-2], dtype=torch.float64)
    _, sigma_ts = FLOW_MATCHING.conditional(t, s)
    expected = ((t - s) * (t + s - 2 * t * s)).sqrt() / (1 - s)
    torch.testing.assert_close(sigma_ts, expected, rtol=1e-5, atol=0.0)
    assert sigma_ts[0] == 0.0


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["flow", "cosine"])
def test_lambda_converts_velocity_to_score(schedule):
    # score = -lambda_t (v + x_t / alpha_t), checked on Gaussian data where both are exact.
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    for t in (0.1, 0.5, 0.9):
        t = torch.tensor(t, dtype=torch.float64)
        _, _, score = gaussian_posterior(x, t, schedule, mean=0.7, var=0.5)
        v = gaussian_velocity(x, t, schedule, mean=0.7, var=0.5)
        alpha, _ = schedule.coefficients(t)
        torch.testing.assert_close(-schedule.velocity_to_score_scale(t) * (v + x / alpha), score)


def test_flow_matching_weights_in_closed_form():
    t, s = _pairs()
    torch.testing.assert_close(FLOW_MATCHING.velocity_to_score_scale(t), (1 - t) / t)
    torch.testing.assert_close(FLOW_MATCHING.dmd_weight(t, s), (1 - t) ** 2 / (t * (1 - s)))
    assert FLOW_MATCHING.velocity_to_score_scale(1.0) == 0.0  # alpha_1 = 0: zero, not nan


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["flow", "cosine"])
def test_velocity_conversions_invert_add_noise(schedule):
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64)
    x_t = schedule.add_noise(x0, eps, t)
    torch.testing.assert_close(schedule.x0_from_velocity(x_t, eps - x0, t), x0)
    torch.testing.assert_close(schedule.eps_from_velocity(x_t, eps - x0, t), eps)


def test_deterministic_step_is_euler_for_flow_matching():
    generator = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(2, 4, 3, generator=generator)
    t, t_next = torch.tensor([0.9, 0.8, 0.7, 1.0]), torch.tensor([0.5, 0.5, 0.2, 0.0])
    expected = x_t - (t - t_next)[:, None] * v
    torch.testing.assert_close(FLOW_MATCHING.denoise_step(x_t, v, t, t_next), expected)
    # Re-noising puts the predicted x_0 at t_next with the given noise.
    noise = torch.randn(4, 3, generator=generator)
    renoised = FLOW_MATCHING.denoise_step(x_t, v, t, t_next, noise=noise)
    x0 = x_t - t[:, None] * v
    torch.testing.assert_close(renoised, (1 - t_next)[:, None] * x0 + t_next[:, None] * noise)


def test_add_noise_keeps_bf16_and_is_computed_in_fp32():
    x0 = torch.randn(8, 16).bfloat16()
    eps = torch.randn(8, 16).bfloat16()
    t = torch.rand(8)
    out = FLOW_MATCHING.add_noise(x0, eps, t)
    assert out.dtype == torch.bfloat16
    reference = ((1 - t[:, None]) * x0.float() + t[:, None] * eps.float()).bfloat16()
    assert torch.equal(out, reference)


def test_shift_round_trip_and_paper_table():
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    for shift in (1.0, 3.0, 5.0):
        torch.testing.assert_close(unshift_time(shift_time(u, shift), shift), u)
    torch.testing.assert_close(shift_time(u, 1.0), u)
    # Paper Table 1 / Fig. 8: 4 steps with shift 5 (Wan) and 3 (Qwen-Image).
    expected = torch.tensor([1.0, 0.9375, 5 / 6, 0.625, 0.0], dtype=torch.float64)
    torch.testing.assert_close(timestep_table(4, 5.0), expected)
    torch.testing.assert_close(
        timestep_table(4, 3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="shift"):
        shift_time(0.5, 0.0)


def test_phase_boundaries():
    assert phase_step_boundaries(4, 2) == [0, 2, 4]
    assert phase_step_boundaries(4, 4) == [0, 1, 2, 3, 4]
    torch.testing.assert_close(
        phase_boundaries(4, 2, 5.0), torch.tensor([1.0, 5 / 6, 0.0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="evenly"):
        phase_step_boundaries(4, 3)


def test_injection_intervals_nested_and_disjoint():
    boundary = 5 / 6
    assert injection_interval(1, 4, 2, 5.0, "nested") == pytest.approx((boundary, 1.0))
    assert injection_interval(2, 4, 2, 5.0, "nested") == pytest.approx((0.0, 1.0))
    assert injection_interval(1, 4, 2, 5.0, "disjoint") == pytest.approx((boundary, 1.0))
    assert injection_interval(2, 4, 2, 5.0, "disjoint") == pytest.approx((0.0, boundary))
    with pytest.raises(ValueError, match="phase"):
        injection_interval(3, 4, 2, 5.0)
    with pytest.raises(ValueError, match="interval kind"):
        injection_interval(1, 4, 2, 5.0, "overlapping")


def _max_cdf_gap_from_uniform(u, low, high):
    """Kolmogorov-Smirnov statistic of samples u against U(low, high)."""
    u = torch.sort((u.double() - low) / (high - low)).values
    n = len(u)
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float(torch.maximum(ranks - u, u - (ranks - 1.0 / n)).max())


def test_sampler_is_uniform_before_shift_within_the_interval():
    # Paper example: 4 steps, 2 phases, shift 5 -> phase 1 draws u in (0.5, 1).
    n = 20000
    low, high = injection_interval(1, 4, 2, 5.0)
    t = sample_timesteps(n, low, high, 5.0, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32
    assert float(t.min()) >= torch.tensor(low, dtype=torch.float32) and float(t.max()) <= high
    u = unshift_time(t, 5.0)
    critical = 1.63 / math.sqrt(n)  # KS at the 1% level
    assert _max_cdf_gap_from_uniform(u, 0.5, 1.0) < critical
    # ...and not uniform after the shift (the test can tell the two apart).
    assert _max_cdf_gap_from_uniform(t, low, high) > 10 * critical


def test_sampler_restriction_stays_uniform_before_shift():
    # Wan2.2 T2V high-noise expert: phase 1 restricted to (0.875, 1), no mass piled on 0.875.
    n = 20000
    low, high = injection_interval(1, 4, 2, 5.0)
    t = sample_timesteps(
        n, low, high, 5.0, restrict_to=(0.875, 1.0), generator=torch.Generator().manual_seed(1)
    )
    assert float(t.min()) >= 0.875
    assert int((t == 0.875).sum()) == 0
    u_low = float(unshift_time(0.875, 5.0))
    assert _max_cdf_gap_from_uniform(unshift_time(t, 5.0), u_low, 1.0) < 1.63 / math.sqrt(n)
    with pytest.raises(ValueError, match="does not overlap"):
        sample_timesteps(4, 0.0, 0.5, 5.0, restrict_to=(0.875, 1.0))
    with pytest.raises(ValueError, match="low < high"):
        sample_timesteps(4, 0.9, 0.5, 5.0)

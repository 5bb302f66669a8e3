import pytest
import torch
from oracles import CosineSchedule, gaussian_posterior, gaussian_velocity

from phased_dmd_mp.losses import (
    DEFAULT_MAX_WEIGHT,
    classifier_free_guidance,
    dmd2_normalized_gradient,
    dmd_generator_loss,
    dmd_gradient,
    dmd_surrogate_loss,
    flow_matching_loss,
    subinterval_flow_loss,
    subinterval_velocity_target,
    subinterval_x0_loss,
    subinterval_x0_target,
)
from phased_dmd_mp.schedule import FLOW_MATCHING

SCHEDULES = [FLOW_MATCHING, CosineSchedule()]
SCHEDULE_IDS = ["flow", "cosine"]
# Every loss runs both ways: pure torch and the fused kernels (tests/test_kernels.py has parity).
BACKENDS = pytest.mark.parametrize("backend", ["reference", "fused"])


def _data(shape=(6, 3, 4), seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=dtype) for _ in range(3))


def test_flow_matching_loss_is_eq4():
    v, x0, eps = _data()
    assert flow_matching_loss(v, x0, eps) == pytest.approx(float(((v - (eps - x0)) ** 2).mean()))
    per_sample = flow_matching_loss(v, x0, eps, reduction="none")
    assert per_sample.shape == (6,)
    with pytest.raises(ValueError, match="reduction"):
        flow_matching_loss(v, x0, eps, reduction="sum")


@BACKENDS
@pytest.mark.parametrize("schedule", SCHEDULES, ids=SCHEDULE_IDS)
def test_s_zero_reduces_to_the_plain_targets(schedule, backend):
    v, x0, eps = _data()
    t = torch.tensor([0.15, 0.3, 0.5, 0.7, 0.9, 0.99], dtype=torch.float64)
    zero = torch.zeros(6, dtype=torch.float64)
    torch.testing.assert_close(subinterval_velocity_target(x0, eps, t, zero, schedule), eps - x0)
    torch.testing.assert_close(subinterval_x0_target(x0, eps, t, zero, schedule), x0)
    torch.testing.assert_close(
        schedule.add_noise_from(x0, eps, t, zero), schedule.add_noise(x0, eps, t)
    )
    # With the weight unclamped (1/sigma_t^2 <= max_weight), Eq. 13 at s = 0 is Eq. 4.
    loss = subinterval_flow_loss(v, x0, eps, t, zero, schedule=schedule, backend=backend)
    torch.testing.assert_close(loss, flow_matching_loss(v, x0, eps))
    torch.testing.assert_close(
        subinterval_x0_loss(v, x0, eps, t, zero, schedule=schedule, backend=backend),
        ((v - x0) ** 2).mean(),
    )


def _regress_on_x_t(target, x_t):
    """Least-squares (intercept, slope) of E[target | x_t]: exact when jointly Gaussian."""
    design = torch.stack([torch.ones_like(x_t), x_t], dim=1)
    return torch.linalg.lstsq(design, target[:, None]).solution.squeeze(1)


def _true_regression(schedule, t, mean, var, kind):
    x = torch.tensor([0.0, 1.0], dtype=torch.float64)  # linear in x: read off at 0 and 1
    x0_mean, eps_mean, _ = gaussian_posterior(x, torch.tensor(t), schedule, mean, var)
    values = eps_mean - x0_mean if kind == "velocity" else x0_mean
    return torch.stack([values[0], values[1] - values[0]])


@pytest.mark.parametrize("schedule", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("kind", ["velocity", "x0"])
@pytest.mark.parametrize("s, t", [(0.3, 0.45), (0.5, 0.8), (0.6, 0.99)])
def test_subinterval_target_is_unbiased_on_gaussian_data(schedule, kind, s, t):
    """E[target | x_t] must equal the true E[eps - x_0 | x_t] (or E[x_0 | x_t]) using only x_s.

    x_0 ~ N(0.7, 0.5): everything is jointly Gaussian, so E[. | x_t] is linear in x_t and a
    least-squares fit over many draws recovers it exactly up to sampling noise.
    """
    n, mean, var = 400_000, 0.7, 0.5
    generator = torch.Generator().manual_seed(1)
    x0 = mean + var**0.5 * torch.randn(n, generator=generator, dtype=torch.float64)
    x_s = schedule.add_noise(x0, torch.randn(n, generator=generator, dtype=torch.float64), s)
    eps = torch.randn(n, generator=generator, dtype=torch.float64)
    x_t = schedule.add_noise_from(x_s, eps, t, s)
    target_fn = subinterval_velocity_target if kind == "velocity" else subinterval_x0_target
    fitted = _regress_on_x_t(target_fn(x_s, eps, t, s, schedule), x_t)
    expected = _true_regression(schedule, t, mean, var, kind)
    torch.testing.assert_close(fitted, expected, atol=0.02, rtol=0.0)
    # The naive targets (eps - x_s; x_s) are biased: the same check must reject them.
    naive = eps - x_s if kind == "velocity" else x_s
    assert (_regress_on_x_t(naive, x_t) - expected).abs().max() > 0.1


@BACKENDS
@pytest.mark.parametrize("schedule", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("kind", ["velocity", "x0"])
def test_clamped_loss_equals_eq12_where_the_clamp_is_inactive(schedule, kind, backend):
    pred, x_s, eps = _data()
    s = torch.full((6,), 0.4, dtype=torch.float64)
    t = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9, 1.0], dtype=torch.float64)
    _, sigma_ts = schedule.conditional(t, s)
    assert bool((1 / sigma_ts**2 <= DEFAULT_MAX_WEIGHT).all())
    target_fn = subinterval_velocity_target if kind == "velocity" else subinterval_x0_target
    loss_fn = subinterval_flow_loss if kind == "velocity" else subinterval_x0_loss
    expected = ((pred - target_fn(x_s, eps, t, s, schedule)) ** 2).flatten(1).mean(1)
    loss = loss_fn(pred, x_s, eps, t, s, schedule=schedule, reduction="none", backend=backend)
    torch.testing.assert_close(loss, expected)


def test_printed_eq13_sign_is_wrong():
    # The paper's Eq. 13 as printed, "- c eps - (sigma/alpha_s) x_s", does not equal Eq. 12.
    pred, x_s, eps = _data()
    s, t = torch.full((6,), 0.4, dtype=torch.float64), torch.full((6,), 0.8, dtype=torch.float64)
    alpha_t, sigma_t = FLOW_MATCHING.coefficients(t)
    alpha_s, sigma_s = FLOW_MATCHING.coefficients(s)
    _, sigma_ts = FLOW_MATCHING.conditional(t, s)
    c = ((alpha_s**2 * sigma_t + alpha_t * sigma_s**2) / alpha_s**2)[:, None, None]
    k = (sigma_ts / alpha_s)[:, None, None]
    printed = ((sigma_ts[:, None, None] * pred - c * eps - k * x_s) ** 2).mean() / sigma_ts[0] ** 2
    ours = subinterval_flow_loss(pred, x_s, eps, t, s)
    eq12 = ((pred - subinterval_velocity_target(x_s, eps, t, s)) ** 2).mean()
    torch.testing.assert_close(ours, eq12)
    assert abs(float(printed - eq12)) > 0.1


def _analytic_grad(pred, x_s, eps, t, s, max_weight):
    """d/d pred of clamp(1/sigma^2) mean((sigma pred - (c eps - sigma/alpha_s x_s))^2), float64."""
    pred, x_s, eps, t, s = (x.double() for x in (pred, x_s, eps, t, s))
    alpha_t, sigma_t = FLOW_MATCHING.coefficients(t)
    alpha_s, sigma_s = FLOW_MATCHING.coefficients(s)
    _, sigma_ts = FLOW_MATCHING.conditional(t, s)
    c = (alpha_s**2 * sigma_t + alpha_t * sigma_s**2) / alpha_s**2
    weight = (1 / sigma_ts**2).clamp(max=max_weight)
    residual = sigma_ts[:, None] * pred - c[:, None] * eps + (sigma_ts / alpha_s)[:, None] * x_s
    n = pred.numel()
    return 2 * weight[:, None] * sigma_ts[:, None] * residual / n


@BACKENDS
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_clamped_loss_is_finite_with_correct_gradient_as_t_approaches_s(dtype, rtol, backend):
    s = torch.full((5,), 0.625)
    t = s + torch.tensor([0.0, 1e-7, 1e-5, 1e-3, 0.1])  # t = s exactly, then ever further
    generator = torch.Generator().manual_seed(0)
    pred, x_s, eps = (torch.randn(5, 32, generator=generator).to(dtype) for _ in range(3))
    pred.requires_grad_(True)
    loss = subinterval_flow_loss(pred, x_s, eps, t, s, backend=backend)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    (grad,) = torch.autograd.grad(loss, pred)
    assert grad.dtype == dtype and bool(torch.isfinite(grad).all())
    expected = _analytic_grad(pred.detach(), x_s, eps, t, s, DEFAULT_MAX_WEIGHT)
    torch.testing.assert_close(grad.double(), expected, rtol=rtol, atol=1e-12)
    assert bool((grad[0] == 0).all())  # sigma_{t|s} = 0 at t = s: no gradient, no nan
    # At t = s the weight is the clamp, so the per-sample loss is max_weight * mean(c eps)^2.
    per_sample = subinterval_flow_loss(pred, x_s, eps, t, s, reduction="none", backend=backend)
    c0 = 0.625 * 1.0 / 0.375  # sigma_s (alpha_s + sigma_s) / alpha_s at t = s
    torch.testing.assert_close(
        per_sample[0].double(),
        DEFAULT_MAX_WEIGHT * c0**2 * (eps[0].double() ** 2).mean(),
        rtol=1e-5,
        atol=0.0,
    )


def test_max_weight_must_be_positive():
    pred, x_s, eps = _data()
    with pytest.raises(ValueError, match="max_weight"):
        subinterval_flow_loss(pred, x_s, eps, 0.8, 0.4, max_weight=0.0)


@pytest.mark.parametrize("s", [0.0, 0.4])
def test_dmd_gradient_is_the_kl_gradient_on_gaussians(s):
    """Real x_0 ~ N(0, 1), fake x_0 ~ N(m, 1): with exact teacher and fake velocities,
    w_{t|s} (T - F) must equal d KL(p_fake(x_t) || p_real(x_t)) / d x_s
    = alpha_{t|s} (score_fake - score_real)(x_t) = alpha_{t|s} alpha_t m / (alpha_t^2 + sigma_t^2),
    the same for every x_t (s = 0 is plain DMD)."""
    m = 0.8
    x_t = torch.linspace(-3, 3, 13, dtype=torch.float64)
    for t in (0.45, 0.6, 0.9):
        t_ = torch.full_like(x_t, t)
        s_ = torch.full_like(x_t, s)
        teacher = gaussian_velocity(x_t, t_, FLOW_MATCHING, 0.0, 1.0)
        fake = gaussian_velocity(x_t, t_, FLOW_MATCHING, m, 1.0)
        alpha_t, sigma_t = 1 - t, t
        expected = (alpha_t / (1 - s)) * alpha_t * m / (alpha_t**2 + sigma_t**2)
        torch.testing.assert_close(
            dmd_gradient(teacher, fake, t_, s_), torch.full_like(x_t, expected)
        )


def test_dmd2_normalisation_matches_dmd2_at_s_zero_and_keeps_the_direction():
    v_teacher, v_fake, x0 = _data(seed=3)
    generator = torch.Generator().manual_seed(4)
    t = torch.rand(6, generator=generator, dtype=torch.float64) * 0.9 + 0.05
    zero = torch.zeros(6, dtype=torch.float64)
    x_t = FLOW_MATCHING.add_noise(
        x0, torch.randn(x0.shape, generator=generator, dtype=torch.float64), t
    )
    # DMD2 (Yin et al. 2024): (x0_fake - x0_real) / mean|x0 - x0_real|, x0_pred = x_t - t v.
    tt = t[:, None, None]
    real, fake = x_t - tt * v_teacher, x_t - tt * v_fake
    dmd2 = (fake - real) / (x0 - real).abs().mean(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(dmd2_normalized_gradient(v_teacher, v_fake, x_t, x0, t, zero), dmd2)
    # For s > 0 it is a positive per-sample multiple of w_{t|s} (T - F).
    s = torch.full((6,), 0.02, dtype=torch.float64)
    normalized = dmd2_normalized_gradient(v_teacher, v_fake, x_t, x0, t, s)
    ratio = normalized / dmd_gradient(v_teacher, v_fake, t, s)
    assert bool((ratio > 0).all())
    torch.testing.assert_close(ratio, ratio[:, :1, :1].expand_as(ratio))


def test_surrogate_loss_gradient_is_g():
    x_s, g, _ = _data(seed=5)
    x_s.requires_grad_(True)
    loss = dmd_surrogate_loss(x_s, g)
    (grad,) = torch.autograd.grad(loss, x_s)
    torch.testing.assert_close(grad, g / x_s.numel())
    torch.testing.assert_close(loss, 0.5 * (g**2).mean())


@BACKENDS
@pytest.mark.parametrize("normalize", [False, True])
def test_generator_loss_follows_the_guided_dmd_gradient(backend, normalize):
    x_s, cond, uncond = _data(seed=6)
    fake, x_t, _ = _data(seed=7)
    t, s = (
        torch.linspace(0.5, 0.95, 6, dtype=torch.float64),
        torch.full((6,), 0.3, dtype=torch.float64),
    )
    x = x_s.clone().requires_grad_(True)
    loss = dmd_generator_loss(
        x,
        cond,
        fake,
        t,
        s,
        v_teacher_uncond=uncond,
        guidance_scale=4.0,
        normalize=normalize,
        x_t=x_t,
        backend=backend,
    )
    (grad,) = torch.autograd.grad(loss, x)
    teacher = uncond + 4.0 * (cond - uncond)  # the documented CFG convention
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 4.0), teacher)
    if normalize:
        g = dmd2_normalized_gradient(teacher, fake, x_t, x_s, t, s)
    else:
        g = dmd_gradient(teacher, fake, t, s)
    torch.testing.assert_close(grad, g / x.numel())
    torch.testing.assert_close(loss, 0.5 * (g**2).mean())


def test_generator_loss_rejects_inconsistent_arguments():
    x_s, v, _ = _data(seed=8)
    with pytest.raises(ValueError, match="needs x_t"):
        dmd_generator_loss(x_s, v, v, 0.9, 0.5, normalize=True)
    with pytest.raises(ValueError, match="needs v_teacher_uncond"):
        dmd_generator_loss(x_s, v, v, 0.9, 0.5, guidance_scale=3.0)

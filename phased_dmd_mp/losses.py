"""Pure-torch reference losses: the oracle every fused op is tested against.

Conventions
- Data tensors are (B, ...); t and s are per-sample tensors of shape (B,) (or scalars) that
  broadcast against the data, with 0 <= s <= t <= 1.
- Arithmetic runs in at least float32 (bf16 inputs are upcast); schedule coefficients come from
  `phased_dmd_mp.schedule` in float64.
- A loss is the mean over a sample's elements (the usual MSE), then over the batch
  (reduction="mean"), or one value per sample (reduction="none").
- The losses with a `backend` argument run their element-wise part either here, in pure torch
  (the reference every fused kernel is tested against), or through the fused kernels of
  `phased_dmd_mp.ops`; see `phased_dmd_mp.ops.backend` for how the choice is made. Both share
  every schedule coefficient, computed once below.

Derivation of the clamped subinterval loss (paper Eq. 12/13, notation of docs/method.md)
  Score matching on (s, 1) with only x_s ~ p(x_s): the velocity target is
      psi* = c / sigma_{t|s} * eps - x_s / alpha_s,
      c = (alpha_s^2 sigma_t + alpha_t sigma_s^2) / alpha_s^2,
  with x_t = alpha_{t|s} x_s + sigma_{t|s} eps. Its conditional mean given x_t is the true
  velocity E[eps - x_0 | x_t]; with s = 0 it is eps - x_0. As t -> s, sigma_{t|s} -> 0 and the
  target blows up, so multiply the residual by sigma_{t|s} and weight by 1 / sigma_{t|s}^2:
      ||psi - psi*||^2 = (1 / sigma_{t|s}^2) ||sigma_{t|s} psi - (c eps - (sigma_{t|s}/alpha_s) x_s)||^2
  and clamp the weight from above. The paper's printed Eq. 13 reads "- c eps - (sigma/alpha_s)
  x_s" inside the norm: the parentheses around the target are missing, which flips the sign of
  the x_s term. Clamping only reweights timesteps, so the minimiser is unchanged.
  The x-prediction form (Eq. 35) has the same structure with
      mu* = x_s / alpha_s - (alpha_t sigma_s^2 / alpha_s^2) / sigma_{t|s} * eps.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from phased_dmd_mp import ops
from phased_dmd_mp.ops import Backend
from phased_dmd_mp.schedule import (
    FLOW_MATCHING,
    NoiseSchedule,
    TimeLike,
    as_time,
    compute_dtype,
    per_sample,
)

Prediction = Literal["velocity", "x0"]
Reduction = Literal["mean", "none"]

# Upper clamp of the weight 1 / sigma_{t|s}^2. It binds only where sigma_{t|s} < 0.1: for flow
# matching with s = 0.5 that is t - s < 0.005, 1% of the interval (0.5, 1). Below that the
# target's variance ~ 1 / sigma_{t|s}^2 would dominate the gradient noise; above it the loss is
# exactly Eq. 12. (1 / sigma^2 >= 1 whenever sigma <= 1, so no lower clamp is needed.)
DEFAULT_MAX_WEIGHT = 100.0

# Floor of DMD2's per-sample normaliser mean |x_s - x^_s[teacher]|, against division by zero.
DEFAULT_MIN_NORMALIZER = 1e-6


def _reduce(per_sample_loss: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return per_sample_loss.mean()
    if reduction == "none":
        return per_sample_loss
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _sample_mean(x: Tensor) -> Tensor:
    return x.flatten(1).mean(dim=1) if x.ndim > 1 else x


def flow_matching_loss(
    v_pred: Tensor, x0: Tensor, eps: Tensor, reduction: Reduction = "mean"
) -> Tensor:
    """Eq. 4: ||psi(x_t, t) - (eps - x_0)||^2 with x_t = alpha_t x_0 + sigma_t eps."""
    dtype = compute_dtype(v_pred)
    residual = v_pred.to(dtype) - (eps.to(dtype) - x0.to(dtype))
    return _reduce(_sample_mean(residual.square()), reduction)


def subinterval_coefficients(
    t: TimeLike,
    s: TimeLike,
    schedule: NoiseSchedule = FLOW_MATCHING,
    prediction: Prediction = "velocity",
) -> tuple[Tensor, Tensor, Tensor]:
    """(sigma_{t|s}, a, b) with the subinterval target = a x_s + (b / sigma_{t|s}) eps (float64).

    velocity (Eq. 12): a = -1 / alpha_s, b = (alpha_s^2 sigma_t + alpha_t sigma_s^2) / alpha_s^2
    x0       (Eq. 35): a =  1 / alpha_s, b = -alpha_t sigma_s^2 / alpha_s^2
    """
    t, s = as_time(t), as_time(s)
    alpha_t, sigma_t = schedule.coefficients(t)
    alpha_s, sigma_s = schedule.coefficients(s)
    _, sigma_ts = schedule.conditional(t, s)
    if prediction == "velocity":
        a = -1.0 / alpha_s
        b = (alpha_s**2 * sigma_t + alpha_t * sigma_s**2) / alpha_s**2
    elif prediction == "x0":
        a = 1.0 / alpha_s
        b = -alpha_t * sigma_s**2 / alpha_s**2
    else:
        raise ValueError(f"prediction must be 'velocity' or 'x0', got {prediction!r}")
    return sigma_ts, a.expand_as(sigma_ts), b.expand_as(sigma_ts)


def _subinterval_target(
    x_s: Tensor,
    eps: Tensor,
    t: TimeLike,
    s: TimeLike,
    schedule: NoiseSchedule,
    prediction: Prediction,
) -> Tensor:
    sigma_ts, a, b = subinterval_coefficients(t, s, schedule, prediction)
    dtype = compute_dtype(x_s)
    return per_sample(a, x_s) * x_s.to(dtype) + per_sample(b / sigma_ts, x_s) * eps.to(dtype)


def subinterval_velocity_target(
    x_s: Tensor, eps: Tensor, t: TimeLike, s: TimeLike, schedule: NoiseSchedule = FLOW_MATCHING
) -> Tensor:
    """Eq. 12: the unbiased velocity target on (s, 1) from x_s alone (diverges as t -> s)."""
    return _subinterval_target(x_s, eps, t, s, schedule, "velocity")


def subinterval_x0_target(
    x_s: Tensor, eps: Tensor, t: TimeLike, s: TimeLike, schedule: NoiseSchedule = FLOW_MATCHING
) -> Tensor:
    """Eq. 35: the unbiased x_0 target on (s, 1) from x_s alone (diverges as t -> s)."""
    return _subinterval_target(x_s, eps, t, s, schedule, "x0")


def clamped_subinterval_terms(
    t: TimeLike,
    s: TimeLike,
    schedule: NoiseSchedule,
    prediction: Prediction,
    max_weight: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample (scale, xs_coef, eps_coef, weight), float64, of the clamped loss

        weight * mean ||scale * pred - xs_coef * x_s - eps_coef * eps||^2,

    with scale = sigma_{t|s}, xs_coef = sigma_{t|s} a, eps_coef = b, weight = min(1/sigma^2, max).
    """
    if not max_weight > 0:
        raise ValueError(f"max_weight must be > 0, got {max_weight}")
    sigma_ts, a, b = subinterval_coefficients(t, s, schedule, prediction)
    weight = (1.0 / sigma_ts.square()).clamp(max=max_weight)  # 1/0 = inf -> max_weight
    return sigma_ts, sigma_ts * a, b, weight


def _clamped_subinterval_loss(
    pred: Tensor,
    x_s: Tensor,
    eps: Tensor,
    t: TimeLike,
    s: TimeLike,
    schedule: NoiseSchedule,
    prediction: Prediction,
    max_weight: float,
    reduction: Reduction,
    backend: Backend | None,
) -> Tensor:
    scale, xs_coef, eps_coef, weight = clamped_subinterval_terms(
        t, s, schedule, prediction, max_weight
    )
    dtype = compute_dtype(pred)
    if ops.use_fused(backend, (pred, x_s, eps), constants=(x_s, eps)):
        # The per-sample mean, the weight and the batch mean are folded into one coefficient,
        # so the gradient the kernel writes in the forward pass is the one backward returns.
        loss_coef = weight / pred[0].numel()
        if reduction == "mean":
            loss_coef = loss_coef / pred.shape[0]
        elif reduction != "none":
            _reduce(loss_coef, reduction)  # raises, naming the valid reductions
        sample_loss = ops.residual_loss(pred, x_s, eps, scale, xs_coef, eps_coef, loss_coef)
        sample_loss = sample_loss.to(dtype)
        return sample_loss.sum() if reduction == "mean" else sample_loss
    residual = (
        per_sample(scale, pred) * pred.to(dtype)
        - per_sample(xs_coef, pred) * x_s.to(dtype)
        - per_sample(eps_coef, pred) * eps.to(dtype)
    )
    sample_loss = _sample_mean(residual.square())
    return _reduce(weight.to(device=pred.device, dtype=dtype) * sample_loss, reduction)


def subinterval_flow_loss(
    v_pred: Tensor,
    x_s: Tensor,
    eps: Tensor,
    t: TimeLike,
    s: TimeLike,
    *,
    schedule: NoiseSchedule = FLOW_MATCHING,
    max_weight: float = DEFAULT_MAX_WEIGHT,
    reduction: Reduction = "mean",
    backend: Backend | None = None,
) -> Tensor:
    """Eq. 13 (corrected): clamp(1/sigma_{t|s}^2) ||sigma_{t|s} v - (c eps - (sigma_{t|s}/alpha_s) x_s)||^2.

    v_pred is the fake model's velocity at x_t = alpha_{t|s} x_s + sigma_{t|s} eps. Finite for
    every t >= s, including t = s; equal to ||v - psi*||^2 (Eq. 12) wherever 1/sigma^2 <= max_weight.
    The fused kernel differentiates v_pred only (x_s and eps are data).
    """
    return _clamped_subinterval_loss(
        v_pred, x_s, eps, t, s, schedule, "velocity", max_weight, reduction, backend
    )


def subinterval_x0_loss(
    x0_pred: Tensor,
    x_s: Tensor,
    eps: Tensor,
    t: TimeLike,
    s: TimeLike,
    *,
    schedule: NoiseSchedule = FLOW_MATCHING,
    max_weight: float = DEFAULT_MAX_WEIGHT,
    reduction: Reduction = "mean",
    backend: Backend | None = None,
) -> Tensor:
    """The clamped x-prediction form of Eq. 35, built like `subinterval_flow_loss`."""
    return _clamped_subinterval_loss(
        x0_pred, x_s, eps, t, s, schedule, "x0", max_weight, reduction, backend
    )


# --- generator update ----------------------------------------------------------------------


def dmd_gradient(
    v_teacher: Tensor,
    v_fake: Tensor,
    t: TimeLike,
    s: TimeLike,
    schedule: NoiseSchedule = FLOW_MATCHING,
) -> Tensor:
    """Eq. 11: g = w_{t|s} (T - F), the KL gradient w.r.t. the generator output x_s.

    w_{t|s} = lambda_t alpha_{t|s}; for flow matching (1 - t)/t * (1 - t)/(1 - s). T and F are
    the teacher (with CFG if configured) and fake velocities at x_t. With s = 0 this is DMD.
    """
    weight = schedule.dmd_weight(t, s)
    dtype = compute_dtype(v_teacher)
    return per_sample(weight, v_teacher) * (v_teacher.to(dtype) - v_fake.to(dtype))


def classifier_free_guidance(v_cond: Tensor, v_uncond: Tensor, guidance_scale: float) -> Tensor:
    """uncond + scale (cond - uncond): scale 1 is the conditional velocity, 0 the unconditional.

    (The other common convention, cond + scale' (cond - uncond), is this with scale = scale' + 1.)
    """
    dtype = compute_dtype(v_cond)
    return v_uncond.to(dtype) + guidance_scale * (v_cond.to(dtype) - v_uncond.to(dtype))


def dmd2_normalized_gradient(
    v_teacher: Tensor,
    v_fake: Tensor,
    x_t: Tensor,
    x_s: Tensor,
    t: TimeLike,
    s: TimeLike,
    schedule: NoiseSchedule = FLOW_MATCHING,
    min_normalizer: float = DEFAULT_MIN_NORMALIZER,
) -> Tensor:
    """DMD2's per-sample normalised gradient, carried from x_0 to the phase output x_s.

    Each model's velocity gives a jump from x_t back to s, x^_s = A x_t + C v
    (`NoiseSchedule.jump_coefficients`; for flow matching x_t - (t - s) v). The gradient is
        (x^_s[fake] - x^_s[teacher]) / max(mean |x_s - x^_s[teacher]|, min_normalizer),
    the mean taken over each sample; with s = 0 it is exactly DMD2's
    (x^_0[fake] - x^_0[real]) / mean |x_0 - x^_0[real]|. Its direction equals `dmd_gradient`'s
    (x^_s[fake] - x^_s[teacher] = -C (T - F), and -C > 0); the normaliser replaces w_{t|s}.
    """
    dtype = compute_dtype(v_teacher)
    jump_x, jump_v = schedule.jump_coefficients(t, s)
    teacher_xs = per_sample(jump_x, x_t) * x_t.to(dtype) + per_sample(jump_v, x_t) * v_teacher.to(
        dtype
    )
    normalizer = _sample_mean((x_s.to(dtype) - teacher_xs).abs()).clamp_min(min_normalizer)
    difference = per_sample(-jump_v, v_teacher) * (v_teacher.to(dtype) - v_fake.to(dtype))
    return difference / per_sample(normalizer, difference)


def dmd_surrogate_loss(x_s: Tensor, gradient: Tensor) -> Tensor:
    """0.5 * mean ||x_s - stopgrad(x_s - g)||^2, whose gradient w.r.t. x_s is g / x_s.numel().

    The value is 0.5 mean(g^2), a diagnostic only; training follows the gradient.
    """
    dtype = compute_dtype(x_s)
    x = x_s.to(dtype)
    return 0.5 * (x - (x - gradient.to(dtype)).detach()).square().mean()


def dmd_generator_loss(
    x_s: Tensor,
    v_teacher: Tensor,
    v_fake: Tensor,
    t: TimeLike,
    s: TimeLike,
    *,
    v_teacher_uncond: Tensor | None = None,
    guidance_scale: float = 1.0,
    normalize: bool = False,
    x_t: Tensor | None = None,
    schedule: NoiseSchedule = FLOW_MATCHING,
    min_normalizer: float = DEFAULT_MIN_NORMALIZER,
    backend: Backend | None = None,
) -> Tensor:
    """The phased DMD generator loss: value 0.5 mean(g^2), gradient g / x_s.numel() w.r.t. x_s.

    g = w_{t|s} (T - F) (Eq. 11; `dmd_gradient`), or DMD2's normalised form with `normalize=True`
    (`dmd2_normalized_gradient`, which needs x_t). T is v_teacher, or with `v_teacher_uncond`
    the guided `classifier_free_guidance(v_teacher, v_teacher_uncond, guidance_scale)`.
    x_s is the generator output (differentiable); the velocities and x_t are data.
    """
    if normalize and x_t is None:
        raise ValueError("normalize=True needs x_t, the noised sample the velocities were taken at")
    if v_teacher_uncond is None and guidance_scale != 1.0:
        raise ValueError("guidance_scale needs v_teacher_uncond")
    data = tuple(x for x in (x_s, v_teacher, v_teacher_uncond, v_fake, x_t) if x is not None)
    if ops.use_fused(backend, data, constants=data[1:]):
        if normalize:
            jump_x, jump_v = schedule.jump_coefficients(t, s)
            sums = ops.dmd_normalizer_sums(
                x_s.detach(), x_t, v_teacher, v_teacher_uncond, guidance_scale, jump_x, jump_v
            )
            normalizer = (sums / x_s[0].numel()).clamp_min(min_normalizer)
            weight = -jump_v.to(normalizer) / normalizer
        else:
            weight = schedule.dmd_weight(t, s)
        # The kernel writes g / x_s.numel(), the surrogate's gradient w.r.t. x_s, directly.
        grad, sq_sums = ops.dmd_direction(
            v_teacher, v_teacher_uncond, guidance_scale, v_fake, weight, 1.0 / x_s.numel()
        )
        value = 0.5 * sq_sums.sum().to(compute_dtype(x_s)) / x_s.numel()
        return ops.dmd_surrogate_loss(x_s, grad.view_as(x_s), value)
    teacher = (
        v_teacher
        if v_teacher_uncond is None
        else classifier_free_guidance(v_teacher, v_teacher_uncond, guidance_scale)
    )
    if normalize:
        g = dmd2_normalized_gradient(
            teacher, v_fake, x_t, x_s.detach(), t, s, schedule, min_normalizer
        )
    else:
        g = dmd_gradient(teacher, v_fake, t, s, schedule)
    return dmd_surrogate_loss(x_s, g)

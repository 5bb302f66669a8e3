"""Fused kernels (phased_dmd_mp._C, CPU and CUDA) and the switch that picks them.

The losses in phased_dmd_mp.losses call these where `use_fused` allows; the pure-torch
reference stays there as the oracle. `add_noise_from` is the fused form of
`NoiseSchedule.add_noise_from`.
"""

from torch import Tensor

from phased_dmd_mp.ops.backend import (
    BACKENDS,
    Backend,
    kernel_backend,
    set_kernel_backend,
    unsupported_reason,
    use_fused,
    use_kernel_backend,
)
from phased_dmd_mp.ops.kernels import (
    axpby,
    dmd_direction,
    dmd_normalizer_sums,
    dmd_surrogate_loss,
    residual_loss,
)
from phased_dmd_mp.schedule import FLOW_MATCHING, NoiseSchedule, TimeLike


def add_noise_from(
    x_s: Tensor,
    eps: Tensor,
    t: TimeLike,
    s: TimeLike,
    schedule: NoiseSchedule = FLOW_MATCHING,
    backend: Backend | None = None,
) -> Tensor:
    """x_t = alpha_{t|s} x_s + sigma_{t|s} eps in one read of x_s and eps and one write."""
    if not use_fused(backend, (x_s, eps)):
        return schedule.add_noise_from(x_s, eps, t, s)
    alpha_ts, sigma_ts = schedule.conditional(t, s)
    return axpby(x_s, eps, alpha_ts, sigma_ts)


__all__ = [
    "BACKENDS",
    "Backend",
    "add_noise_from",
    "axpby",
    "dmd_direction",
    "dmd_normalizer_sums",
    "dmd_surrogate_loss",
    "kernel_backend",
    "residual_loss",
    "set_kernel_backend",
    "unsupported_reason",
    "use_fused",
    "use_kernel_backend",
]

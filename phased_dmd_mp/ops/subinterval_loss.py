"""Fused clamped subinterval loss (Eq. 13 / Eq. 35): C++ kernels in csrc/subinterval_loss.

Same value and gradient as `losses.subinterval_flow_loss` / `losses.subinterval_x0_loss`, which
stay the oracle. Today: CPU, float32 and float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from phased_dmd_mp.losses import (
    DEFAULT_MAX_WEIGHT,
    Prediction,
    Reduction,
    _reduce,
    clamped_subinterval_terms,
)
from phased_dmd_mp.schedule import FLOW_MATCHING, NoiseSchedule, TimeLike

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}


def _extension():
    try:
        from phased_dmd_mp import _C
    except ImportError as error:
        raise RuntimeError(
            "phased_dmd_mp._C is not built; install the package with `pip install -e .` "
            "(needs CMake and a C++17 compiler)"
        ) from error
    return _C


def _pointer(x: Tensor) -> int:
    return x.data_ptr()


class _SubintervalLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, x_s, eps, scale, xs_coef, eps_coef, weight):
        batch = pred.shape[0]
        loss = torch.empty(batch, dtype=pred.dtype)
        _extension().subinterval_loss_forward_cpu(
            _DTYPE_NAMES[pred.dtype],
            *map(_pointer, (pred, x_s, eps, scale, xs_coef, eps_coef, weight, loss)),
            batch,
            pred[0].numel(),
        )
        ctx.save_for_backward(pred, x_s, eps, scale, xs_coef, eps_coef, weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        pred, x_s, eps, scale, xs_coef, eps_coef, weight = ctx.saved_tensors
        grad_loss = grad_loss.contiguous()
        grad_pred = torch.empty_like(pred)
        _extension().subinterval_loss_backward_cpu(
            _DTYPE_NAMES[pred.dtype],
            _pointer(grad_loss),
            *map(_pointer, (pred, x_s, eps, scale, xs_coef, eps_coef, weight)),
            _pointer(grad_pred),
            pred.shape[0],
            pred[0].numel(),
        )
        return grad_pred, None, None, None, None, None, None


def fused_subinterval_loss(
    pred: Tensor,
    x_s: Tensor,
    eps: Tensor,
    t: TimeLike,
    s: TimeLike,
    *,
    prediction: Prediction = "velocity",
    schedule: NoiseSchedule = FLOW_MATCHING,
    max_weight: float = DEFAULT_MAX_WEIGHT,
    reduction: Reduction = "mean",
) -> Tensor:
    """The clamped subinterval loss through the C++ kernel; gradient flows to `pred` only."""
    if pred.dtype not in _DTYPE_NAMES:
        raise TypeError(f"fused_subinterval_loss supports float32/float64, got {pred.dtype}")
    if pred.device.type != "cpu":
        raise NotImplementedError("fused_subinterval_loss runs on CPU only so far")
    if pred.ndim < 1 or x_s.shape != pred.shape or eps.shape != pred.shape:
        raise ValueError(
            f"pred, x_s and eps must share one (B, ...) shape, got "
            f"{tuple(pred.shape)}, {tuple(x_s.shape)}, {tuple(eps.shape)}"
        )
    batch = pred.shape[0]
    terms = clamped_subinterval_terms(t, s, schedule, prediction, max_weight)
    scale, xs_coef, eps_coef, weight = (
        term.expand(batch).contiguous() if term.ndim == 0 else term.contiguous() for term in terms
    )
    if scale.shape != (batch,):
        raise ValueError(f"t and s must be scalars or shape ({batch},), got {tuple(scale.shape)}")
    weight = weight / pred[0].numel()  # the kernel sums; the loss is a per-sample mean
    data = (tensor.detach().to(pred.dtype).contiguous() for tensor in (x_s, eps))
    loss = _SubintervalLoss.apply(pred.contiguous(), *data, scale, xs_coef, eps_coef, weight)
    return _reduce(loss, reduction)

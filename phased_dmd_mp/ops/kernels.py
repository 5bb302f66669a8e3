"""The fused kernels of phased_dmd_mp._C as torch custom ops (csrc/*/*.h define their semantics).

Each op is registered with `torch.library.custom_op` and a fake (meta) implementation, so
`torch.compile` traces around it. The public wrappers below take data of shape (B, ...) and
per-sample coefficients of shape () or (B,) in any float dtype; they make the data contiguous
(non-contiguous inputs are copied) and bring the coefficients to the accumulation dtype
(float64 for float64 data, float32 otherwise) on the data's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from phased_dmd_mp.ops.backend import extension

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layout(x: Tensor) -> tuple[int, int]:
    return x.shape[0], x[0].numel()


def _ptr(x: Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


def _call(name: str, like: Tensor, args: list, reduces: bool) -> None:
    """Run kernel `name` on like's device; `args` are tensors (or None) and floats, in order."""
    ext = extension()
    batch, per_sample = _layout(like)
    args = [_DTYPE_CODES[like.dtype], *(a if isinstance(a, float) else _ptr(a) for a in args)]
    if like.device.type == "cuda":
        if reduces:  # per-block partial sums, always float64 (csrc/common/cuda.cuh)
            workspace = torch.empty(
                batch * ext.max_cuda_parts, dtype=torch.float64, device=like.device
            )
            args.append(workspace.data_ptr())
        stream = torch.cuda.current_stream(like.device).cuda_stream
        getattr(ext, f"{name}_cuda")(*args, batch, per_sample, like.device.index, stream)
    else:
        getattr(ext, f"{name}_cpu")(*args, batch, per_sample, torch.get_num_threads())


# --- clamped subinterval loss ----------------------------------------------------------------


@torch.library.custom_op("phased_dmd::residual_sq_sums", mutates_args=())
def _residual_sq_sums(
    pred: Tensor, x_s: Tensor, eps: Tensor, scale: Tensor, xs_coef: Tensor, eps_coef: Tensor
) -> Tensor:
    sums = torch.empty(pred.shape[0], dtype=scale.dtype, device=pred.device)
    _call("residual_sq_sums", pred, [pred, x_s, eps, scale, xs_coef, eps_coef, sums], True)
    return sums


@_residual_sq_sums.register_fake
def _(pred, x_s, eps, scale, xs_coef, eps_coef):
    return pred.new_empty(pred.shape[0], dtype=scale.dtype)


@torch.library.custom_op("phased_dmd::residual_grad", mutates_args=())
def _residual_grad(
    gscale: Tensor,
    pred: Tensor,
    x_s: Tensor,
    eps: Tensor,
    scale: Tensor,
    xs_coef: Tensor,
    eps_coef: Tensor,
) -> Tensor:
    grad = torch.empty_like(pred)
    _call("residual_grad", pred, [gscale, pred, x_s, eps, scale, xs_coef, eps_coef, grad], False)
    return grad


@_residual_grad.register_fake
def _(gscale, pred, x_s, eps, scale, xs_coef, eps_coef):
    return torch.empty_like(pred)


def _residual_sq_sums_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _residual_sq_sums_backward(ctx, grad_sums):
    pred, x_s, eps, scale, xs_coef, eps_coef = ctx.saved_tensors
    gscale = (2 * grad_sums * scale).contiguous()
    grad = _residual_grad(gscale, pred, x_s, eps, scale, xs_coef, eps_coef)
    return grad, None, None, None, None, None


_residual_sq_sums.register_autograd(
    _residual_sq_sums_backward, setup_context=_residual_sq_sums_setup
)


# --- conditional noising -----------------------------------------------------------------------


@torch.library.custom_op("phased_dmd::axpby", mutates_args=())
def _axpby(x: Tensor, y: Tensor, a: Tensor, c: Tensor) -> Tensor:
    out = torch.empty_like(x)
    _call("axpby", x, [x, y, a, c, out], False)
    return out


@_axpby.register_fake
def _(x, y, a, c):
    return torch.empty_like(x)


def _axpby_setup(ctx, inputs, output):
    x, _, a, c = inputs
    ctx.save_for_backward(a, c)
    ctx.ndim = x.ndim


def _axpby_backward(ctx, grad):
    a, c = (coef.view(-1, *[1] * (ctx.ndim - 1)) for coef in ctx.saved_tensors)
    return (grad * a).to(grad.dtype), (grad * c).to(grad.dtype), None, None


_axpby.register_autograd(_axpby_backward, setup_context=_axpby_setup)


# --- DMD gradient ----------------------------------------------------------------------------


@torch.library.custom_op("phased_dmd::dmd_direction", mutates_args=())
def _dmd_direction(
    cond: Tensor, uncond: Tensor | None, guidance: float, fake: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor]:
    g = torch.empty_like(cond)
    sq_sums = torch.empty(cond.shape[0], dtype=weight.dtype, device=cond.device)
    _call("dmd_direction", cond, [cond, uncond, guidance, fake, weight, g, sq_sums], True)
    return g, sq_sums


@_dmd_direction.register_fake
def _(cond, uncond, guidance, fake, weight):
    return torch.empty_like(cond), cond.new_empty(cond.shape[0], dtype=weight.dtype)


@torch.library.custom_op("phased_dmd::dmd_normalizer_sums", mutates_args=())
def _dmd_normalizer_sums(
    x_s: Tensor,
    x_t: Tensor,
    cond: Tensor,
    uncond: Tensor | None,
    guidance: float,
    jump_x: Tensor,
    jump_v: Tensor,
) -> Tensor:
    sums = torch.empty(x_s.shape[0], dtype=jump_x.dtype, device=x_s.device)
    args = [x_s, x_t, cond, uncond, guidance, jump_x, jump_v, sums]
    _call("dmd_normalizer_sums", x_s, args, True)
    return sums


@_dmd_normalizer_sums.register_fake
def _(x_s, x_t, cond, uncond, guidance, jump_x, jump_v):
    return x_s.new_empty(x_s.shape[0], dtype=jump_x.dtype)


# --- public wrappers ---------------------------------------------------------------------------


def _data(*tensors: Tensor | None) -> list[Tensor | None]:
    first = tensors[0]
    if first.ndim < 1:
        raise ValueError("fused ops need data of shape (B, ...)")
    for x in tensors:
        if x is not None and x.shape != first.shape:
            raise ValueError(
                f"fused op inputs must share one shape, got {tuple(first.shape)} and {tuple(x.shape)}"
            )
    return [None if x is None else x.contiguous() for x in tensors]


def _coefficients(like: Tensor, *coefs: Tensor) -> list[Tensor]:
    batch, dtype = like.shape[0], accumulation_dtype(like.dtype)
    out = []
    for coef in coefs:
        coef = torch.as_tensor(coef).to(device=like.device, dtype=dtype)
        if coef.ndim == 0:
            coef = coef.expand(batch)
        if coef.shape != (batch,):
            raise ValueError(
                f"per-sample coefficients must be scalars or ({batch},), got {tuple(coef.shape)}"
            )
        out.append(coef.contiguous())
    return out


def residual_sq_sums(
    pred: Tensor, x_s: Tensor, eps: Tensor, scale: Tensor, xs_coef: Tensor, eps_coef: Tensor
) -> Tensor:
    """sums[b] = sum over sample b of (scale pred - xs_coef x_s - eps_coef eps)^2; differentiable in pred."""
    pred, x_s, eps = _data(pred, x_s, eps)
    return _residual_sq_sums(pred, x_s, eps, *_coefficients(pred, scale, xs_coef, eps_coef))


def axpby(x: Tensor, y: Tensor, a: Tensor, c: Tensor) -> Tensor:
    """a x + c y with per-sample a, c; differentiable in x and y."""
    x, y = _data(x, y)
    return _axpby(x, y, *_coefficients(x, a, c))


def dmd_direction(
    cond: Tensor, uncond: Tensor | None, guidance: float, fake: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor]:
    """g = weight (T - fake), T = uncond + guidance (cond - uncond) (or cond); and sum_b g^2."""
    cond, uncond, fake = _data(cond, uncond, fake)
    return _dmd_direction(cond, uncond, float(guidance), fake, *_coefficients(cond, weight))


def dmd_normalizer_sums(
    x_s: Tensor,
    x_t: Tensor,
    cond: Tensor,
    uncond: Tensor | None,
    guidance: float,
    jump_x: Tensor,
    jump_v: Tensor,
) -> Tensor:
    """sums[b] = sum over sample b of |x_s - (jump_x x_t + jump_v T)|."""
    x_s, x_t, cond, uncond = _data(x_s, x_t, cond, uncond)
    return _dmd_normalizer_sums(
        x_s, x_t, cond, uncond, float(guidance), *_coefficients(x_s, jump_x, jump_v)
    )


class _DmdSurrogate(torch.autograd.Function):
    """Forward: the precomputed loss value; backward: d loss / d x_s = g / x_s.numel()."""

    @staticmethod
    def forward(ctx, x_s: Tensor, g: Tensor, value: Tensor) -> Tensor:
        ctx.save_for_backward(g)
        ctx.numel, ctx.dtype = x_s.numel(), x_s.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (g,) = ctx.saved_tensors
        return (g * (grad / ctx.numel)).to(ctx.dtype), None, None


def dmd_surrogate_loss(x_s: Tensor, g: Tensor, value: Tensor) -> Tensor:
    return _DmdSurrogate.apply(x_s, g, value)

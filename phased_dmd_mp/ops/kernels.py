"""The fused kernels of phased_dmd_mp._C as torch custom ops (csrc/*/*.h define their semantics).

Each op is registered with `torch.library.custom_op` and a fake (meta) implementation, so
`torch.compile` traces around it. The public wrappers below take data of shape (B, ...) and
per-sample coefficients of shape () or (B,) in any float dtype; they make the data contiguous
(non-contiguous inputs are copied) and bring the coefficients to the accumulation dtype
(float64 for float64 data, float32 otherwise) on the data's device.

The losses compute their gradient in the forward pass, in the same read of the data, and keep
it for backward, which hands it to autograd as it is when the upstream gradient is 1 (a loss
that is `.backward()`-ed directly) and rescales it otherwise (as Liger-Kernel's fused
cross-entropy). Full-size CPU outputs come from a few buffers reused across calls (`_output_like`).
"""

from __future__ import annotations

from collections import OrderedDict

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


# CPU buffers kept for reuse, per size in bytes (the most recently used sizes only). A fresh
# CPU allocation this large comes from mmap and pays a page fault per 4 KiB page on first touch:
# measured, ~40% of a fused op's time at 64 MiB. CUDA's caching allocator already reuses memory.
_POOL_SIZES, _POOL_BUFFERS_PER_SIZE = 4, 4
_pool: OrderedDict[int, list[torch.UntypedStorage]] = OrderedDict()


def _output_like(x: Tensor) -> Tensor:
    """An uninitialised contiguous tensor like x; on CPU backed by a buffer no tensor still uses.

    A buffer is reused only when this pool holds its sole reference (the tensor handed out
    earlier and all its views are gone), so a result the caller keeps is never overwritten.
    """
    if x.device.type != "cpu":
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    nbytes = x.numel() * x.element_size()
    buffers = _pool.pop(nbytes, [])
    _pool[nbytes] = buffers  # most recently used last
    while len(_pool) > _POOL_SIZES:
        _pool.popitem(last=False)
    free = (b for b in buffers if torch._C._storage_Use_Count(b._cdata) == 1)
    storage = next(free, None)
    if storage is None:
        storage = torch.UntypedStorage(nbytes)
        if len(buffers) < _POOL_BUFFERS_PER_SIZE:
            buffers.append(storage)
    return torch.empty(0, dtype=x.dtype).set_(storage, 0, x.shape)


def _rescaled(grad: Tensor, upstream: Tensor) -> Tensor:
    """grad precomputed for an upstream gradient of 1, times the actual per-sample `upstream`
    (shape () or (B,)): grad itself when upstream is all ones (outside torch.compile, which
    cannot branch on data)."""
    if not torch.compiler.is_compiling() and bool((upstream == 1).all()):
        return grad
    factor = upstream.reshape(-1, *[1] * (grad.ndim - 1)) if upstream.ndim else upstream
    return (grad * factor).to(grad.dtype)


# --- clamped subinterval loss ----------------------------------------------------------------


@torch.library.custom_op("phased_dmd::residual_loss", mutates_args=())
def _residual_loss(
    pred: Tensor,
    x_s: Tensor,
    eps: Tensor,
    scale: Tensor,
    xs_coef: Tensor,
    eps_coef: Tensor,
    loss_coef: Tensor,
) -> tuple[Tensor, Tensor]:
    sums = torch.empty(pred.shape[0], dtype=scale.dtype, device=pred.device)
    grad = _output_like(pred)
    gscale = (2 * loss_coef * scale).contiguous()
    args = [pred, x_s, eps, scale, xs_coef, eps_coef, gscale, grad, sums]
    _call("residual_loss", pred, args, True)
    return loss_coef * sums, grad


@_residual_loss.register_fake
def _(pred, x_s, eps, scale, xs_coef, eps_coef, loss_coef):
    return pred.new_empty(pred.shape[0], dtype=scale.dtype), torch.empty_like(pred)


class _ResidualLoss(torch.autograd.Function):
    """loss[b] = loss_coef[b] sum_d r^2; its gradient w.r.t. pred comes from the forward pass."""

    @staticmethod
    def forward(ctx, pred, x_s, eps, scale, xs_coef, eps_coef, loss_coef):
        loss, grad = _residual_loss(pred, x_s, eps, scale, xs_coef, eps_coef, loss_coef)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return _rescaled(grad, upstream), None, None, None, None, None, None


# --- conditional noising -----------------------------------------------------------------------


@torch.library.custom_op("phased_dmd::axpby", mutates_args=())
def _axpby(x: Tensor, y: Tensor, a: Tensor, c: Tensor) -> Tensor:
    out = _output_like(x)
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
    cond: Tensor,
    uncond: Tensor | None,
    guidance: float,
    fake: Tensor,
    weight: Tensor,
    out_scale: float,
) -> tuple[Tensor, Tensor]:
    g = _output_like(cond)
    sq_sums = torch.empty(cond.shape[0], dtype=weight.dtype, device=cond.device)
    args = [cond, uncond, guidance, fake, weight, out_scale, g, sq_sums]
    _call("dmd_direction", cond, args, True)
    return g, sq_sums


@_dmd_direction.register_fake
def _(cond, uncond, guidance, fake, weight, out_scale):
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


def residual_loss(
    pred: Tensor,
    x_s: Tensor,
    eps: Tensor,
    scale: Tensor,
    xs_coef: Tensor,
    eps_coef: Tensor,
    loss_coef: Tensor,
) -> Tensor:
    """loss[b] = loss_coef[b] * sum over sample b of (scale pred - xs_coef x_s - eps_coef eps)^2,
    shape (B,) in the accumulation dtype; differentiable in pred (gradient from the same pass)."""
    pred, x_s, eps = _data(pred, x_s, eps)
    coefs = _coefficients(pred, scale, xs_coef, eps_coef, loss_coef)
    return _ResidualLoss.apply(pred, x_s, eps, *coefs)


def axpby(x: Tensor, y: Tensor, a: Tensor, c: Tensor) -> Tensor:
    """a x + c y with per-sample a, c; differentiable in x and y."""
    x, y = _data(x, y)
    return _axpby(x, y, *_coefficients(x, a, c))


def dmd_direction(
    cond: Tensor,
    uncond: Tensor | None,
    guidance: float,
    fake: Tensor,
    weight: Tensor,
    out_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(out_scale g, sum over each sample of g^2) with g = weight (T - fake) and
    T = uncond + guidance (cond - uncond) (or cond)."""
    cond, uncond, fake = _data(cond, uncond, fake)
    weight = _coefficients(cond, weight)[0]
    return _dmd_direction(cond, uncond, float(guidance), fake, weight, float(out_scale))


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
    """Forward: the precomputed loss value; backward: the precomputed d loss / d x_s."""

    @staticmethod
    def forward(ctx, x_s: Tensor, grad: Tensor, value: Tensor) -> Tensor:
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx, upstream: Tensor):
        (grad,) = ctx.saved_tensors
        return _rescaled(grad, upstream), None, None


def dmd_surrogate_loss(x_s: Tensor, grad: Tensor, value: Tensor) -> Tensor:
    """A loss with the given value whose gradient w.r.t. x_s is `grad` (x_s's shape and dtype)."""
    return _DmdSurrogate.apply(x_s, grad, value)

"""FP8 linear layers for the DiTs, behind one switch: `ExecutionConfig.fp8`.

"te"    Transformer Engine: the layer spec uses megatron's TE linears and the layers run under
        `te.autocast` with TE's current-scaling recipe (E4M3 forward, E5M2 gradients).
"torch" torch-native: megatron's parallel linears with their matmul through `torch._scaled_mm`,
        the same recipe: per-tensor scales from the current amax, E4M3 activations and weights,
        E5M2 output gradients, bf16/fp32 outputs and float32 accumulation.
FP8 applies to the tensor-parallel linears of every layer (attention, MLP, Qwen-Image's
modulation), in trainable models and in the frozen teacher's forward alike; embedders and output
heads stay in the model dtype. Both backends need a GPU with FP8 tensor cores (compute capability
8.9+: Ada, Hopper, Blackwell); anywhere else the switch is refused, never ignored.
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from torch import Tensor

from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.models.layers import LinearSubmodules, default_core_attention
from phased_dmd_mp.parallel.cpu_compat import recompute_contexts

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
BACKENDS = ("off", "te", "torch")

try:
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe as te_recipe
except (ImportError, RuntimeError, OSError):  # absent, or present but broken (CUDA libs)
    te = None


def quantize(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-tensor current scaling: (x * scale in `dtype`, 1 / scale), with the scale mapping
    amax(|x|) to the largest finite value of `dtype`."""
    amax = x.detach().abs().amax().float().clamp_min(1e-12)
    scale = torch.finfo(dtype).max / amax
    largest = torch.finfo(dtype).max
    return (x.float() * scale).clamp(-largest, largest).to(dtype), scale.reciprocal()


def _scaled_mm(a: Tensor, a_inv: Tensor, b_t: Tensor, b_inv: Tensor, out_dtype) -> Tensor:
    """a [m, k] @ b_t.T [k, n]; _scaled_mm wants its second operand column-major."""
    return torch._scaled_mm(
        a.contiguous(), b_t.contiguous().t(), scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype
    )


def _rows_padded(x: Tensor) -> Tensor:
    """Zero rows up to a multiple of 16: cuBLAS FP8 GEMMs need every dimension to be one, and
    the weight gradient contracts over the rows (tokens). Zero rows change no amax or sum."""
    missing = -x.shape[0] % 16
    return torch.nn.functional.pad(x, (0, 0, 0, missing)) if missing else x


class _FP8Linear(torch.autograd.Function):
    """y = x @ w.T with E4M3 x and w; dgrad and wgrad from the E5M2 output gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        x2 = _rows_padded(x.reshape(-1, x.shape[-1]))
        x8, x_inv = quantize(x2, E4M3)
        w8, w_inv = quantize(weight, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        ctx.needs_weight_grad = weight.requires_grad
        rows = x.numel() // x.shape[-1]
        out = _scaled_mm(x8, x_inv, w8, w_inv, x.dtype)[:rows]
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        rows = grad.numel() // grad.shape[-1]
        g8, g_inv = quantize(_rows_padded(grad.reshape(-1, grad.shape[-1])), E5M2)
        grad_x = _scaled_mm(g8, g_inv, w8.t(), w_inv, ctx.x_dtype)[:rows].reshape(ctx.x_shape)
        grad_w = None
        if ctx.needs_weight_grad:
            grad_w = _scaled_mm(g8.t(), g_inv, x8.t(), x_inv, ctx.w_dtype)
        return grad_x, grad_w


def fp8_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    out = _FP8Linear.apply(x, weight)
    return out if bias is None else out + bias


class _FP8Matmul:
    """Replaces megatron's matmul (`_forward_impl`) by the FP8 one; the tensor-parallel
    communication around it (input all-reduce in backward, output all-reduce; under sequence
    parallelism the rows' all-gather and reduce-scatter) is megatron's. Its E4M3 copy of the
    gathered rows is what backward keeps."""

    def _forward_impl(self, input, weight, bias, allreduce_dgrad, tp_group, **kwargs):
        if kwargs.get("sequence_parallel"):  # column-parallel: all-gather the rows first
            input = gather_from_sequence_parallel_region(input, group=tp_group)
        elif allreduce_dgrad:  # column-parallel: the input's gradient sums over the TP group
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        return fp8_linear(input, weight, bias)


class FP8ColumnParallelLinear(_FP8Matmul, ColumnParallelLinear):
    pass


class FP8RowParallelLinear(_FP8Matmul, RowParallelLinear):
    pass


def fp8_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def layer_submodules(fp8: str) -> LinearSubmodules:
    """The linears and core attention of a layer spec for an FP8 setting ("off", "te", "torch")."""
    if fp8 not in BACKENDS:
        raise ConfigError(f"fp8 must be one of {list(BACKENDS)}, got {fp8!r}")
    attention = default_core_attention()
    if fp8 == "off":
        return LinearSubmodules(core_attention=attention)
    if not fp8_supported():
        where = (
            "this machine has no CUDA device"
            if not torch.cuda.is_available()
            else f"GPU compute capability is {torch.cuda.get_device_capability()}"
        )
        raise ConfigError(
            f"fp8={fp8!r} needs a GPU with FP8 tensor cores (compute capability >= 8.9) and "
            f"{where}; set fp8='off'"
        )
    if fp8 == "torch":
        return LinearSubmodules(FP8ColumnParallelLinear, FP8RowParallelLinear, attention)
    if te is None:
        raise ConfigError(
            "fp8='te' needs Transformer Engine (import transformer_engine failed); "
            "use fp8='torch' for the torch-native backend"
        )
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TERowParallelLinear,
    )

    return LinearSubmodules(TEColumnParallelLinear, TERowParallelLinear, attention)


def autocast(fp8: str):
    """Context the layers run in: TE's FP8 autocast for "te", nothing otherwise (the torch
    backend's linears quantize by themselves)."""
    if fp8 != "te":
        return contextlib.nullcontext()
    recipe = te_recipe.Float8CurrentScaling(fp8_format=te_recipe.Format.HYBRID)
    if hasattr(te, "autocast"):  # TE >= 2.8; fp8_autocast before
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


def checkpoint(fp8: str, layer, *args):
    """Activation recompute of one layer. Under TE, its checkpoint replays the forward with the
    same FP8 state; otherwise torch's non-reentrant checkpoint (on a CPU-only torch, replaying
    under the CUDA shim when the forward ran under it)."""
    if fp8 == "te":
        return te.checkpoint(layer, *args)
    return torch.utils.checkpoint.checkpoint(
        layer, *args, use_reentrant=False, context_fn=recompute_contexts
    )

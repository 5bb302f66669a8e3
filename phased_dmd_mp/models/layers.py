"""Building blocks shared by the Wan and Qwen-Image DiTs.

Activations follow megatron-core's layout, [sequence, batch, hidden]; attention heads are
[sequence, batch, heads, head_dim]. Under tensor parallelism each rank holds whole heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_pg_size
from torch import Tensor, nn

try:
    from flash_attn import flash_attn_func
except (ImportError, RuntimeError, OSError):
    flash_attn_func = None


class SDPAttention(nn.Module):
    """Core attention through torch's scaled_dot_product_attention (flash/efficient kernels)."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None):
        """query [sq, b, h, d], key/value [sk, b, h, d], mask broadcastable to [b, h, sq, sk]
        (True = attend) -> [sq, b, h * d]."""
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.permute(2, 0, 1, 3).flatten(2)


class FlashAttention(SDPAttention):
    """flash-attn's kernel where it applies (CUDA, half precision, no mask), SDPA elsewhere."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None):
        if (
            mask is not None
            or not query.is_cuda
            or query.dtype not in (torch.float16, torch.bfloat16)
        ):
            return super().forward(query, key, value, mask)
        q, k, v = (x.transpose(0, 1) for x in (query, key, value))
        return flash_attn_func(q, k, v).transpose(0, 1).flatten(2)


def default_core_attention() -> type[nn.Module]:
    return SDPAttention if flash_attn_func is None else FlashAttention


class _BiasInMatmul:
    """megatron's matmul (`_forward_impl`) as one `F.linear`: the bias goes into the GEMM
    (addmm) instead of a second pass over the output, and autograd's addmm backward replaces
    megatron's. The tensor-parallel communication around it stays megatron's. A column-parallel
    linear under sequence parallelism runs megatron's own matmul, which all-gathers the rows
    before the GEMM but keeps only this rank's rows for backward (gathering them again there)
    and reduce-scatters the input gradient. (Our TransformerConfig never turns on
    gradient_accumulation_fusion, the other thing megatron's matmul handles.)"""

    def _forward_impl(self, input, weight, bias, allreduce_dgrad, tp_group, **kwargs):
        if kwargs.get("sequence_parallel"):
            return super()._forward_impl(
                input, weight, bias, allreduce_dgrad=allreduce_dgrad, tp_group=tp_group, **kwargs
            )
        if allreduce_dgrad:  # column-parallel: the input's gradient sums over the TP group
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        return F.linear(input, weight, bias)


class ColumnLinear(_BiasInMatmul, ColumnParallelLinear):
    """megatron's ColumnParallelLinear with its bias added inside the matmul; on one TP rank
    a plain `F.linear` (megatron's forward adds an identity autograd node there)."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if (
            self.skip_bias_add
            or weight is not None
            or get_pg_size(self.tp_group) > 1
            or self.config.defer_embedding_wgrad_compute
        ):
            return super().forward(input_, weight, runtime_gather_output)
        return F.linear(input_, self.weight, self.bias), None


class RowLinear(_BiasInMatmul, RowParallelLinear):
    """megatron's RowParallelLinear; on one TP rank its bias is added inside the matmul (with
    more, the bias must follow the all-reduce of the partial products, as megatron does).
    megatron's own matmul, which warned on every call that megatron-core 0.16 passes it no TP
    group, is not called."""

    def forward(self, input_):
        if self.skip_bias_add or get_pg_size(self.tp_group) > 1:
            return super().forward(input_)
        return F.linear(input_, self.weight, self.bias), None


@dataclass
class LinearSubmodules:
    """The classes a layer spec plugs in: tensor-parallel linears and the core attention."""

    column_linear: type = ColumnLinear
    row_linear: type = RowLinear
    core_attention: type = SDPAttention


def column_linear(submodules, config, tp_group, in_features, out_features, *, whole_rows=False):
    """Output features split over the TP group: returns y_local (bias added).

    Under sequence parallelism its input is this rank's token rows, all-gathered before the
    matmul; `whole_rows`: the input is held whole by every rank instead (the text or image
    context, the timestep embedding), so it is used as it is and its gradient is all-reduced
    over TP, as without sequence parallelism."""
    linear = submodules.column_linear(
        in_features,
        out_features,
        config=config,
        init_method=config.init_method,
        bias=True,
        gather_output=False,
        skip_bias_add=False,
        tp_group=tp_group,
    )
    if whole_rows and config.sequence_parallel:  # megatron's attributes, set from the config
        linear.sequence_parallel = False
        linear.allreduce_dgrad = get_pg_size(tp_group) > 1
    return linear


def row_linear(submodules, config, tp_group, in_features, out_features):
    """Input features split over the TP group: all-reduces the partial products, then adds bias."""
    return submodules.row_linear(
        in_features,
        out_features,
        config=config,
        init_method=config.output_layer_init_method,
        bias=True,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=tp_group,
    )


class GeluMLP(MegatronModule):
    """linear_fc1 -> GELU(tanh) -> linear_fc2, tensor-parallel (the FFN of Wan and Qwen-Image).

    megatron's MLP with the same parameters and initialisation, but it asks its linears for
    the bias separately (skip_bias_add) and adds it in another pass; here each bias goes into
    its matmul.
    """

    def __init__(self, config, submodules: LinearSubmodules, tp_group, ffn_hidden_size: int):
        super().__init__(config)
        hidden = config.hidden_size
        self.linear_fc1 = column_linear(submodules, config, tp_group, hidden, ffn_hidden_size)
        self.linear_fc2 = row_linear(submodules, config, tp_group, ffn_hidden_size, hidden)

    def forward(self, x: Tensor) -> Tensor:
        hidden, _ = self.linear_fc1(x)
        out, _ = self.linear_fc2(F.gelu(hidden, approximate="tanh"))
        return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group in forward and backward: each rank's shard feeds every rank's output."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a hidden dimension that tensor parallelism splits between ranks.

    Wan normalises q and k across all heads, so under TP the mean square is all-reduced.
    Normalised in float32, cast back to the input dtype, then scaled by the weight (torch's
    `rms_norm` order, which diffusers' Wan uses).
    """

    def __init__(self, hidden_size: int, eps: float, tp_group=None):
        super().__init__()
        self.hidden_size, self.eps, self.tp_group = hidden_size, eps, tp_group
        self.weight = nn.Parameter(torch.ones(hidden_size // get_pg_size(tp_group)))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x: Tensor) -> Tensor:
        if get_pg_size(self.tp_group) == 1:  # torch's fused kernel, as diffusers' nn.RMSNorm
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        x32 = x.float()
        square_sum = _AllReduceSum.apply(x32.square().sum(-1, keepdim=True), self.tp_group)
        # Rounded to x's dtype before the weight multiplies, as torch's rms_norm does.
        return (x32 * torch.rsqrt(square_sum / self.hidden_size + self.eps)).to(
            x.dtype
        ) * self.weight


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension (per head in Qwen-Image, text features before txt_in).

    With `tp_group`, the weight is shared by heads that tensor parallelism splits between
    ranks: its gradient is summed over the group in backward, so every rank holds the full one.
    """

    def __init__(self, dim: int, eps: float, tp_group=None):
        super().__init__()
        self.eps, self.tp_group = eps, tp_group
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if get_pg_size(self.tp_group) > 1:
            weight = copy_to_tensor_model_parallel_region(weight, group=self.tp_group)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return (x32 * weight.float()).to(x.dtype)


def layer_norm_fp32(
    x: Tensor, eps: float, weight: Tensor | None = None, bias: Tensor | None = None
):
    """LayerNorm computed in float32 (the output stays float32; callers cast after modulating)."""
    weight = None if weight is None else weight.float()
    bias = None if bias is None else bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], weight, bias, eps)


class LayerNormFP32(nn.Module):
    """Affine LayerNorm computed in float32, output in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm_fp32(x, self.eps, self.weight, self.bias).to(x.dtype)


def timestep_embedding(t: Tensor, dim: int, scale: float = 1.0) -> Tensor:
    """Sinusoidal embedding [cos | sin] of a 1D tensor of timesteps, in float32 (the diffusers
    `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)` both models use)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = scale * (t[:, None].float() * torch.exp(exponent)[None, :])
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [s, b, h, d] by angles with cos/sin
    [s, 1, 1, d/2]; computed in float32, returned in x's dtype.

    One complex multiply, (x1 + i x2)(cos + i sin), instead of four real products, a sum, a
    difference and an interleave: the same values (diffusers' formula), ~5x less time forward
    and backward on a CPU."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    rotated = pairs * torch.complex(cos, sin)
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


def split_heads(x: Tensor, head_dim: int) -> Tensor:
    """[s, b, h * d] -> [s, b, h, d]."""
    return x.unflatten(-1, (-1, head_dim))

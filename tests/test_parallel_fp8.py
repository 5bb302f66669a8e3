"""FP8: the torch-native backend's quantization and scaled matmuls (run here through
torch._scaled_mm's CPU kernel), its drop-in megatron linears, and the refusal of the FP8 switch
where no FP8 GPU exists."""

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.models import ExecutionConfig, QwenImageConfig, WanConfig, build
from phased_dmd_mp.models.config import megatron_config
from phased_dmd_mp.parallel import fp8
from phased_dmd_mp.parallel.state import ensure_initialized

TINY_WAN = WanConfig(
    num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
    freq_dim=32, ffn_dim=64, num_layers=2,
)  # fmt: skip


def relative_error(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def dequantized(x, dtype):
    q, inverse_scale = fp8.quantize(x, dtype)
    return q.float() * inverse_scale


@pytest.mark.parametrize("dtype", [fp8.E4M3, fp8.E5M2])
def test_quantize_uses_the_full_range_and_round_trips(dtype):
    x = torch.randn(64, 48) * 3
    q, inverse_scale = fp8.quantize(x, dtype)
    assert q.dtype == dtype
    assert q.float().abs().max() == torch.finfo(dtype).max  # amax maps to the largest value
    mantissa_bits = 3 if dtype == fp8.E4M3 else 2
    assert relative_error(q.float() * inverse_scale, x) < 2.0**-mantissa_bits
    zeros, inverse_scale = fp8.quantize(torch.zeros(5), dtype)
    assert torch.isfinite(inverse_scale) and (zeros.float() == 0).all()


def test_fp8_linear_is_the_matmul_of_the_quantized_operands(monkeypatch):
    """Forward: E4M3 x and w; backward: E5M2 output gradient against the saved E4M3 operands.
    Each equals the float32 matmul of the dequantized operands (only rounding differs). The
    93 rows are padded for the GEMMs, whose every dimension cuBLAS wants a multiple of 16."""
    scaled_mm = torch._scaled_mm

    def checked_scaled_mm(a, b, **kwargs):
        assert all(n % 16 == 0 for n in (*a.shape, *b.shape)), (a.shape, b.shape)
        assert a.is_contiguous() and b.t().is_contiguous()  # row-major x column-major
        return scaled_mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", checked_scaled_mm)
    torch.manual_seed(0)
    x = torch.randn(3, 31, 96, requires_grad=True)
    weight = (torch.randn(48, 96) / 10).requires_grad_()
    bias = torch.randn(48)
    out = fp8.fp8_linear(x, weight, bias)
    grad = torch.randn_like(out)
    grad_x, grad_w = torch.autograd.grad(out, (x, weight), grad)

    xq, wq = dequantized(x.detach().reshape(-1, 96), fp8.E4M3), dequantized(weight, fp8.E4M3)
    gq = dequantized(grad.reshape(-1, 48), fp8.E5M2)
    assert relative_error(out, (xq @ wq.T).reshape(3, 31, 48) + bias) < 1e-6
    assert relative_error(grad_x, (gq @ wq).reshape(3, 31, 96)) < 1e-6
    assert relative_error(grad_w, gq.T @ xq) < 1e-6
    # ... and is close to the exact float32 linear.
    exact = torch.nn.functional.linear(x, weight, bias)
    exact_grads = torch.autograd.grad(exact, (x, weight), grad)
    assert relative_error(out, exact) < 0.05
    assert relative_error(grad_x, exact_grads[0]) < 0.1
    assert relative_error(grad_w, exact_grads[1]) < 0.1


@pytest.mark.parametrize(
    "fp8_cls, cls, kwargs",
    [
        (fp8.FP8ColumnParallelLinear, ColumnParallelLinear, {"gather_output": False}),
        (fp8.FP8RowParallelLinear, RowParallelLinear, {"input_is_parallel": True}),
    ],
)
def test_fp8_parallel_linears_are_drop_in_replacements(fp8_cls, cls, kwargs):
    groups = ensure_initialized()
    config = megatron_config(
        TINY_WAN, ExecutionConfig(), tensor_parallel=1, pipeline_parallel=1, init_weights=True
    )
    args = {"config": config, "init_method": config.init_method, "bias": True,
            "skip_bias_add": False, "tp_group": groups.tp, **kwargs}  # fmt: skip
    torch.manual_seed(0)
    reference, quantized = cls(64, 32, **args), fp8_cls(64, 32, **args)
    quantized.load_state_dict(reference.state_dict())
    x = torch.randn(16, 2, 64)
    assert relative_error(quantized(x)[0], reference(x)[0]) < 0.05


@pytest.mark.parametrize("backend", ["torch", "te"])
@pytest.mark.parametrize("arch", [TINY_WAN, QwenImageConfig(num_layers=1, joint_attention_dim=8)])
def test_fp8_switch_is_refused_without_an_fp8_gpu(backend, arch):
    if fp8.fp8_supported():
        pytest.skip("this machine has an FP8 GPU")
    with pytest.raises(ConfigError, match="compute capability >= 8.9"):
        build(arch, ExecutionConfig(fp8=backend))


@pytest.mark.skipif(not fp8.fp8_supported(), reason="needs a GPU with FP8 tensor cores")
def test_fp8_wan_on_gpu_is_close_to_bf16():
    bf16 = build(TINY_WAN, ExecutionConfig(dtype="bfloat16")).cuda()
    fp8_model = build(TINY_WAN, ExecutionConfig(dtype="bfloat16", fp8="torch")).cuda()
    fp8_model.load_state_dict(bf16.state_dict())
    inputs = {
        "hidden_states": torch.randn(1, 4, 2, 16, 16, device="cuda"),
        "timestep": torch.tensor([500.0], device="cuda"),
        "encoder_hidden_states": torch.randn(1, 16, 32, device="cuda"),
    }
    assert relative_error(fp8_model(**inputs), bf16(**inputs)) < 0.1

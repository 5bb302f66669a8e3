"""Activation offload (`activation_offload`, parallel/offload.py): with recompute, the input each
layer keeps for backward waits in host memory. Outputs and every gradient equal those without
it bit for bit (Wan and Qwen-Image, bf16 and fp32, full weights and LoRA); the device keeps
that many bytes fewer after the forward and the host arena holds exactly the layers' inputs
(memory/activations.py's per-layer constant with recompute). The distillation run with it
resumes bit-exactly under torchrun at TP = 2 (tests/test_optimizer_offload.py's torchrun test);
without recompute it is a one-line config error. On a GPU (skipped here) the device's
allocator sees the drop."""

import dataclasses

import pytest
import torch
from distill_helpers import run_distill

from phased_dmd_mp.conditioning import Conditions, model_inputs, velocity_from_output
from phased_dmd_mp.memory.activations import CallShape, activation_bytes
from phased_dmd_mp.memory.measure import LiveTensorBytes
from phased_dmd_mp.models import ExecutionConfig, QwenImageConfig, WanConfig, build
from phased_dmd_mp.models.lora import add_lora, set_active_adapter
from phased_dmd_mp.parallel.offload import HOST
from phased_dmd_mp.parallel.state import initialize

LAYERS = 3
WAN = WanConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=8, freq_dim=16, ffn_dim=64, num_layers=LAYERS)  # fmt: skip
QWEN = QwenImageConfig(patch_size=2, in_channels=16, out_channels=4, num_layers=LAYERS,
                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=8,
                       axes_dims_rope=(4, 6, 6))  # fmt: skip
BATCH, FRAMES, SIZE, TEXT = 2, 2, 16, 5


def forward_backward(arch, dtype: str, lora: bool, offload: bool, device: str = "cpu") -> dict:
    """Output, gradients, device bytes kept between forward and backward, host arena bytes."""
    initialize(1, 1)
    torch.manual_seed(0)
    execution = ExecutionConfig(dtype=dtype, recompute=True, activation_offload=offload)
    model = build(arch, execution).to(device)
    if lora:
        add_lora(model, 4, 4.0, 1, seed=0)
        set_active_adapter(model, 0)
    data = torch.Generator().manual_seed(1)
    frames = FRAMES if isinstance(arch, WanConfig) else 1
    x = torch.randn(BATCH, 4, frames, SIZE, SIZE, generator=data).to(device)
    width = arch.text_dim if isinstance(arch, WanConfig) else arch.joint_attention_dim
    cond = Conditions(text=torch.randn(BATCH, TEXT, width, generator=data)).to(device)
    inputs = model_inputs(arch, x.to(model.dtype), torch.rand(BATCH, generator=data), cond)
    host_before = HOST.live_bytes()
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        out = velocity_from_output(arch, model(**inputs), x).float()
        torch.cuda.synchronize()
        kept = torch.cuda.memory_allocated() - start
    else:
        with LiveTensorBytes() as tracker:
            start = tracker.live
            out = velocity_from_output(arch, model(**inputs), x).float()
            kept = tracker.live - start
    host = HOST.live_bytes() - host_before
    out.square().mean().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad.detach().clone() for p in trained if p.grad is not None]
    assert len(grads) == len(trained)
    return {"out": out.detach(), "grads": grads, "kept": kept, "host": host}


def layer_input_bytes(arch, dtype: str, lora: bool) -> int:
    """What one recomputed layer keeps: memory/activations.py's constant (its input)."""
    tokens = FRAMES * (SIZE // 2) ** 2 if isinstance(arch, WanConfig) else (SIZE // 2) ** 2
    shape = CallShape(tokens, TEXT, 1)
    adapter = "lora" if lora else "full"
    return activation_bytes(arch, shape, BATCH, "layer", dtype=dtype, adapter=adapter,
                            recompute=True)  # fmt: skip


@pytest.mark.parametrize(
    "arch, dtype, lora",
    [(WAN, "bfloat16", False), (WAN, "float32", True), (QWEN, "bfloat16", True),
     (QWEN, "float32", False)],
    ids=["wan_bf16_full", "wan_fp32_lora", "qwen_bf16_lora", "qwen_fp32_full"],
)  # fmt: skip
def test_offloaded_inputs_give_the_same_gradients_and_leave_the_device(arch, dtype, lora):
    kept = forward_backward(arch, dtype, lora, offload=False)
    moved = forward_backward(arch, dtype, lora, offload=True)
    assert torch.equal(moved["out"], kept["out"])
    assert all(torch.equal(a, b) for a, b in zip(moved["grads"], kept["grads"], strict=True))
    inputs = LAYERS * layer_input_bytes(arch, dtype, lora)
    assert (kept["host"], moved["host"]) == (0, inputs)
    assert moved["kept"] <= kept["kept"] - inputs, (moved["kept"], kept["kept"], inputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_allocator_sees_the_layer_inputs_leave():
    arch = dataclasses.replace(WAN, num_layers=LAYERS)
    kept = forward_backward(arch, "bfloat16", False, offload=False, device="cuda")
    moved = forward_backward(arch, "bfloat16", False, offload=True, device="cuda")
    torch.testing.assert_close(moved["out"], kept["out"], rtol=0, atol=0)
    inputs = LAYERS * layer_input_bytes(arch, "bfloat16", False)
    assert moved["host"] == inputs
    assert moved["kept"] <= kept["kept"] - inputs


def test_activation_offload_without_recompute_is_one_line(tmp_path, teacher, capsys):
    with pytest.raises(SystemExit):
        run_distill(tmp_path, teacher, "activation_offload=true", "recompute=false")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "activation_offload" in err and "recompute" in err, err

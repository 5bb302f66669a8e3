"""benchmarks/bench_model.py runs here (tiny Wan on CPU) and refuses FP8 rather than skip it."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from phased_dmd_mp.models import QwenImageConfig, build

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("bench_model", ROOT / "benchmarks" / "bench_model.py")
bench_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_model)


def test_bench_measures_a_step_and_reports_refused_variants(tmp_path):
    out = tmp_path / "rows.json"
    argv = ["--fp8", "off", "torch", "--recompute", "off", "--steps", "2", "--warmup", "0",
            "--json", str(out)]  # fmt: skip
    assert bench_model.main(argv) == 0
    measured, fp8 = json.loads(out.read_text())
    assert len(measured["step_s"]) == 2 and measured["model_tflops"] > 0
    if not torch.cuda.is_available():
        assert "compute capability" in fp8["refused"]


@pytest.mark.parametrize(
    "arch, latent",
    [
        (bench_model.TINY_WAN, (3, 8, 12)),
        (QwenImageConfig(num_layers=2, num_attention_heads=4, attention_head_dim=16,
                         joint_attention_dim=48, axes_dims_rope=(4, 6, 6)), (1, 8, 12)),
    ],
    ids=["wan", "qwen_image"],
)  # fmt: skip
def test_model_flops_match_torch_flop_counter(arch, latent):
    """The analytic count behind TFLOP/s and MFU equals torch's count of the forward's
    matmuls, convolutions and attention (attention through the math backend, which the counter
    sees as matmuls)."""
    model = build(arch)
    inputs, tokens = bench_model.make_inputs(arch, latent, 16, 2, torch.float32, "cpu")
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(**inputs)
    expected = counter.get_total_flops()
    assert abs(2 * bench_model.forward_flops(arch, tokens, 16) / expected - 1) < 0.01

"""Execution settings and released sizes: activation recompute changes nothing numerically,
bf16 tracks fp32, the configs in configs/models/ are the released architectures, and bad
settings are clear errors."""

from pathlib import Path

import pytest
import torch

from phased_dmd_mp.config import ConfigError, load_config
from phased_dmd_mp.models import ExecutionConfig, QwenImageConfig, WanConfig, build
from phased_dmd_mp.models.config import megatron_config

CONFIGS = Path(__file__).parents[1] / "configs" / "models"
WAN = WanConfig(
    num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=8,
    freq_dim=16, ffn_dim=32, num_layers=3, image_dim=6, added_kv_proj_dim=16,
)  # fmt: skip
QWEN = QwenImageConfig(
    in_channels=8, out_channels=2, num_layers=3, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=12, axes_dims_rope=(2, 2, 4),
)  # fmt: skip


def inputs(arch, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype).requires_grad_()

    if isinstance(arch, WanConfig):
        return {
            "hidden_states": randn(2, 4, 2, 4, 4),
            "timestep": torch.tensor([10.0, 700.0]),
            "encoder_hidden_states": randn(2, 5, 8),
            "encoder_hidden_states_image": randn(2, 3, 6),
        }
    return {
        "hidden_states": randn(2, 12, 8),
        "encoder_hidden_states": randn(2, 5, 12),
        "encoder_hidden_states_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "timestep": torch.tensor([0.1, 0.8]),
        "img_shapes": [[(1, 3, 4)]] * 2,
    }


def run(model, args):
    output = model(**args)
    (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads.update(
        {
            k: v.grad.clone()
            for k, v in args.items()
            if isinstance(v, torch.Tensor) and v.grad is not None
        }
    )
    return output.detach(), grads


@pytest.mark.parametrize("arch", [WAN, QWEN], ids=["wan", "qwen_image"])
def test_recompute_gives_the_same_outputs_and_gradients(arch):
    torch.manual_seed(0)
    reference = build(arch, ExecutionConfig())
    recomputed = build(arch, ExecutionConfig(recompute=True))
    recomputed.load_state_dict(reference.state_dict())
    expected_out, expected_grads = run(reference, inputs(arch))
    out, grads = run(recomputed, inputs(arch))
    torch.testing.assert_close(out, expected_out, rtol=1e-6, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", [WAN, QWEN], ids=["wan", "qwen_image"])
def test_bfloat16_tracks_float32(arch):
    torch.manual_seed(0)
    fp32 = build(arch, ExecutionConfig())
    bf16 = build(arch, ExecutionConfig(dtype="bfloat16"))
    bf16.load_state_dict(fp32.state_dict())
    with torch.no_grad():
        expected = fp32(**inputs(arch))
        actual = bf16(**inputs(arch, torch.bfloat16))
    assert actual.dtype == torch.bfloat16
    assert ((actual.float() - expected).norm() / expected.norm()).item() < 0.03


RELEASED = {  # parameter counts of the released checkpoints
    "wan2.1_t2v_1.3b.yaml": (WanConfig, 1_418_996_800),
    "wan2.1_t2v_14b.yaml": (WanConfig, 14_288_491_584),
    "wan2.1_i2v_14b.yaml": (WanConfig, 16_394_878_784),
    "wan2.2_i2v_a14b.yaml": (WanConfig, 14_288_901_184),
    "wan2.2_ti2v_5b.yaml": (WanConfig, 4_999_787_712),
    "qwen_image.yaml": (QwenImageConfig, 20_430_401_088),
}


@pytest.mark.parametrize("name", RELEASED)
def test_model_configs_are_the_released_sizes(name):
    cls, parameters = RELEASED[name]
    arch = load_config(cls, CONFIGS / name)
    with torch.device("meta"):  # shapes only
        model = build(arch, init_weights=False)
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="num_attention_heads must be >= 1"):
        load_config(WanConfig, overrides=["num_attention_heads=0"])
    with pytest.raises(ConfigError, match="axes_dims_rope"):
        load_config(QwenImageConfig, overrides=["axes_dims_rope=[16, 56, 50]"])
    with pytest.raises(ConfigError, match="fp8 must be one of"):
        load_config(ExecutionConfig, overrides=["fp8=int8"])
    with pytest.raises(ConfigError, match="divisible by tensor_parallel"):
        megatron_config(WAN, ExecutionConfig(), 4, 1, init_weights=False)
    with pytest.raises(ConfigError, match="divisible by pipeline_parallel"):
        megatron_config(WAN, ExecutionConfig(), 1, 2, init_weights=False)

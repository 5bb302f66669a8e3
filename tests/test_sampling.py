import pytest
import torch
from oracles import gaussian_velocity

from phased_dmd_mp.conditioning import Conditions, model_inputs, velocity_from_output
from phased_dmd_mp.models.config import QwenImageConfig, WanConfig
from phased_dmd_mp.sampling import guided, sample
from phased_dmd_mp.schedule import FLOW_MATCHING, timestep_table


def test_exact_velocity_samples_the_data_distribution():
    # x_0 ~ N(0.7, 0.5^2): integrating the exact velocity from N(0, 1) must land on it.
    x1 = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def velocity(x, t):
        return gaussian_velocity(x, t[:, None].double(), FLOW_MATCHING, 0.7, 0.25)

    x0 = sample(velocity, x1, timestep_table(200, shift=3.0)[:-1])  # stop just short of t = 0
    assert abs(x0.mean().item() - 0.7) < 0.02 and abs(x0.std().item() - 0.5) < 0.02


def test_renoised_sampling_is_reproducible_and_differs_from_deterministic():
    x1 = torch.randn(64, 1, generator=torch.Generator().manual_seed(1))

    def velocity(x, t):
        return gaussian_velocity(x, t[:, None], FLOW_MATCHING, 0.0, 1.0)

    table = timestep_table(4, shift=5.0)
    a = sample(velocity, x1, table, renoise=torch.Generator().manual_seed(2))
    b = sample(velocity, x1, table, renoise=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    assert (a - sample(velocity, x1, table)).abs().max() > 1e-3


def test_guided_velocity_batches_both_halves():
    calls = []

    def velocity(x, t, cond):
        calls.append(x.shape[0])
        return x + cond.text[:, 0, :1]

    cond = Conditions(text=torch.full((3, 2, 4), 2.0))
    uncond = Conditions(text=torch.zeros(3, 2, 4))
    x = torch.zeros(3, 1)
    v = guided(velocity, cond, uncond, guidance_scale=3.0)(x, torch.ones(3))
    assert calls == [6]
    torch.testing.assert_close(v, torch.full((3, 1), 6.0))  # 0 + 3 * (2 - 0)
    assert guided(velocity, cond, uncond, 1.0)(x, torch.ones(3)).shape == (3, 1)


def test_model_inputs_for_wan_and_qwen():
    x = torch.randn(2, 16, 1, 4, 6)
    t = torch.tensor([0.25, 1.0])
    cond = Conditions(text=torch.randn(2, 5, 8), image_latents=torch.randn(2, 20, 1, 4, 6))
    wan = model_inputs(WanConfig(), x, t, cond)
    assert wan["hidden_states"].shape == (2, 36, 1, 4, 6)
    torch.testing.assert_close(wan["timestep"], t * 1000)
    qwen = model_inputs(QwenImageConfig(), x, t, Conditions(text=cond.text))
    assert qwen["hidden_states"].shape == (2, 6, 64) and qwen["img_shapes"] == [[(1, 2, 3)]] * 2
    # Packing then unpacking is the identity (diffusers' _pack_latents / _unpack_latents).
    torch.testing.assert_close(velocity_from_output(QwenImageConfig(), qwen["hidden_states"], x), x)
    with pytest.raises(ValueError, match="single-frame"):
        model_inputs(QwenImageConfig(), x, t, cond)


def test_conditions_select_and_cat():
    cond = Conditions(
        text=torch.arange(6.0).view(3, 2, 1), image_embeds=torch.arange(3.0).view(3, 1, 1)
    )
    picked = cond.select(torch.tensor([2, 0]))
    assert picked.batch_size == 2 and picked.image_embeds.flatten().tolist() == [2.0, 0.0]
    both = Conditions.cat([cond, picked])
    assert both.batch_size == 5 and both.text_mask is None

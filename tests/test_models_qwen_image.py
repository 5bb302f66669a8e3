"""Qwen-Image MMDiT parity with diffusers' QwenImageTransformer2DModel (fp32, TP = PP = 1)."""

import pytest
import torch

from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.models import convert, from_diffusers

diffusers = pytest.importorskip("diffusers")

TINY = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 24,
    "axes_dims_rope": (4, 6, 6),
}


def reference(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = diffusers.QwenImageTransformer2DModel(**{**TINY, **overrides}).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def inputs(img_shapes, batch=2, text_len=7, masked=True, seed=1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(f * h * w for f, h, w in img_shapes)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    if masked:
        mask[1, 4:] = 0  # the second prompt is shorter: padding tokens are masked out
    return {
        "hidden_states": torch.randn(batch, tokens, TINY["in_channels"], generator=generator),
        "encoder_hidden_states": torch.randn(
            batch, text_len, TINY["joint_attention_dim"], generator=generator
        ),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.tensor([0.05, 0.9])[:batch],
        "img_shapes": [img_shapes] * batch,
    }


def relative_error(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(
    "img_shapes, masked",
    [
        ([(1, 4, 6)], True),  # one image, padded prompt
        ([(1, 5, 3)], False),  # odd height: the centred positions are asymmetric
        ([(1, 4, 4), (1, 2, 6)], True),  # several images (edit-style inputs), frame index 0, 1
    ],
)
def test_forward_and_gradients_match_diffusers(img_shapes, masked):
    ref = reference()
    ours = from_diffusers(ref)
    args = inputs(img_shapes, masked=masked)
    float_args = ("hidden_states", "encoder_hidden_states")
    ref_args = {
        k: v.clone().requires_grad_(True) if k in float_args else v for k, v in args.items()
    }
    our_args = {
        k: v.clone().requires_grad_(True) if k in float_args else v for k, v in args.items()
    }

    expected = ref(**ref_args).sample
    actual = ours(**our_args)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < 1e-5

    weight = torch.randn_like(expected)
    (expected * weight).sum().backward()
    (actual * weight).sum().backward()
    for name in float_args:
        assert relative_error(our_args[name].grad, ref_args[name].grad) < 1e-5, name
    # Parameters that do not reach the output (the last layer's text stream) get zeros.
    ref_grads = {
        n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in ref.named_parameters()
    }
    expected_grads = convert.diffusers_to_ours(ref_grads, ours.arch)
    for name, p in ours.named_parameters():
        assert relative_error(p.grad, expected_grads[name]) < 1e-4, name


def test_edit_variants_are_refused_clearly():
    with pytest.raises(ConfigError, match="zero_cond_t"):
        from_diffusers(reference(zero_cond_t=True))


def test_bad_img_shapes_are_a_clear_error():
    ours = from_diffusers(reference())
    args = inputs([(1, 4, 6)])
    with pytest.raises(ValueError, match="img_shapes"):
        ours(**{**args, "img_shapes": [[(1, 4, 5)]] * 2})

"""Wan DiT parity with diffusers' WanTransformer3DModel (fp32, TP = PP = 1): same outputs and
gradients for the same weights and arguments, across the Wan2.1 / Wan2.2 variants."""

import pytest
import torch

from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.models import convert, from_diffusers
from phased_dmd_mp.models.moe import TimestepRoutedExperts

diffusers = pytest.importorskip("diffusers")

TINY = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 32,
    "ffn_dim": 40,
    "num_layers": 2,
    "rope_max_seq_len": 64,
}
VARIANTS = {
    "t2v": {},
    # Wan2.2 I2V / Wan2.1 I2V without CLIP: image latent and mask concatenated on channels.
    "i2v_channels": {"in_channels": 9},
    # Wan2.1 I2V: CLIP image tokens through an image embedder and a second cross-attention.
    "i2v_image_embeds": {"in_channels": 9, "image_dim": 20, "added_kv_proj_dim": 24},
    # Wan2.1 FLF2V: first and last frame tokens with a position embedding.
    "flf2v": {"in_channels": 9, "image_dim": 20, "added_kv_proj_dim": 24, "pos_embed_seq_len": 10},
    # Wan2.2 TI2V 5B: patch (1, 2, 2), per-token timesteps; odd head count, no cross-attn norm.
    "ti2v_per_token_t": {
        "num_attention_heads": 3,
        "attention_head_dim": 8,
        "cross_attn_norm": False,
    },
}


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter, so that unit norm weights and zero biases are tested too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def reference(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(**{**TINY, **overrides}).eval()
    randomize(model, seed)
    return model


def inputs(ref, variant: str, batch: int = 2, seed: int = 1) -> dict:
    config = ref.config
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, 3, 8, 6, generator=generator)
    tokens = 3 * 4 * 3
    if variant == "ti2v_per_token_t":
        t = torch.rand(batch, tokens, generator=generator) * 1000
        t[:, :12] = 0  # the conditioning first frame is clean
    else:
        t = torch.tensor([30.0, 870.0])[:batch]
    # diffusers finds the CLIP tokens as "all but the last 512": give it 512 text tokens.
    text_len = 512 if config.image_dim is not None else 7
    args = {
        "hidden_states": x,
        "timestep": t,
        "encoder_hidden_states": torch.randn(batch, text_len, config.text_dim, generator=generator),
    }
    if config.image_dim is not None:
        frames = 2 if config.pos_embed_seq_len is not None else 1
        image_tokens = 5
        args["encoder_hidden_states_image"] = torch.randn(
            batch * frames, image_tokens, config.image_dim, generator=generator
        )
    return args


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_and_gradients_match_diffusers(variant):
    ref = reference(**VARIANTS[variant])
    ours = from_diffusers(ref)
    args = inputs(ref, variant)
    ref_args = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in args.items()}
    our_args = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in args.items()}

    expected = ref(**ref_args).sample
    actual = ours(**our_args)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < 1e-5

    weight = torch.randn_like(expected)
    (expected * weight).sum().backward()
    (actual * weight).sum().backward()
    for name in ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_image"):
        if name in args:
            assert relative_error(our_args[name].grad, ref_args[name].grad) < 1e-5, name
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    expected_grads = convert.diffusers_to_ours(ref_grads, ours.arch)
    for name, p in ours.named_parameters():
        assert relative_error(p.grad, expected_grads[name]) < 1e-4, name


def test_wan22_two_experts_route_by_timestep_like_the_pipeline():
    """Wan2.2 A14B: a high-noise expert for t >= boundary, a low-noise one below; a batch that
    straddles the boundary is split per sample."""
    high, low = reference(seed=3), reference(seed=4)
    experts = TimestepRoutedExperts(from_diffusers(high), from_diffusers(low), boundary=875.0)
    args = inputs(high, "t2v", batch=2)
    args["timestep"] = torch.tensor([900.0, 500.0])
    with torch.no_grad():
        actual = experts(**args)
        for i, ref in enumerate((high, low)):
            one = {k: v[i : i + 1] for k, v in args.items()}
            torch.testing.assert_close(actual[i : i + 1], ref(**one).sample, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_clear_errors():
    ours = from_diffusers(reference())
    args = inputs(reference(), "t2v")
    with pytest.raises(ValueError, match="multiples of patch_size"):
        ours(**{**args, "hidden_states": args["hidden_states"][..., :5]})
    with pytest.raises(ValueError, match="timestep must be"):
        ours(**{**args, "timestep": torch.zeros(3)})
    with pytest.raises(ValueError, match="encoder_hidden_states_image"):
        ours(**args, encoder_hidden_states_image=torch.zeros(2, 5, 20))


def test_unsupported_diffusers_options_are_refused():
    with pytest.raises(ConfigError, match="image_dim and added_kv_proj_dim"):
        from_diffusers(reference(image_dim=20))

"""Our models hand megatron-core their process groups and settings explicitly, so building and
training them leaves the log free of megatron's deprecation warnings (thousands of
`tp_group is None` lines per test run before).

megatron's schedule imports multi_token_prediction lazily on its first call, which warns once
that Apex is absent (an import-time notice phased_dmd_mp/__init__.py filters): imported above,
so the block below sees only what our calls cause."""

import warnings

import megatron.core.transformer.multi_token_prediction  # noqa: F401
import torch

from phased_dmd_mp.models import ExecutionConfig, QwenImageConfig, WanConfig, build
from phased_dmd_mp.models.lora import add_lora, set_active_adapter
from phased_dmd_mp.parallel import pipeline

WAN = WanConfig(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                text_dim=8, freq_dim=16, ffn_dim=32, num_layers=2)  # fmt: skip
QWEN = QwenImageConfig(in_channels=8, out_channels=2, num_layers=2, attention_head_dim=8,
                       num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(2, 2, 4))  # fmt: skip


def test_build_forward_backward_emit_no_megatron_warnings():
    wan_inputs = {"hidden_states": torch.randn(2, 4, 1, 4, 4), "timestep": torch.tensor([500.0, 20.0]),
                  "encoder_hidden_states": torch.randn(2, 3, 8)}  # fmt: skip
    qwen_inputs = {"hidden_states": torch.randn(1, 4, 8), "encoder_hidden_states": torch.randn(1, 3, 12),
                   "encoder_hidden_states_mask": None, "timestep": torch.tensor([0.5]),
                   "img_shapes": [(1, 2, 2)]}  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wan = build(WAN, ExecutionConfig(recompute=True))
        wan(**wan_inputs).square().mean().backward()  # trainable linears
        add_lora(wan, 2, 2.0, 1)  # frozen base linears, megatron's other matmul path
        set_active_adapter(wan, 0)
        losses = pipeline.forward_backward(wan, [(wan_inputs, None)], lambda out, _: out.mean())
        qwen = build(QWEN)
        qwen(**qwen_inputs).square().mean().backward()
        pipeline.forward(qwen, [qwen_inputs])
    assert len(losses) == 1 and wan.decoder.layers[0].mlp.linear_fc2.weight.grad is not None
    from_megatron = [
        f"{w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if "megatron" in w.filename and issubclass(w.category, (DeprecationWarning, UserWarning))
    ]
    assert from_megatron == []

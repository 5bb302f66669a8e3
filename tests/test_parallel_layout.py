"""The layout rules (phased_dmd_mp/parallel/layout.py): every split that does not divide is a
one-line ConfigError naming the quantity, its value and the divisor, wherever it is found
first: the converter (before it writes anything), the model build and the distillation runner."""

import pytest
import torch

from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.models import ExecutionConfig, QwenImageConfig, WanConfig, build, convert
from phased_dmd_mp.models.config import megatron_config
from phased_dmd_mp.parallel.layout import Layout, check_layout, tensor_parallel_splits

# Heads, hidden and layers divide by 4; the FFN width 34 does not (it divides by 2).
WAN = WanConfig(num_attention_heads=4, attention_head_dim=8, in_channels=2, out_channels=2,
                text_dim=8, freq_dim=16, ffn_dim=34, num_layers=4)  # fmt: skip
QWEN = QwenImageConfig(in_channels=8, out_channels=2, num_layers=3, attention_head_dim=8,
                       num_attention_heads=6, joint_attention_dim=12, axes_dims_rope=(2, 2, 4))  # fmt: skip


def test_a_layout_that_divides_everything():
    layout = check_layout(WAN, tensor_parallel=2, pipeline_parallel=2, world_size=8,
                          batch_size=8, micro_batch_size=2)  # fmt: skip
    assert layout == Layout(tensor_parallel=2, pipeline_parallel=2, data_parallel=2,
                            rank_batch_size=4)  # fmt: skip
    layout = check_layout(WAN, tensor_parallel=2, context_parallel=2, world_size=8, batch_size=4)
    assert layout == Layout(tensor_parallel=2, pipeline_parallel=1, data_parallel=2,
                            rank_batch_size=2, context_parallel=2)  # fmt: skip
    assert tensor_parallel_splits(QWEN) == {
        "num_attention_heads": 6, "hidden_size": 48, "ffn_dim": 192
    }  # fmt: skip


@pytest.mark.parametrize(
    ("arch", "sizes", "message"),
    [
        (WAN, {"tensor_parallel": 4}, "ffn_dim = 34 is not divisible by tensor_parallel = 4"),
        (WAN, {"tensor_parallel": 8}, "num_attention_heads = 4 is not divisible by tensor_parallel = 8"),
        (WAN, {"pipeline_parallel": 3}, "num_layers = 4 is not divisible by pipeline_parallel = 3"),
        (QWEN, {"tensor_parallel": 4}, "num_attention_heads = 6 is not divisible by tensor_parallel = 4"),
        (QWEN, {"pipeline_parallel": 2}, "num_layers = 3 is not divisible by pipeline_parallel = 2"),
        (WAN, {"tensor_parallel": 0}, "tensor_parallel must be an integer >= 1, got 0"),
        (WAN, {"pipeline_parallel": -1}, "pipeline_parallel must be an integer >= 1, got -1"),
        (None, {"tensor_parallel": 2, "world_size": 3},
         "world size = 3 is not divisible by tensor_parallel x pipeline_parallel = 2"),
        (WAN, {"tensor_parallel": 2, "context_parallel": 4},
         "num_attention_heads = 4 is not divisible by tensor_parallel x context_parallel = 8"),
        (QWEN, {"context_parallel": 4},
         "num_attention_heads = 6 is not divisible by tensor_parallel x context_parallel = 4"),
        (WAN, {"context_parallel": 0}, "context_parallel must be an integer >= 1, got 0"),
        (None, {"context_parallel": 2, "tensor_parallel": 2, "world_size": 6},
         "world size = 6 is not divisible by tensor_parallel x pipeline_parallel x "
         "context_parallel = 4"),
        (None, {"sequence_parallel": True},
         "sequence_parallel: true needs tensor_parallel > 1"),
        (None, {"world_size": 4, "batch_size": 6},
         "batch_size = 6 is not divisible by the data-parallel size = 4"),
        (None, {"world_size": 2, "batch_size": 8, "micro_batch_size": 3},
         "the batch per data-parallel rank (batch_size / 2) = 4 is not divisible by micro_batch_size = 3"),
    ],
)  # fmt: skip
def test_what_does_not_divide_is_named(arch, sizes, message):
    with pytest.raises(ConfigError) as info:
        check_layout(arch, **sizes)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_sequence_parallel_defaults_to_on_with_tensor_parallelism():
    from phased_dmd_mp.config import load_config
    from phased_dmd_mp.distill.config import DistillConfig

    assert load_config(DistillConfig, None, ["tensor_parallel=2"]).uses_sequence_parallel
    assert not load_config(DistillConfig, None, []).uses_sequence_parallel
    off = ["tensor_parallel=2", "sequence_parallel=false"]
    assert not load_config(DistillConfig, None, off).uses_sequence_parallel
    with pytest.raises(ConfigError, match="sequence_parallel: true needs tensor_parallel > 1"):
        load_config(DistillConfig, None, ["sequence_parallel=true"])
    with pytest.raises(ConfigError, match="sequence_parallel: true needs tensor_parallel > 1"):
        megatron_config(WAN, ExecutionConfig(sequence_parallel=True), 1, 1, init_weights=False)


def _diffusers_dir(path, arch):
    torch.manual_seed(0)
    state = convert.ours_to_diffusers(build(arch).state_dict(), arch)
    convert.write_diffusers_dir(path, arch, state)
    return path


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tp", "4"], "ffn_dim = 34 is not divisible by tensor_parallel = 4"),
        (["--tp", "0"], "tensor_parallel must be an integer >= 1"),
        (["--tp", "-2"], "tensor_parallel must be an integer >= 1"),
        (["--pp", "0"], "pipeline_parallel must be an integer >= 1"),
        (["--pp", "3"], "num_layers = 4 is not divisible by pipeline_parallel = 3"),
    ],
)
def test_converter_refuses_uneven_shards_before_writing(tmp_path, capsys, flags, message):
    source = _diffusers_dir(tmp_path / "diffusers", WAN)
    target = tmp_path / "ours"
    assert convert.main(["to-ours", str(source), str(target), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not target.exists()


def test_model_build_and_converter_share_the_rule():
    with pytest.raises(ConfigError, match="ffn_dim = 34 is not divisible by tensor_parallel = 4"):
        megatron_config(WAN, ExecutionConfig(), 4, 1, init_weights=False)
    with pytest.raises(ConfigError, match="ffn_dim = 34 is not divisible by tensor_parallel = 4"):
        convert.shard({}, WAN, 4, 1)
    whole = build(WAN).state_dict()
    shards = convert.shard(whole, WAN, 2, 2)
    assert shards[(1, 1)]["decoder.layers.0.mlp.linear_fc1.weight"].shape == (17, 32)


def test_runner_refuses_microbatches_that_do_not_split_the_rank_batch(tmp_path, teacher, capsys):
    from distill_helpers import run_distill

    with pytest.raises(SystemExit):  # the runner used to shrink them silently to a divisor
        run_distill(tmp_path, teacher, "algorithm=dmd", "num_steps=1", "num_phases=1",
                    "micro_batch_size=3")  # fmt: skip
    err = capsys.readouterr().err
    assert "batch_size / 1) = 4 is not divisible by micro_batch_size = 3" in err
    assert "Traceback" not in err

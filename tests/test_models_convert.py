"""Checkpoint conversion: diffusers folder -> our TP x PP shards -> diffusers folder is exact,
and the result loads back into diffusers."""

import json

import pytest
import torch
from safetensors.torch import load_file

from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.models import ExecutionConfig, build, convert, load_checkpoint, save_checkpoint

diffusers = pytest.importorskip("diffusers")

WAN_I2V = {
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "in_channels": 5,
    "out_channels": 3,
    "text_dim": 12,
    "freq_dim": 16,
    "ffn_dim": 48,
    "num_layers": 4,
    "image_dim": 10,
    "added_kv_proj_dim": 32,
}
QWEN = {
    "in_channels": 8,
    "out_channels": 2,
    "num_layers": 4,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 12,
    "axes_dims_rope": (2, 2, 4),
}


def randomized(model):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize(
    "cls, config",
    [("WanTransformer3DModel", WAN_I2V), ("QwenImageTransformer2DModel", QWEN)],
)
def test_round_trip_through_tp2_pp2_shards_is_exact(tmp_path, cls, config):
    torch.manual_seed(0)
    original = randomized(getattr(diffusers, cls)(**config))
    original.save_pretrained(tmp_path / "diffusers")

    assert convert.main(["to-ours", str(tmp_path / "diffusers"), str(tmp_path / "ours"),
                         "--tp", "2", "--pp", "2"]) == 0  # fmt: skip
    layout = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (layout["tensor_parallel"], layout["pipeline_parallel"]) == (2, 2)
    arch, shards = convert.read_sharded_dir(tmp_path / "ours")
    assert sorted(shards) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # Each shard is exactly the state dict of that rank's module: TP halves the heads.
    qkv = "decoder.layers.1.{}.linear_qkv.weight".format(
        "self_attention" if cls.startswith("Wan") else "attention"
    )
    assert shards[(1, 1)][qkv].shape == (3 * arch.hidden_size // 2, arch.hidden_size)

    assert convert.main(["to-diffusers", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    # What from_pretrained does (without the optional `accelerate` it needs for Wan).
    back = tmp_path / "back"
    restored = getattr(diffusers, cls).from_config(json.loads((back / "config.json").read_text()))
    restored.load_state_dict(load_file(back / convert.DIFFUSERS_WEIGHTS), strict=True)
    expected = original.state_dict()
    actual = restored.state_dict()
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_whole_model_state_dict_round_trips_through_our_model():
    """diffusers -> ours -> load into our module -> its state_dict -> diffusers is exact."""
    torch.manual_seed(0)
    original = randomized(diffusers.WanTransformer3DModel(**WAN_I2V))
    arch = convert.MODEL_KINDS["wan"].from_diffusers(original.config)
    ours = build(arch, ExecutionConfig(), init_weights=False)
    ours.load_state_dict(convert.diffusers_to_ours(original.state_dict(), arch))
    back = convert.ours_to_diffusers(ours.state_dict(), arch)
    assert back.keys() == original.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in original.state_dict().items())


def test_unknown_and_missing_tensors_are_clear_errors(tmp_path):
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**WAN_I2V)
    arch = convert.MODEL_KINDS["wan"].from_diffusers(model.config)
    state = model.state_dict()
    with pytest.raises(ConfigError, match="does not use"):
        convert.diffusers_to_ours({**state, "extra.weight": torch.zeros(1)}, arch)
    state.pop("blocks.0.attn1.to_q.weight")
    with pytest.raises(ConfigError, match="lacks"):
        convert.diffusers_to_ours(state, arch)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    assert convert.main(["to-ours", str(tmp_path), str(tmp_path / "out")]) == 2


def test_layouts_that_do_not_divide_the_model_are_refused():
    arch = convert.MODEL_KINDS["wan"](**WAN_I2V)
    with pytest.raises(ConfigError, match="tensor_parallel"):
        convert.shard({}, arch, tensor_parallel=3, pipeline_parallel=1)
    with pytest.raises(ConfigError, match="pipeline_parallel"):
        convert.shard({}, arch, tensor_parallel=1, pipeline_parallel=3)


def test_checkpoints_of_other_layouts_are_resharded_on_load(tmp_path):
    """A TP=2 x PP=2 checkpoint loads into this single-process model; save_checkpoint writes
    what load_checkpoint reads; another architecture is refused."""
    arch = convert.MODEL_KINDS["wan"](**WAN_I2V)
    torch.manual_seed(0)
    source = randomized(build(arch, ExecutionConfig()))
    whole = {k: v for k, v in source.state_dict().items() if v is not None}
    convert.write_sharded_dir(tmp_path / "tp2pp2", arch, convert.shard(whole, arch, 2, 2))
    target = build(arch, ExecutionConfig(), init_weights=False)
    load_checkpoint(target, tmp_path / "tp2pp2")
    assert all(torch.equal(target.state_dict()[k], v) for k, v in whole.items())

    save_checkpoint(target, tmp_path / "saved")
    again = build(arch, ExecutionConfig(), init_weights=False)
    load_checkpoint(again, tmp_path / "saved")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in whole.items())

    other = build(convert.MODEL_KINDS["wan"](**{**WAN_I2V, "num_layers": 2}), ExecutionConfig())
    with pytest.raises(ConfigError, match="not this model"):
        load_checkpoint(other, tmp_path / "saved")


def test_the_converter_runs_as_a_module_without_runpy_warnings(tmp_path):
    """`python -m phased_dmd_mp.models.convert` as docs/models.md writes it: a mistake is one line
    and exit code 2, and nothing else is printed (importing the package must not have
    loaded convert.py before runpy runs it, which makes Python warn on every call)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "phased_dmd_mp.models.convert", "to-ours", str(tmp_path),
            str(tmp_path / "out"), "--tp", "0"]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr

"""`python -m phased_dmd_mp.pretrain_teacher` with the smoke config: the teacher directory it
writes is complete, loads back as the same model, and is never half-written or overwritten."""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli

from phased_dmd_mp import pretrain_teacher
from phased_dmd_mp.conditioning import dit_velocity
from phased_dmd_mp.config import load_config
from phased_dmd_mp.data.teacher import load_transformer, read_conditions, read_spec
from phased_dmd_mp.eval.samples import load_sample_file
from phased_dmd_mp.models.convert import read_diffusers_dir

SMOKE_CONFIG = Path(__file__).parents[1] / "configs" / "digits_teacher_smoke.yaml"
DEFAULT_CONFIG = Path(__file__).parents[1] / "configs" / "digits_teacher.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = load_config(pretrain_teacher.TeacherConfig, SMOKE_CONFIG)
    out = tmp_path_factory.mktemp("runs") / "teacher"
    teacher, metrics = pretrain_teacher.run(config, out, progress=False)
    return config, out, teacher, metrics


def test_teacher_directory_is_complete(trained):
    config, out, _, metrics = trained
    assert sorted(p.name for p in out.parent.iterdir()) == ["teacher"]  # no staging left
    kind, arch, state_dict = read_diffusers_dir(out / "transformer")
    assert kind == "wan" and arch == config.arch()
    assert "blocks.1.attn1.to_q.weight" in state_dict  # diffusers' names
    assert sum(t.numel() for t in state_dict.values()) == metrics["training"]["parameters"]
    assert json.loads((out / "transformer" / "config.json").read_text())["_class_name"] == (
        "WanTransformer3DModel"
    )
    assert read_spec(out) == config.spec()
    assert read_spec(out).latent_shape == (1, 1, 8, 8)
    conditions = read_conditions(out)
    assert len(conditions) == 10 and conditions.labels.tolist() == list(range(10))

    samples = load_sample_file(out / "samples.npz")
    assert samples.samples.shape == (10, config.eval_seeds, 1, 8, 8)
    assert (out / "samples.png").stat().st_size > 1000
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["training"]["steps"] == config.train_steps
    assert np.isfinite(metrics["training"]["final_loss"])
    assert 0 <= metrics["class_accuracy"] <= 1 and len(metrics["per_class_accuracy"]) == 10
    for key in ("frechet_distance", "precision", "recall", "cosine_similarity"):
        assert np.isfinite(metrics[key]), key
    assert metrics["samples"] == 10 * config.eval_seeds
    assert load_config(pretrain_teacher.TeacherConfig, out / "config.yaml") == config


def test_reloaded_teacher_is_the_trained_ema_model(trained):
    _, out, teacher, _ = trained
    reloaded = load_transformer(out).eval()
    conditions = read_conditions(out)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 1, 8, 8, generator=generator)
    t = torch.rand(6, generator=generator)
    cond = conditions.batch([0, 1, 2, 7, 8, 9])
    with torch.no_grad():
        expected = dit_velocity(teacher, teacher.arch)(x, t, cond)
        actual = dit_velocity(reloaded, reloaded.arch)(x, t, cond)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


_run = functools.partial(run_cli, pretrain_teacher.main)  # (exit code, stderr)


def test_cli_refuses_to_overwrite_and_reports_config_errors(trained, tmp_path, capsys):
    _, out, _, _ = trained
    before = (out / "metrics.json").read_text()
    code, err = _run(["--out", str(out), "--config", str(SMOKE_CONFIG)], capsys)
    assert code == 2 and "--overwrite" in err
    assert (out / "metrics.json").read_text() == before
    code, err = _run(["--out", str(tmp_path / "t"), "--set", "train_step=5"], capsys)
    assert code == 2 and "did you mean 'train_steps'" in err and "Traceback" not in err
    code, err = _run(["--out", str(tmp_path / "t"), "--set", "condition_dropout=0"], capsys)
    assert code == 2 and "condition_dropout" in err
    assert not (tmp_path / "t").exists()


def test_failed_run_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(pretrain_teacher, "train", fail)
    config = load_config(pretrain_teacher.TeacherConfig, SMOKE_CONFIG)
    with pytest.raises(RuntimeError, match="interrupted"):
        pretrain_teacher.run(config, tmp_path / "teacher", progress=False)
    assert not list(tmp_path.iterdir())


def test_default_config_is_valid():
    config = load_config(pretrain_teacher.TeacherConfig, DEFAULT_CONFIG)
    assert config.sampling_steps == 40 and config.guidance_scale > 1

"""The Gaussian mixture teacher (`pretrain_teacher` with `dataset: mixture`): its data follows the
mixture, its directory samples to points that carry the mixture and that the evaluation measures,
and the distillation runner distills it unchanged."""

import json
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli
from distill_helpers import run_distill

from phased_dmd_mp import evaluate, pretrain_teacher, sample
from phased_dmd_mp.config import load_config
from phased_dmd_mp.data.mixture import grid_mixture, posterior_means
from phased_dmd_mp.data.teacher import TeacherSpec, read_conditions, read_spec, write_spec
from phased_dmd_mp.eval.mixture import mode_statistics
from phased_dmd_mp.eval.samples import load_sample_file
from phased_dmd_mp.sampling import sample as integrate
from phased_dmd_mp.schedule import timestep_table

CONFIGS = Path(__file__).parents[1] / "configs"
SMOKE_CONFIG = CONFIGS / "mixture_teacher_smoke.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = load_config(pretrain_teacher.TeacherConfig, SMOKE_CONFIG)
    out = tmp_path_factory.mktemp("runs") / "teacher"
    _, metrics = pretrain_teacher.run(config, out, progress=False)
    return config, out, metrics


def test_training_points_follow_the_grid_mixture():
    """The data the default config teaches: 25 equal modes on {-2, ..., 2}^2, each an isotropic
    Gaussian of the config's std (so 1 - exp(-4.5) = 98.9% of it within 3 std of its mean)."""
    config = load_config(
        pretrain_teacher.TeacherConfig,
        CONFIGS / "mixture_teacher.yaml",
        ["train_steps=40", "batch_size=500", "warmup_steps=0"],
    )
    mixture = config.mixture()
    grid = {(x, y) for x in range(-2, 3) for y in range(-2, 3)}
    assert {tuple(mean) for mean in mixture.means.tolist()} == grid
    torch.testing.assert_close(mixture.weights, torch.full((25,), 1 / 25, dtype=torch.float64))
    latents, labels = pretrain_teacher.training_data(config)
    assert latents.shape == (20000, 2, 1, 1, 1) and labels.unique().tolist() == [0]
    points = latents.flatten(1).double()
    statistics = mode_statistics(points, mixture)
    assert statistics["mode_coverage"] == 1
    assert statistics["on_mode_fraction"] == pytest.approx(1 - math.exp(-4.5), abs=0.003)
    assert statistics["mass_error_max"] < 0.006  # a fraction's binomial std: 0.0014
    offsets = points - mixture.means[torch.cdist(points, mixture.means).argmin(dim=1)]
    assert offsets.std().item() == pytest.approx(config.mixture_std, rel=0.03)


def test_exact_velocity_carries_noise_onto_the_modes():
    """The teacher's regression target, integrated like the teacher (40 Euler steps from noise at
    the default config's shift), reproduces the mixture: a wrong posterior would blur, shift or
    reweight the modes."""
    mixture = grid_mixture(5, 1.0, 0.05)
    x = torch.randn(4000, 2, 1, 1, 1, generator=torch.Generator().manual_seed(0))

    def velocity(x_t, t):
        x0, eps = posterior_means(mixture, x_t, t)
        return eps - x0

    points = integrate(velocity, x, timestep_table(40, shift=0.5)).flatten(1)
    statistics = mode_statistics(points, mixture)
    assert statistics["mode_coverage"] == 1 and statistics["on_mode_fraction"] > 0.98
    assert statistics["mass_error_max"] < 0.012  # binomial std of a mode's fraction: 0.0031
    x0, eps = posterior_means(mixture, x, torch.ones(len(x)))  # pure noise: x_t = eps
    torch.testing.assert_close(eps, x)
    torch.testing.assert_close(x0, torch.zeros_like(x))


def test_spec_round_trips_the_mixture(tmp_path):
    mixture = grid_mixture(3, 0.5, 0.1)
    spec = TeacherSpec((2, 1, 1, 1), 1.0, 1.0, **TeacherSpec.mixture_fields(mixture))
    write_spec(tmp_path, spec)
    assert read_spec(tmp_path) == spec and read_spec(tmp_path).mixture().same_as(mixture)
    with pytest.raises(ValueError, match="2 dims, but the points are latents"):
        TeacherSpec((1, 1, 8, 8), 1.0, 1.0, **TeacherSpec.mixture_fields(mixture))


def test_teacher_directory_samples_to_points_the_evaluation_measures(trained, tmp_path, capsys):
    config, out, metrics = trained
    spec = read_spec(out)
    assert spec == config.spec() and spec.latent_shape == (2, 1, 1, 1)
    assert spec.guidance_scale == 1 and spec.mixture().same_as(config.mixture())
    conditions = read_conditions(out)
    assert len(conditions) == 1 and conditions.labels.tolist() == [0]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert 0 < metrics["mode_coverage"] <= 1 and len(metrics["mode_fractions"]) == 25
    assert metrics["samples"] == config.eval_seeds
    teacher_samples = load_sample_file(out / "samples.npz")
    assert teacher_samples.kind == "points" and (out / "samples.png").stat().st_size > 1000

    # More seeds than one sampling batch; the first ones are the teacher's own samples.
    code, err = run_cli(
        sample.main, ["--teacher", str(out), "--out", str(tmp_path / "s"), "--seeds", "300"], capsys
    )
    assert code == 0, err
    file = load_sample_file(tmp_path / "s" / "samples.npz")
    assert file.samples.shape == (1, 300, 2) and file.labels == ["0"]
    assert file.mixture.same_as(teacher_samples.mixture)
    torch.testing.assert_close(
        file.samples[:, : config.eval_seeds], teacher_samples.samples, rtol=1e-5, atol=1e-5
    )

    code, err = run_cli(
        evaluate.main, [str(tmp_path / "s" / "samples.npz"), "--out", str(tmp_path / "e")], capsys
    )
    assert code == 0, err
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert results["kind"] == "points"
    assert results["reference"]["means"] == file.mixture.means.tolist()
    assert 0 < results["models"][0]["metrics"]["mode_coverage"]["mean"] <= 1


def test_distilled_generator_samples_points(trained, tmp_path, capsys):
    """The runner distills the mixture teacher unchanged; --checkpoint finds its mixture."""
    _, teacher_dir, _ = trained
    assert run_distill(tmp_path / "run", teacher_dir, "num_steps=2", "num_phases=2") == 0
    out = tmp_path / "s"
    code, err = run_cli(
        sample.main, ["--checkpoint", str(tmp_path / "run"), "--out", str(out)], capsys
    )
    assert code == 0, err
    file = load_sample_file(out / "samples.npz")
    assert file.samples.shape == (1, 8, 2)
    assert file.mixture.same_as(read_spec(teacher_dir).mixture())


def test_config_mistakes_name_the_key(tmp_path, capsys):
    cases = {
        "guidance_scale must be 1": ["--set", "dataset=mixture"],
        "mixture_std must be > 0": ["--config", str(SMOKE_CONFIG), "--set", "mixture_std=0"],
        "mixture_side must be >= 1": ["--config", str(SMOKE_CONFIG), "--set", "mixture_side=0"],
        "dataset must be one of": ["--set", "dataset=moons"],
    }
    for message, argv in cases.items():
        code, err = run_cli(pretrain_teacher.main, ["--out", str(tmp_path / "t"), *argv], capsys)
        assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "t").exists()

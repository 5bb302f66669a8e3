"""The paper's Fig. 2 toy, reduced: the correct subinterval objective reproduces the
full-interval trajectories, the naive target eps - x_s does not."""

import json
from pathlib import Path

import pytest
import torch

from phased_dmd_mp import toy
from phased_dmd_mp.config import load_config

SMOKE_CONFIG = Path(__file__).parents[1] / "configs" / "toy_smoke.yaml"


def test_exact_velocity_limits():
    atoms = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    x = torch.linspace(-2, 3, 6)[:, None]
    # At t = 1 nothing is known about x_0: v = x_1 - mean(atoms).
    torch.testing.assert_close(toy.exact_velocity(x, torch.ones(6), atoms), x - 0.5)
    # Near t = 0 the posterior is one-hot: at x_t = (1 - t) a the velocity points back to a.
    t = torch.full((4,), 1e-3)
    x_t = ((1 - t) * atoms)[:, None]
    torch.testing.assert_close(
        toy.exact_velocity(x_t, t, atoms), -atoms[:, None], atol=1e-4, rtol=0
    )


def test_correct_objective_tracks_full_interval_and_naive_does_not(tmp_path):
    config = load_config(toy.ToyConfig, SMOKE_CONFIG)
    metrics = toy.run(config, tmp_path, progress=False)
    deviation = metrics["deviation_from_full_interval"]
    correct = deviation["subinterval_correct"]["mean_abs"]
    naive = deviation["subinterval_naive"]["mean_abs"]
    assert correct < 0.02, metrics
    assert naive > 0.04 and naive > 3 * correct, metrics
    # Against the exact ODE too: the correct model is as close as the full-interval one.
    exact = metrics["deviation_from_exact_ode"]
    assert exact["subinterval_correct"]["mean_abs"] < 0.02
    assert exact["subinterval_naive"]["mean_abs"] > 0.04
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert (tmp_path / "trajectories.png").stat().st_size > 10_000
    assert (tmp_path / "config.yaml").is_file()


def test_cli_refuses_to_overwrite_results(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        toy.main(["--out", str(tmp_path), "--config", str(SMOKE_CONFIG)])
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "metrics.json").read_text() == "{}"

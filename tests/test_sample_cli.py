"""`python -m phased_dmd_mp.sample` on a teacher directory: the samples are the guided ODE's, in the
format `python -m phased_dmd_mp.evaluate` reads."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import run_cli

from phased_dmd_mp import evaluate, sample
from phased_dmd_mp.conditioning import dit_velocity
from phased_dmd_mp.config import load_config
from phased_dmd_mp.data.digits import write_digits_condition_set
from phased_dmd_mp.data.teacher import (
    TRANSFORMER_DIR,
    load_transformer,
    read_conditions,
    write_spec,
)
from phased_dmd_mp.eval.samples import load_sample_file
from phased_dmd_mp.models import ExecutionConfig, build
from phased_dmd_mp.models.convert import ours_to_diffusers, write_diffusers_dir
from phased_dmd_mp.pretrain_teacher import TeacherConfig
from phased_dmd_mp.sampling import guided
from phased_dmd_mp.sampling import sample as integrate
from phased_dmd_mp.schedule import timestep_table

ROOT = Path(__file__).parents[1]
SMOKE_CONFIG = ROOT / "configs" / "digits_teacher_smoke.yaml"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """An untrained smoke-size teacher directory: sampling does not care how good it is."""
    config = load_config(TeacherConfig, SMOKE_CONFIG, ["guidance_scale=2.5"])
    path = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    model = build(config.arch(), ExecutionConfig())
    write_diffusers_dir(
        path / TRANSFORMER_DIR, model.arch, ours_to_diffusers(model.state_dict(), model.arch)
    )
    write_digits_condition_set(path / "conditions", config.text_dim, config.seed)
    write_spec(path, config.spec())
    return path


def test_samples_are_the_guided_ode_and_evaluate_accepts_them(teacher_dir, tmp_path, capsys):
    out = tmp_path / "samples"
    argv = ["--teacher", str(teacher_dir), "--out", str(out), "--steps", "3", "--seeds", "3"]
    code, err = run_cli(sample.main, [*argv, "--shift", "2"], capsys)
    assert code == 0, err
    file = load_sample_file(out / "samples.npz")
    assert file.samples.shape == (10, 3, 1, 8, 8)
    assert file.model == "teacher 3 steps, CFG 2.5" and file.labels == [str(c) for c in range(10)]
    assert (out / "grid.png").stat().st_size > 1000

    # Class 7, seed 2, integrated by hand with the teacher's defaults overridden as above.
    model = load_transformer(teacher_dir).eval()
    conditions = read_conditions(teacher_dir)
    cond = conditions.batch([7])
    velocity = guided(dit_velocity(model, model.arch), cond, conditions.uncond(1), 2.5)
    noise = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(2))[None]
    with torch.no_grad():
        expected = integrate(velocity, noise, timestep_table(3, shift=2.0))
    torch.testing.assert_close(file.samples[7, 2], expected[0, :, 0].clamp(-1, 1))
    # Same noise per seed for every condition: classes differ, but only through the condition.
    assert not torch.equal(file.samples[0, 2], file.samples[7, 2])

    code, err = run_cli(sample.main, argv, capsys)
    assert code == 2 and "--overwrite" in err
    code, err = run_cli(sample.main, [*argv, "--overwrite", "--guidance", "1"], capsys)
    assert code == 0, err
    unguided = load_sample_file(out / "samples.npz")
    assert unguided.model == "teacher 3 steps, CFG 1"
    assert not torch.allclose(unguided.samples, file.samples)

    code, err = run_cli(
        evaluate.main, [str(out / "samples.npz"), "--out", str(tmp_path / "eval")], capsys
    )
    assert code == 0, err
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["runs"][0]["conditions"] == 10 and results["runs"][0]["seeds"] == 3
    assert results["models"][0]["model"] == "teacher 3 steps, CFG 1"


def test_user_mistakes_are_one_line_errors(teacher_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    cases = {
        "does not exist": ["--teacher", str(tmp_path / "none"), "--out", out],
        "has no teacher.yaml": ["--teacher", str(tmp_path), "--out", out],
        "--seeds must be >= 2": ["--teacher", str(teacher_dir), "--out", out, "--seeds", "1"],
        "guidance >= 1": ["--teacher", str(teacher_dir), "--out", out, "--guidance", "0.5"],
    }
    for message, argv in cases.items():
        code, err = run_cli(sample.main, argv, capsys)
        assert code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "layout", ["pipeline_parallel", "tensor_parallel", "context_parallel", "data_parallel"]
)
def test_torchrun_samples_in_the_runs_layout_equal_one_process(
    layout, tmp_path, single_process_runs, capsys
):
    """2 ranks: the run's config says pipeline_parallel 2 (each rank loads its stage),
    tensor_parallel 2 (with sequence parallelism, its default) or context_parallel 2 (each rank
    holds half the tokens), or the run is single-rank and the 2 ranks split the samples; all
    give one process's samples."""
    run = tmp_path / "run"
    shutil.copytree(single_process_runs["phased_dmd_sgts"], run)
    code, err = run_cli(
        sample.main, ["--checkpoint", str(run), "--out", str(tmp_path / "one"), "--seeds", "3",
                      "--batch", "4", "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    if layout != "data_parallel":
        config = yaml.safe_load((run / "config.yaml").read_text())
        (run / "config.yaml").write_text(yaml.safe_dump({**config, layout: 2}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "phased_dmd_mp.sample", "--checkpoint", str(run), "--out", str(tmp_path / "two"),
        "--seeds", "3", "--batch", "4", "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one = load_sample_file(tmp_path / "one" / "samples.npz").samples
    two = load_sample_file(tmp_path / "two" / "samples.npz").samples
    torch.testing.assert_close(two, one, atol=1e-5, rtol=0)


def test_checkpoint_of_a_tensor_parallel_run_in_one_process_says_how_to_launch(
    tmp_path, capsys, monkeypatch
):
    """A TP=2 run sampled by plain python: one line naming the run's layout and the torchrun
    command, before any process group starts (it was 'world size = 1 is not divisible by
    tensor_parallel x pipeline_parallel = 2')."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("tensor_parallel: 2\ncontext_parallel: 1\n")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--checkpoint", str(run), "--out", str(tmp_path / "s")]
    code, err = run_cli(sample.main, argv, capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert f"{run} was trained at tensor_parallel 2 x pipeline_parallel 1 x context_parallel 1" in (
        line
    )
    assert "torchrun --nproc_per_node=2 (or a multiple), not 1 process" in line

"""python -m phased_dmd_mp.reproduce on a seconds-long suite: every run x seed becomes one row
with its seed count, the teacher is a row, jobs run in parallel worker processes with their own
logs, reruns reuse finished work, a failed run is reported without stopping the others, and bad
suites are clean errors."""

import json
from pathlib import Path

import pytest
import yaml

from phased_dmd_mp import reproduce

SUITE = {
    "teacher_config": "configs/digits_teacher_smoke.yaml",
    "seeds": [0, 1],
    "sample_seeds": 4,
    "common": ["batch_size=4", "fake_updates=1", "sample_every=100", "log_every=100"],
    "runs": [
        {"name": "DMD", "set": ["algorithm=dmd", "num_steps=1", "num_phases=1",
                                "iterations_per_phase=2"]},
        {"name": "Phased", "set": ["num_steps=2", "num_phases=2", "iterations_per_phase=1"]},
    ],
    "eval_overrides": ["knn_k=2"],
}  # fmt: skip


def _write(path: Path, suite: dict) -> Path:
    path.write_text(yaml.safe_dump(suite))
    return path


def test_suite_end_to_end_and_reuse(tmp_path):
    suite = _write(tmp_path / "smoke.yaml", SUITE)
    out = tmp_path / "out"
    argv = ["--suite", str(suite), "--out", str(out), "--no-progress", "--jobs", "2"]
    assert reproduce.main(argv) == 0
    results = json.loads((out / "smoke" / "eval" / "results.json").read_text())
    rows = {row["model"]: row["runs"] for row in results["models"]}
    assert rows == {"teacher 2 steps, CFG 1.5": 1, "DMD": 2, "Phased": 2}
    assert "## smoke" in (out / "report.md").read_text()
    assert (
        "done: 2 generator updates" in (out / "smoke" / "runs" / "phased" / "seed1.log").read_text()
    )
    # A second call trains nothing: the exports are untouched.
    export = out / "smoke" / "runs" / "phased" / "seed1" / "export" / "expert_2"
    stamp = (export / "config.json").stat().st_mtime_ns
    assert reproduce.main(argv) == 0
    assert (export / "config.json").stat().st_mtime_ns == stamp


def test_a_failed_run_is_reported_and_the_others_finish(tmp_path, capsys):
    # Tensor parallelism 2 in a one-process job passes the config check and fails when it runs.
    broken = {"name": "broken", "set": ["tensor_parallel=2", "iterations_per_phase=1"]}
    suite = _write(
        tmp_path / "smoke.yaml", {**SUITE, "seeds": [0], "runs": [*SUITE["runs"], broken]}
    )
    out = tmp_path / "out"
    assert reproduce.main(["--suite", str(suite), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "smoke: run 'broken' seed 0 failed" in err and "broken/seed0.log" in err
    log = (out / "smoke" / "runs" / "broken" / "seed0.log").read_text()
    assert "world size = 1 is not divisible by tensor_parallel x pipeline_parallel = 2" in log
    assert (out / "smoke" / "runs" / "phased" / "seed0" / "export" / "generator.json").is_file()
    assert not (out / "smoke" / "eval").exists()  # no table from an incomplete suite


def test_every_argument_has_help_and_out_is_required(tmp_path, capsys, monkeypatch):
    for action in reproduce.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:  # no default that writes into the source tree
        reproduce.main(["--suite", str(_write(tmp_path / "smoke.yaml", SUITE))])
    assert info.value.code == 2 and "--out" in capsys.readouterr().err
    assert not (Path(reproduce.__file__).parent.parent / "results" / "runs").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": 1}, "unknown keys ['colour']"),
        ({"runs": [{"name": "x", "set": ["num_phases=3"]}]}, "run 'x'"),
        ({"runs": [{"set": []}]}, "missing or malformed"),
        ({"seeds": []}, "at least one run and one seed"),
    ],
)
def test_bad_suites_are_clean_errors(tmp_path, capsys, change, message):
    suite = _write(tmp_path / "bad.yaml", {**SUITE, **change})
    with pytest.raises(SystemExit):
        reproduce.main(["--suite", str(suite), "--out", str(tmp_path / "out")])
    assert message in capsys.readouterr().err

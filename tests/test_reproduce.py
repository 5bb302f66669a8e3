"""benchmarks/reproduce.py on a seconds-long suite: every run x seed becomes one row with its seed
count, the teacher is a row, reruns reuse finished work, and bad suites are clean errors."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
reproduce = sys.modules["reproduce"] = importlib.util.module_from_spec(spec)  # for its dataclasses
spec.loader.exec_module(reproduce)

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
    assert reproduce.main(["--suite", str(suite), "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "smoke" / "eval" / "results.json").read_text())
    rows = {row["model"]: row["runs"] for row in results["models"]}
    assert rows == {"teacher 2 steps, CFG 1.5": 1, "DMD": 2, "Phased": 2}
    assert "## smoke" in (out / "report.md").read_text()
    # A second call trains nothing: the exports are untouched.
    export = out / "smoke" / "runs" / "phased" / "seed1" / "export" / "expert_2"
    stamp = (export / "config.json").stat().st_mtime_ns
    assert reproduce.main(["--suite", str(suite), "--out", str(out), "--no-progress"]) == 0
    assert (export / "config.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": 1}, "unknown keys ['colour']"),
        ({"runs": [{"name": "x", "set": ["num_phases=3"]}]}, "run 'x'"),
        ({"runs": [{"set": []}]}, "missing or malformed"),
    ],
)
def test_bad_suites_are_clean_errors(tmp_path, capsys, change, message):
    suite = _write(tmp_path / "bad.yaml", {**SUITE, **change})
    with pytest.raises(SystemExit):
        reproduce.main(["--suite", str(suite), "--out", str(tmp_path / "out")])
    assert message in capsys.readouterr().err

"""benchmarks/gpu_suite.py without a GPU: its plan, wheel list, section runner and summary."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_suite  # noqa: E402


def test_dry_run_plans_every_section_within_eight_minutes(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), str(tmp_path), "--dry-run"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"]
    sections = {s["name"]: s for s in summary["sections"]}
    assert list(sections) == list(gpu_suite.SECTIONS)
    assert all(s["status"] == "planned" for s in sections.values())
    one_gpu = [s for s in sections.values() if s["gpus"] == 1]
    assert sum(s["limit_s"] for s in one_gpu) <= 8 * 60  # what a one-GPU slot runs
    assert sections["sequence"]["gpus"] == 2 and sections["sequence"]["limit_s"] <= 90
    assert sections["build"]["env"] == {"PHASED_DMD_CUDA": "ON", "PHASED_DMD_CUDA_ARCHS": "90"}
    for name in ("kernels", "block", "model", "sequence"):  # the scripts and configs it calls
        paths = [Path(a) for a in sections[name]["command"] if a.endswith((".py", ".yaml"))]
        assert all(p.exists() or p.parent == gpu_suite.WORK for p in paths), paths
    assert {w.split("==")[0] for w in summary["wheels"]} == {"megatron-core", "diffusers"}
    summary_md = (tmp_path / "summary.md").read_text()
    assert "| distill | planned |  | 110 |" in summary_md
    assert "- build: `PHASED_DMD_CUDA=ON PHASED_DMD_CUDA_ARCHS=90 " in summary_md


def test_wheels_must_match_pyproject_pins(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels.txt"
    wheels.write_text("megatron-core==0.15.0\n")
    monkeypatch.setattr(gpu_suite, "WHEELS_FILE", wheels)
    with pytest.raises(SystemExit, match="pyproject.toml pins megatron-core==0.16.1"):
        gpu_suite.pinned_wheels()
    wheels.write_text("diffusers\n")
    with pytest.raises(SystemExit, match="not pinned"):
        gpu_suite.pinned_wheels()


def test_wrapper_script_parses():
    done = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_suite.sh")], check=False)
    assert done.returncode == 0


def test_distill_settings_are_a_valid_config():
    from phased_dmd_mp.config import load_config
    from phased_dmd_mp.distill.config import DistillConfig

    config = load_config(DistillConfig, None, ["teacher=/nowhere", *gpu_suite.DISTILL_SETTINGS])
    assert (config.dtype, config.generator_adapter, config.recompute) == ("bfloat16", "lora", True)


@pytest.mark.parametrize(
    "code, status", [("print('ok')", "passed"), ("raise SystemExit(3)", "failed"),
                     ("import time; time.sleep(30)", "timed out")],
)  # fmt: skip
def test_a_section_records_its_outcome_and_log(tmp_path, code, status):
    section = gpu_suite.Section("probe", [sys.executable, "-c", code], limit_s=3)
    gpu_suite.run_section(section, tmp_path)
    assert section.status == status
    assert section.seconds < 10
    assert (tmp_path / "probe.log").read_text().startswith("$ ")


def test_summary_tables_compute_fraction_of_peak_and_ratios():
    def stat(median):
        return {"median": median, "min": median, "max": median}

    size = 64 * 2**20
    rows = [
        {"op": "copy", "dtype": "bfloat16", "elements": size, "ms": stat(0.1), "gbps": stat(4000.0)},
        {"op": "dmd_loss", "dtype": "bfloat16", "elements": size, "ms": stat(1.0),
         "gbps": stat(4320.0), "of_copy": stat(1.08), "vs_eager": stat(3.0),
         "vs_compile": stat(1.5)},
        {"op": "dmd_loss", "dtype": "bfloat16", "elements": size, "clock": "cpu",
         "ms": stat(0.01), "gbps": stat(9e5)},
    ]  # fmt: skip
    kernels = gpu_suite.Section("kernels", [], 1, status="passed", results={"rows": rows})
    model = gpu_suite.Section(
        "model", [], 1, status="passed",
        results=[{"variant": "bfloat16", "step_s": [2.0, 1.0, 3.0], "model_tflops": 400.0,
                  "mfu": 0.404, "peak_memory_gib": 61.23},
                 {"variant": "fp8 te", "refused": "no transformer-engine"}],
    )  # fmt: skip
    broken = gpu_suite.Section("distill", [], 1, status="timed out", log_tail="Traceback: hang")
    sequence_rows = [{"layout": "tp2-sp", "recompute": "on", "step_ms": stat(812.0),
                      "vs_one_process": stat(0.61), "saved_mib": 3072.0, "saved_vs_tp2": 0.52}]
    sequence = gpu_suite.Section("sequence", [], 1, status="passed", results=sequence_rows)
    skipped = gpu_suite.Section("sequence", [], 1, gpus=2, status="skipped",
                                log_tail="needs 2 GPUs, this machine has 1")  # fmt: skip
    text = gpu_suite.summary_markdown("NVIDIA H200", [kernels, model, broken, sequence, skipped])
    assert "| tp2-sp | on | 812.0 | 0.61 | 3.00 | 0.52 |" in text
    assert "sequence: skipped, needs 2 GPUs, this machine has 1" in text
    assert "| copy | bfloat16 | 64M | 4000 | 83% |  |  |  |" in text
    assert "| dmd_loss | bfloat16 | 64M | 4320 | 90% | 108% | 3.00x | 1.50x |" in text
    assert "900000" not in text  # CPU-clock rows are left out on a GPU
    assert "| bfloat16 | 2000.0 | 400.0 | 40.4% | 61.2 |" in text
    assert "refused: no transformer-engine" in text
    assert "## distill: timed out, log tail" in text and "Traceback: hang" in text

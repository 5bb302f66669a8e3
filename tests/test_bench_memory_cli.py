"""benchmarks/bench_memory.py --help shows what the script measures and its defaults."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"


def test_help_shows_the_whole_description_and_defaults():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                         text=True, timeout=120, check=True).stdout  # fmt: skip
    # the first docstring line alone ended mid-sentence ("backpropagation through every")
    assert "backpropagation through every\nstep" in out and "--precision: one-step DMD" in out
    assert "default 4" in out and "default 2 4 8" in out

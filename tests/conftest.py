"""Fixtures shared by the distillation tests: a tiny random teacher and single-process runs of
every algorithm on it (the references the multi-process runs are compared with)."""

import pytest
from distill_helpers import ALGORITHMS, run_distill, write_tiny_teacher


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    return write_tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def single_process_runs(tmp_path_factory, teacher):
    """{algorithm: run directory} of one-process runs (trained once per session)."""
    root = tmp_path_factory.mktemp("runs")
    for name, overrides in ALGORITHMS.items():
        assert run_distill(root / name, teacher, *overrides) == 0
    return {name: root / name for name in ALGORITHMS}


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """tiny_pipeline(kind) -> folder of a tiny random diffusers pipeline saved once per session;
    kinds: tiny_pipelines.BUILDERS (wan22_t2v, wan21_i2v, qwen_image)."""
    from tiny_pipelines import BUILDERS

    folders = {}

    def get(kind: str):
        if kind not in folders:
            folders[kind] = BUILDERS[kind](tmp_path_factory.mktemp(kind))
        return folders[kind]

    return get

"""The distillation runner under torchrun on CPU (gloo): tensor (with sequence parallelism, the
default), pipeline and context parallel runs train the same generator as one process,
data-parallel replicas stay identical, for every algorithm each layout supports (the quality
levers included); IDA's blend is exact across tensor-parallel shards and a sharded optimizer;
the discriminator head is exact under sequence and context parallelism."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distill_helpers import ALGORITHMS, TINY_WAN, run_distill, write_tiny_teacher

from phased_dmd_mp.models.convert import read_diffusers_dir

ROOT = Path(__file__).parents[1]
WORKER = ROOT / "tests" / "parallel" / "distill_worker.py"
# Backpropagation through several steps needs pipeline_parallel = 1.
SINGLE_GRADED_STEP = [
    "phased_dmd_sgts",
    "phased_dmd_levers",
    "dmd",
    "dmd_sgts",
    "phased_dmd_lora",
    "phased_dmd_alternating",
]


def torchrun(teacher: Path, out: Path, layout: str, names: list[str], nproc: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", str(WORKER), str(teacher), str(out), layout, *names,
    ]  # fmt: skip
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=500, check=False
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith(("rank", "[rank"))]
    assert result.returncode == 0, "\n".join(errors[-60:]) or result.stderr[-4000:]


def assert_same_generator(run: Path, reference: Path, atol: float) -> None:
    summary = json.loads((reference / "export" / "generator.json").read_text())
    experts = summary["experts"]
    for name in experts:
        _, _, ours = read_diffusers_dir(run / "export" / name)
        _, _, theirs = read_diffusers_dir(reference / "export" / name)
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key], value, atol=atol, rtol=0)


@pytest.mark.parametrize(
    "layout, names, atol",
    [
        # The weights move by ~2e-4 in these runs; the layouts (and the workers' single
        # thread) only reorder float sums, ~5e-7.
        ("tensor_parallel=2", list(ALGORITHMS), 1e-5),
        ("pipeline_parallel=2", SINGLE_GRADED_STEP, 1e-5),
        ("context_parallel=2", list(ALGORITHMS), 1e-5),
    ],
)
def test_model_parallel_runs_match_one_process(
    tmp_path, teacher, single_process_runs, layout, names, atol
):
    torchrun(teacher, tmp_path, layout, names)
    for name in names:
        assert_same_generator(tmp_path / name, single_process_runs[name], atol)


def test_data_parallel_replicas_stay_identical_and_resume_exactly(tmp_path, teacher):
    """DP = 2 with the sharded optimizer (the default); the worker also resumes the first run
    from a checkpoint after one iteration and checks it ends identical. The alternating run
    draws two latent shapes: every rank must draw the same each iteration."""
    names = ["phased_dmd_levers", "phased_dmd_sgts", "few_step_dmd", "phased_dmd_alternating"]
    torchrun(teacher, tmp_path, "batch_size=4", names)
    assert (tmp_path / "few_step_dmd" / "export" / "generator.json").is_file()


# Heads divisible by TP x CP = 4 (the shared tiny teacher has 2).
FOUR_HEADS = dataclasses.replace(TINY_WAN, num_attention_heads=4, attention_head_dim=4)
TP_X_CP = ["phased_dmd_all", "phased_dmd_lora"]  # through every step; LoRA experts


def test_tensor_parallel_2_x_context_parallel_2_matches_one_process(tmp_path):
    teacher = write_tiny_teacher(tmp_path / "teacher", arch=FOUR_HEADS)
    for name in TP_X_CP:
        assert run_distill(tmp_path / "one" / name, teacher, *ALGORITHMS[name]) == 0
    torchrun(teacher, tmp_path / "four", "tensor_parallel=2 context_parallel=2", TP_X_CP, nproc=4)
    for name in TP_X_CP:
        assert_same_generator(tmp_path / "four" / name, tmp_path / "one" / name, 1e-5)


def test_context_parallel_2_x_data_parallel_2_replicas_and_resume(tmp_path, teacher):
    """The two CP ranks of each data-parallel replica share its samples and checkpoint files
    (written once); the worker resumes after one iteration and must end bit-identical."""
    torchrun(teacher, tmp_path, "context_parallel=2 batch_size=4", ["phased_dmd_sgts"], nproc=4)
    assert (tmp_path / "phased_dmd_sgts" / "export" / "generator.json").is_file()


def test_ida_blend_is_exact_across_tensor_parallel_shards_and_a_sharded_optimizer(
    tmp_path, teacher
):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
        str(ROOT / "tests" / "parallel" / "levers_worker.py"), str(teacher), str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=400, check=False
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith(("rank", "[rank"))]
    assert result.returncode == 0, "\n".join(errors[-60:]) or result.stderr[-4000:]
    assert result.stdout.count("IDA blend exact") == 4


def test_discriminator_head_is_exact_under_sequence_and_context_parallelism():
    """TP = 2 with sequence parallelism x CP = 2: each rank's quarter of the token rows gives
    the whole head's logits, row gradients and its shard's parameter gradients."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
        str(ROOT / "tests" / "parallel" / "head_worker.py"),
    ]  # fmt: skip
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith(("rank", "[rank"))]
    assert result.returncode == 0, "\n".join(errors[-60:]) or result.stderr[-4000:]
    assert result.stdout.count("head exact under SP and CP") == 4

"""SLURM's pre-emption warning under a launcher: SIGUSR1 sent to the launcher's process group,
as SLURM signals a job step's task (`srun ... python -m phased_dmd_mp.launch`), reaches the
workers (torchrun starts them in sessions of their own), which agree on an iteration,
checkpoint and exit 0 with the launcher; none is left running; --resume ends exactly where an
uninterrupted run does."""

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distill_helpers import ALGORITHMS, distill_args

from phased_dmd_mp.distill import checkpoint
from phased_dmd_mp.distill.signals import child_processes
from phased_dmd_mp.models.convert import read_diffusers_dir

ROOT = Path(__file__).parents[1]
CONFIG = [*ALGORITHMS["phased_dmd_sgts"], "iterations_per_phase=4", "checkpoint_every=1"]


def launch(out: Path, teacher: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "phased_dmd_mp.launch", "--standalone", "--nproc_per_node=2",
        "-m", "phased_dmd_mp.pretrain_distill", *distill_args(out, teacher, *CONFIG), *extra,
    ]  # fmt: skip
    # A session of its own, like a task under slurmstepd: killpg reaches the launcher only.
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def processes_writing(out: Path) -> list[int]:
    """Live processes whose command line names the run directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if str(out) in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


def finish(job: subprocess.Popen, timeout: float = 120) -> str:
    try:
        output, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        raise
    return output


@pytest.fixture(scope="module")
def straight_run(teacher, tmp_path_factory):
    """The uninterrupted run every interrupted one must end equal to."""
    out = tmp_path_factory.mktemp("straight") / "run"
    straight = launch(out, teacher)
    assert straight.wait(timeout=240) == 0, finish(straight)[-3000:]
    return out


def assert_same_export(run: Path, reference: Path) -> None:
    for name in ("expert_1", "expert_2"):
        _, _, ours = read_diffusers_dir(run / "export" / name)
        _, _, theirs = read_diffusers_dir(reference / "export" / name)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_sigusr1_to_the_launcher_checkpoints_and_resume_is_exact(tmp_path, teacher, straight_run):
    run = tmp_path / "run"
    job = launch(run, teacher)
    deadline = time.monotonic() + 120
    while not checkpoint.complete_steps(run) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.complete_steps(run), "the run never wrote a checkpoint"
    sent = time.monotonic()
    os.killpg(job.pid, signal.SIGUSR1)  # what SLURM does to the step's task
    output = finish(job)
    elapsed = time.monotonic() - sent
    assert job.returncode == 0, output[-3000:]
    assert "passed on to workers" in output and "stopped by a signal after" in output
    stopped_at = checkpoint.complete_steps(run)[-1]
    assert stopped_at < 8 and not (run / "export").exists()
    assert processes_writing(run) == []  # no orphaned worker
    print(f"SIGUSR1 -> launcher exit 0 in {elapsed:.2f} s, checkpoint at iteration {stopped_at}")

    resumed = launch(run, teacher, "--resume")
    assert resumed.wait(timeout=240) == 0, finish(resumed)[-3000:]
    assert_same_export(run, straight_run)


def test_sigusr1_while_the_run_starts_stops_it_with_a_checkpoint(tmp_path, teacher, monkeypatch):
    """SLURM's warning before the training loop (here: during validation; on a cluster also the
    rendezvous and the model load) must not kill the rank: the run stops after one iteration,
    checkpointed, exit 0, so the job requeues and --resume continues."""
    from phased_dmd_mp import pretrain_distill
    from phased_dmd_mp.distill import validate

    checked = validate.validate_run

    def validate_then_warned(*args, **kwargs):
        checked(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(validate, "validate_run", validate_then_warned)
    previous = signal.getsignal(signal.SIGUSR1)
    run = tmp_path / "run"
    assert pretrain_distill.main(distill_args(run, teacher, *CONFIG)) == 0
    assert checkpoint.complete_steps(run) == [1] and not (run / "export").exists()
    assert signal.getsignal(signal.SIGUSR1) is previous  # handlers restored


def signal_step(job: subprocess.Popen, number: int, workers_too: bool = True) -> None:
    """What SLURM does: the signal to every process of the job step (the launcher and, in
    sessions of their own, its workers); `workers_too=False`: to the launcher alone."""
    for pid in [job.pid, *(child_processes(job.pid) if workers_too else [])]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, number)


def wait_for(job: subprocess.Popen, condition, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if job.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {what}: {finish(job)[-3000:]}")
        time.sleep(0.02)


def stopped(job: subprocess.Popen, run: Path, tries: str) -> int:
    """The iteration of the checkpoint a clean stop left (exit 0, no process left)."""
    output = finish(job, timeout=240)
    assert job.returncode == 0, f"{tries}: {output[-3000:]}"
    assert "stopped by a signal after" in output and "Traceback" not in output, tries
    assert processes_writing(run) == [], tries
    assert not (run / "export").exists()
    return checkpoint.complete_steps(run)[-1]


def test_sigusr1_twice_to_the_whole_step_while_starting_and_training(tmp_path, teacher):
    """SLURM signals every process of the job step and may repeat itself: SIGUSR1 twice,
    0.3-1.2 s apart, to the launcher and its workers, first while the workers still import
    torch, then while they train. Each is a clean stop: exit 0 (distill.sbatch requeues), a
    checkpoint, nothing left running. Was: the workers killed by the second SIGUSR1 (exit -10)
    and the launcher exiting 1, in 5 of 6 tries."""
    run, rng = tmp_path / "run", random.Random(20)
    job = launch(run, teacher)
    wait_for(job, lambda: child_processes(job.pid), "workers")
    for _ in range(2):
        signal_step(job, signal.SIGUSR1)
        time.sleep(rng.uniform(0.3, 1.2))
    assert stopped(job, run, "while starting") == 1  # one iteration, checkpointed

    job = launch(run, teacher, "--resume")
    wait_for(job, lambda: checkpoint.complete_steps(run)[-1] > 1, "checkpoint")
    for _ in range(2):
        signal_step(job, signal.SIGUSR1)
        time.sleep(rng.uniform(0.3, 1.2))
    assert 1 < stopped(job, run, "while training") < 8


def test_sigterm_twice_to_the_launcher_is_a_clean_stop(tmp_path, teacher):
    """SLURM ends a job (time limit, scancel) with SIGTERM to the launcher: the workers finish
    their checkpoint with no deadline from the launcher and it exits 0. Was: exit 1 with a
    traceback although both ranks had saved their checkpoint."""
    run, rng = tmp_path / "run", random.Random(21)
    job = launch(run, teacher)
    wait_for(job, lambda: checkpoint.complete_steps(run), "checkpoint")
    for _ in range(2):
        signal_step(job, signal.SIGTERM, workers_too=False)
        time.sleep(rng.uniform(0.3, 1.2))
    assert stopped(job, run, "SIGTERM twice to the launcher") < 8


def test_a_worker_config_error_is_one_line_under_the_launcher(tmp_path):
    """A user mistake under `launch` ends with the workers' one-line error and the launcher's
    one line, exit code 2 as without it, not torchrun's ChildFailedError traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "phased_dmd_mp.launch", "--standalone", "--nproc_per_node=1",
        "-m", "phased_dmd_mp.pretrain_distill", "--out", str(tmp_path / "run"),
        "--config", str(tmp_path / "missing.yaml"),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "missing.yaml" in lines[0], lines
    assert lines[-1].startswith("launch: phased_dmd_mp.pretrain_distill failed: rank 0 exited "
                                "with 2 first, 1 rank(s) failed"), lines  # fmt: skip

"""SLURM's pre-emption warning under a launcher: SIGUSR1 sent to the launcher's process group,
as SLURM signals a job step's task (`srun ... python -m phased_dmd_mp.launch`), reaches the
workers (torchrun starts them in sessions of their own), which agree on an iteration,
checkpoint and exit 0 with the launcher; none is left running; --resume ends exactly where an
uninterrupted run does."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from distill_helpers import ALGORITHMS, distill_args

from phased_dmd_mp.distill import checkpoint
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


def test_sigusr1_to_the_launcher_checkpoints_and_resume_is_exact(tmp_path, teacher):
    straight = launch(tmp_path / "straight", teacher)
    assert straight.wait(timeout=240) == 0, finish(straight)[-3000:]

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
    for name in ("expert_1", "expert_2"):
        _, _, ours = read_diffusers_dir(run / "export" / name)
        _, _, theirs = read_diffusers_dir(tmp_path / "straight" / "export" / name)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


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

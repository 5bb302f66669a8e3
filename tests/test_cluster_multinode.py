"""A multi-node rehearsal on one machine: two launchers ("nodes" of 2 ranks each) meeting at a
c10d rendezvous on 127.0.0.1, gloo, the way scripts/slurm/distill.sbatch starts a job.

- A launcher killed alone: its ranks stop with the others, with a checkpoint (exit 0).
- A node lost mid-run (its launcher and ranks killed) ends the job within collective_timeout.
- --resume on two nodes finishes with the weights of one uninterrupted 4-rank job.
- That checkpoint (data_parallel 4) resumed by one process is refused, naming both sizes.
- A hung rank (SIGSTOP) fails the job after collective_timeout, not after a fixed 10 minutes.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli
from distill_helpers import ALGORITHMS, distill_args

from phased_dmd_mp import pretrain_distill
from phased_dmd_mp.distill import checkpoint
from phased_dmd_mp.distill.signals import child_processes
from phased_dmd_mp.models.convert import read_diffusers_dir

ROOT = Path(__file__).parents[1]
# collective_timeout (s) of the 4-rank runs: it also bounds how far apart the ranks may reach
# each process group's creation, and 4 ranks importing on 2 shared cores can be 20 s apart.
TIMEOUT = 60
HUNG_TIMEOUT = 20  # of the 2-rank run with a hung rank
CONFIG = [
    *ALGORITHMS["phased_dmd_sgts"],
    "iterations_per_phase=3",
    "checkpoint_every=1",
    f"collective_timeout={TIMEOUT}",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(out: Path, teacher: Path, nodes: list[str], *extra: str, log: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "phased_dmd_mp.launch", *nodes, "--max-restarts=0",
        "-m", "phased_dmd_mp.pretrain_distill", *distill_args(out, teacher, *CONFIG), *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def two_nodes(out, teacher, tmp_path, *extra, tag=""):
    nodes = [
        "--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d", f"--rdzv-id=rehearsal{tag}",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
    ]  # fmt: skip
    return [
        launcher(out, teacher, nodes, *extra, log=tmp_path / f"node{i}{tag}.log") for i in (0, 1)
    ]


def wait_all(jobs, timeout=300) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [job.wait(timeout=max(1, deadline - time.monotonic())) for job in jobs]
    finally:
        for job in jobs:
            if job.poll() is None:
                kill_node(job)


def kill_node(job) -> None:
    """What a node failure does: the launcher and its ranks die at once."""
    for pid in [job.pid, *child_processes(job.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait()


def logs(tmp_path) -> str:
    return "\n".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("*.log")))


@pytest.fixture(scope="module")
def four_rank_job(tmp_path_factory, teacher):
    """One uninterrupted 4-rank job (one launcher): the reference."""
    out = tmp_path_factory.mktemp("four_rank") / "run"
    job = launcher(out, teacher, ["--standalone", "--nproc-per-node=4"], log=out.parent / "a.log")
    assert wait_all([job]) == [0], (out.parent / "a.log").read_text()[-3000:]
    return out


def wait_for_checkpoint_after(run, step, jobs, tmp_path) -> None:
    deadline = time.monotonic() + 240
    while not [s for s in checkpoint.complete_steps(run) if s > step]:
        assert all(job.poll() is None for job in jobs), logs(tmp_path)
        assert time.monotonic() < deadline, logs(tmp_path)
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_lost_launcher_or_node_ends_the_job_and_two_nodes_resume_exactly(
    tmp_path, teacher, four_rank_job, capsys
):
    run = tmp_path / "run"
    # 1. Node 1's launcher is killed alone: its ranks get SIGTERM from the kernel (they asked
    # for it), all four agree to stop, checkpoint and exit 0; nothing runs on orphaned.
    node_0, node_1 = two_nodes(run, teacher, tmp_path)
    wait_for_checkpoint_after(run, 0, [node_0, node_1], tmp_path)
    workers = child_processes(node_0.pid) + child_processes(node_1.pid)
    assert len(workers) == 4
    os.kill(node_1.pid, signal.SIGKILL)
    lost_at = time.monotonic()
    node_1.wait()
    while [p for p in workers if alive(p)] and time.monotonic() - lost_at < TIMEOUT + 60:
        time.sleep(0.1)
    ended = time.monotonic() - lost_at
    assert not [p for p in workers if alive(p)], logs(tmp_path)
    # Node 0's launcher now waits at torchrun's exit barrier for the dead one (300 s); under
    # SLURM, srun --kill-on-bad-exit=1 ends the step as soon as node 1's task died.
    kill_node(node_0)
    first_stop = checkpoint.complete_steps(run)[-1]
    stopped = f"stopped by a signal after {first_stop} generator updates"
    assert any(stopped in p.read_text() for p in tmp_path.glob("*.log")), logs(tmp_path)
    assert not (run / "export").exists()
    report = [
        f"launcher killed: all ranks stopped in {ended:.1f} s with a checkpoint at iteration "
        f"{first_stop}, 0 iterations lost"
    ]

    # 2. Node 1 dies (launcher and ranks): node 0's ranks fail within collective_timeout.
    node_0, node_1 = two_nodes(run, teacher, tmp_path, "--resume", tag="b")
    wait_for_checkpoint_after(run, first_stop, [node_0, node_1], tmp_path)
    kill_node(node_1)
    lost_at = time.monotonic()
    code = wait_all([node_0], timeout=TIMEOUT + 60)[0]
    ended = time.monotonic() - lost_at
    assert code != 0 and ended < TIMEOUT, (ended, logs(tmp_path))
    saved = checkpoint.complete_steps(run)[-1]
    assert first_stop < saved < 6 and not (run / "export").exists()
    report.append(
        f"node lost: job ended in {ended:.1f} s (collective_timeout {TIMEOUT} s); "
        f"checkpoint at iteration {saved}"
    )

    # 3. One process cannot continue a data-parallel-4 run exactly: refused, both sizes named.
    code, err = run_cli(
        pretrain_distill.main, [*distill_args(run, teacher, *CONFIG), "--resume"], capsys
    )
    assert code == 2 and "saved with data_parallel 4, this job has data_parallel 1" in err

    # 4. Two nodes resume to the end: the weights of the uninterrupted 4-rank job.
    jobs = two_nodes(run, teacher, tmp_path, "--resume", tag="c")
    assert wait_all(jobs) == [0, 0], logs(tmp_path)
    for name in ("expert_1", "expert_2"):
        _, _, ours = read_diffusers_dir(run / "export" / name)
        _, _, theirs = read_diffusers_dir(four_rank_job / "export" / name)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    print("\n".join(report))  # after the last capsys read


def test_hung_rank_fails_the_job_after_the_collective_timeout(tmp_path, teacher):
    run = tmp_path / "run"
    job = launcher(
        run, teacher, ["--standalone", "--nproc-per-node=2"], "--set", "iterations_per_phase=50",
        "--set", f"collective_timeout={HUNG_TIMEOUT}",
        log=tmp_path / "job.log",
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not checkpoint.complete_steps(run) and time.monotonic() < deadline:
        assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
        time.sleep(0.05)
    workers = child_processes(job.pid)
    rank_1 = next(p for p in workers if b"RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes())
    os.kill(rank_1, signal.SIGSTOP)  # alive, holds its sockets, never answers
    hung_at = time.monotonic()
    log = tmp_path / "job.log"
    while "Timed out waiting" not in log.read_text() and time.monotonic() - hung_at < 120:
        time.sleep(0.1)
    detected = time.monotonic() - hung_at
    kill_node(job)  # as srun --kill-on-bad-exit=1 does once rank 0 has failed
    assert f"Timed out waiting {HUNG_TIMEOUT * 1000}ms" in log.read_text(), log.read_text()[-3000:]
    assert f"a collective timed out after collective_timeout = {HUNG_TIMEOUT} s" in log.read_text()
    assert HUNG_TIMEOUT <= detected < HUNG_TIMEOUT + 15, detected
    print(f"hung rank: rank 0 failed {detected:.1f} s after the hang (timeout {HUNG_TIMEOUT} s)")

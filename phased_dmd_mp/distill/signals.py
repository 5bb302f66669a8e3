"""Stopping a run cleanly on a scheduler's signal, with every rank agreeing on when.

SLURM warns a job before its time limit or pre-emption with a signal (`--signal=USR1@300`)
sent to each task of the job step. Under `srun torchrun` the task is torchrun's launcher,
whose workers run in sessions of their own: a process-group signal never reaches them, and
torchrun does not handle SIGUSR1, so its default action kills the launcher and orphans the
workers. `python -m phased_dmd_mp.launch` (torchrun with SIGUSR1 passed on to its workers,
`forward_to_workers`) closes that gap; ranks that receive the signal themselves (srun launching
ranks directly, or SLURM's cgroup process tracking signalling every process of the step) are
covered by `stop_on_signals`, and a signal delivered twice counts once. A worker whose
launcher dies (killed alone; without SLURM nothing else would stop the worker) gets SIGTERM
from the kernel (`stop_with_launcher`) and stops like the others, with a checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

HANDLED = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []  # signals seen while any stop_on_signals block is active
_depth = 0


def _record(number, frame) -> None:
    _received.append(number)


@contextlib.contextmanager
def stop_on_signals():
    """Yields a function telling whether SIGTERM or SIGUSR1 arrived (handlers restored after).

    Blocks nest: a signal that arrives while the run starts (an outer block) still stops the
    training loop (an inner one)."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = {sig: signal.signal(sig, _record) for sig in HANDLED}
    _depth += 1
    try:
        yield lambda: bool(_received)
    finally:
        _depth -= 1
        if _depth == 0:
            _received.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def agree(flag: bool) -> bool:
    """True on every rank if it is true on any (so all ranks stop at the same iteration)."""
    if dist.get_world_size() == 1:
        return flag
    value = torch.tensor([float(flag)])
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def child_processes(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (Linux)."""
    children = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as file:
                stat = file.read()
        except OSError:  # the process ended meanwhile
            continue
        # Field 4 is the parent pid; the command name (field 2) may hold spaces and ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def forward_to_workers(number, frame) -> None:
    """Signal handler for a launcher: pass the signal on to its worker processes."""
    workers = child_processes(os.getpid())
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, number)
    name = signal.Signals(number).name
    print(
        f"launcher: {name} passed on to workers {workers or '(none running yet)'}", file=sys.stderr
    )


_PR_SET_PDEATHSIG = 1


def stop_with_launcher() -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID set), ask the kernel for SIGTERM when the launcher
    dies (Linux prctl PR_SET_PDEATHSIG), so the ranks agree to stop with a checkpoint instead
    of running on, orphaned."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != launcher:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)

"""Stopping a run cleanly on a scheduler's signal, with every rank agreeing on when.

SLURM warns a job before its time limit or pre-emption with a signal (`--signal=USR1@300`)
sent to every process of the job step, possibly more than once, and ends it with SIGTERM
(then SIGKILL after the site's KillWait). A stop request is SIGTERM or SIGUSR1, and any number
of them, to the launcher, to the workers or to both, at any moment of the run, ends it the
same way: the ranks agree on an iteration, checkpoint and exit 0, and the launcher exits 0.

Workers (`pretrain_distill`): `handle_for_process_life` records SIGTERM and SIGUSR1 from the
first line of the process to its exit (a signal after the run ended, while the interpreter
shuts down, must not kill it with -10); `stop_on_signals` tells the training loop, and `agree`
makes every rank stop at the same iteration. A worker whose launcher dies gets SIGTERM from the
kernel (`stop_with_launcher`) and stops like the others.

Launcher (`python -m phased_dmd_mp.launch`, torchrun inside): torchrun starts its workers in
sessions of their own, dies on SIGUSR1 (orphaning them), and on SIGTERM kills its workers 30 s
later and exits 1 although they saved a checkpoint. `forward_signals` instead blocks both
signals in every thread of the launcher before torchrun starts, so torchrun's handlers never
run, and a thread takes them with sigwait and passes each on to the workers, which then
finish their checkpoint with no deadline from the launcher. The blocked mask is inherited
by the workers: a signal reaching a worker before it installed its handler (while it imports
torch) stays pending until it does, instead of killing it; one that arrives before any worker
exists is passed on when the first appears.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

HANDLED = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []  # signals seen while any stop_on_signals block is active
_depth = 0


def _record(number, frame) -> None:
    _received.append(number)


def handle_for_process_life() -> None:
    """Record SIGTERM and SIGUSR1 (never die of them) until the process exits, and unblock
    them (a launcher's workers start with them blocked). Call first in a worker's __main__.

    Python resets the handlers it installed to the default (death) while it finalizes, after
    the last atexit callback, and any thread (gloo's, OpenMP's) may take the signal; this
    callback, registered first and so run last, ignores them instead (a handler of SIG_IGN is
    one Python leaves in place)."""
    for sig in HANDLED:
        signal.signal(sig, _record)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
    atexit.register(_ignore_from_now_on)


def _ignore_from_now_on() -> None:
    for sig in HANDLED:
        signal.signal(sig, signal.SIG_IGN)


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
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)  # pending ones arrive now
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
    import torch
    import torch.distributed as dist

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


def forward_signals() -> None:
    """For a launcher: block SIGTERM and SIGUSR1 in this thread (and so in every thread and
    worker started after it; call it before importing torch) and pass each one that arrives on
    to the workers from a thread of its own (module docstring)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)

    def loop():
        pending: list[int] = []  # received, not yet passed on (no worker existed)
        announced = False
        while True:
            if pending:
                time.sleep(0.5)  # until the first worker appears
            else:
                pending.append(signal.sigwait(HANDLED))
            while (more := signal.sigtimedwait(HANDLED, 0)) is not None:
                pending.append(more.si_signo)
            names = "+".join(signal.Signals(number).name for number in pending)
            workers = child_processes(os.getpid())
            if not workers:
                if not announced:
                    print(f"launcher: {names} before any worker started; passing it on to the "
                          "first", file=sys.stderr)  # fmt: skip
                    announced = True
                continue
            for number in pending:
                for pid in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, number)
            print(f"launcher: {names} passed on to workers {workers}", file=sys.stderr)
            pending, announced = [], False

    threading.Thread(target=loop, name="forward-signals", daemon=True).start()


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

"""Stopping a run cleanly on a scheduler's signal, with every rank agreeing on when."""

from __future__ import annotations

import contextlib
import signal
import threading

import torch
import torch.distributed as dist


@contextlib.contextmanager
def stop_on_signals():
    """Yields a function telling whether SIGTERM or SIGUSR1 arrived (handlers restored after)."""
    received = []
    handled = (signal.SIGTERM, signal.SIGUSR1)
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = {
        sig: signal.signal(sig, lambda number, frame: received.append(number)) for sig in handled
    }
    try:
        yield lambda: bool(received)
    finally:
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

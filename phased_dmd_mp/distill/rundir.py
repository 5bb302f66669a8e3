"""The run directory: one run at a time, recognised before anything in it is deleted.

A run directory holds what `pretrain_distill` writes (RUN_ENTRIES) and nothing else. While a
run lives, global rank 0 holds an exclusive `flock` on RUN/.lock (the file also names the
holder: host, pid, SLURM job), so a second run on the same directory is refused at once instead
of deleting the first one's `.partial` checkpoint or pairing its config with the other's
weights. The kernel drops the lock when the process dies (SIGKILL, node reboot), so a crashed
run never leaves a stale lock behind. On Lustre the mount needs `-o flock`; NFSv4 maps flock to
its own locks.

`--overwrite` removes only a directory recognised as a run (it has the marker file, or
config.yaml and checkpoints/, and nothing foreign), and removes its entries one by one: the
lock file stays, so the lock is held throughout.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

from phased_dmd_mp import atomic
from phased_dmd_mp.config import ConfigError

LOCK_FILE = ".lock"
MARKER_FILE = ".phased_dmd_run"  # written when a run starts: "this directory is a run"
RUN_ENTRIES = frozenset(
    {
        LOCK_FILE,
        MARKER_FILE,
        "config.yaml",
        "history.json",
        "checkpoints",
        "tensorboard",
        "samples",
        "export",
        "logs",  # per-node logs of scripts/slurm/
    }
)


class RunLock:
    """An exclusive flock on RUN/.lock for the life of the object (until `release`).

    Raises ConfigError naming the holder when another process holds it."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 4096, 0).decode(errors="replace").strip()
            os.close(self._fd)
            raise ConfigError(
                f"{run_dir} is in use by another run ({holder or 'holder unknown'}); wait for "
                "it to end or choose another --out"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, _holder().encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _holder() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    return (
        f"pid {os.getpid()} on {socket.gethostname()}"
        + (f", SLURM job {job}" if job else "")
        + f", since {started}"
    )


def foreign_entries(run_dir: Path) -> list[str]:
    """Names in run_dir that a run does not write (sorted)."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES)


def is_run(run_dir: Path) -> bool:
    """The directory was written by a run: marker file, or config.yaml with checkpoints/
    (runs from before the marker)."""
    return (run_dir / MARKER_FILE).is_file() or (
        (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints").is_dir()
    )


def check_usable(run_dir: Path) -> None:
    """A new or resumed run may write into run_dir: it does not exist, is empty (but for the
    lock file) or is a run. Raises ConfigError naming what is foreign."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a directory")
    foreign = foreign_entries(run_dir)
    if foreign:
        raise ConfigError(
            f"--out {run_dir} holds files that are not a run's ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}): choose an empty or new directory"
        )


def remove_run(run_dir: Path) -> list[str]:
    """--overwrite: delete a recognised run's entries (not the lock file); returns their names.

    Raises ConfigError, deleting nothing, when run_dir is not recognisably a run."""
    if not run_dir.exists():
        return []
    check_usable(run_dir)
    present = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)
    if present and not is_run(run_dir):
        raise ConfigError(
            f"--overwrite: {run_dir} does not look like a run (no {MARKER_FILE}, no config.yaml "
            "with checkpoints/); not deleting it"
        )
    for name in present:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return present


def mark(run_dir: Path) -> None:
    atomic.write_text(run_dir / MARKER_FILE, "written by python -m phased_dmd_mp.pretrain_distill\n")

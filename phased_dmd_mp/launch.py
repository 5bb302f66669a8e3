"""torchrun, with SLURM's signals handled the way a distillation run needs them.

    python -m phased_dmd_mp.launch [torchrun arguments] -m phased_dmd_mp.pretrain_distill ...

SIGUSR1 (SLURM's warning before a time limit or pre-emption) and SIGTERM (the end of a job, or
scancel) are passed on to the workers, any number of times, and the launcher keeps running:
the ranks agree on an iteration, checkpoint and exit 0, and the launcher exits 0 with them,
with no deadline on the checkpoint. Plain torchrun dies on SIGUSR1 (its workers run on,
orphaned) and on SIGTERM kills its workers 30 s later and exits 1; a large checkpoint may not
be written by then. What bounds the checkpoint's time is the scheduler: SLURM sends SIGKILL
KillWait seconds (site setting, often 30) after the final SIGTERM, so the sbatch asks for
SIGUSR1 300 s ahead (`--signal=USR1@300`). See phased_dmd_mp/distill/signals.py.

A failed worker (a config mistake is one line from each rank) ends the launcher with one line
naming the first failed rank and its exit code, and that exit code (128 + N for signal N),
instead of torchrun's traceback.
"""

import sys

from phased_dmd_mp.distill.signals import forward_signals


def main() -> None:
    forward_signals()  # before torch is imported: every thread and worker inherits the mask
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun()
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        print(
            f"launch: {error.name} failed: rank {rank} exited with {failure.exitcode} first, "
            f"{len(error.failures)} rank(s) failed (their messages are above)",
            file=sys.stderr,
        )
        sys.exit(code)


if __name__ == "__main__":
    main()

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
"""

from phased_dmd_mp.distill.signals import forward_signals


def main() -> None:
    forward_signals()  # before torch is imported: every thread and worker inherits the mask
    from torch.distributed.run import main as torchrun

    torchrun()


if __name__ == "__main__":
    main()

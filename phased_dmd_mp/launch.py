"""torchrun, except that SIGUSR1 (SLURM's warning before a time limit or pre-emption) reaches
the workers instead of killing the launcher.

    python -m phased_dmd_mp.launch [torchrun arguments] -m phased_dmd_mp.pretrain_distill ...

torchrun handles SIGTERM, SIGINT, SIGHUP and SIGQUIT (it passes them on and kills the workers
30 s later); SIGUSR1's default action ends the launcher at once and leaves its workers running,
orphaned, to the end of training. Here the launcher passes SIGUSR1 on and keeps running: the
ranks agree on an iteration, checkpoint and exit 0, and the launcher exits with them, with no
deadline on the checkpoint. See phased_dmd_mp/distill/signals.py.
"""

import signal

from phased_dmd_mp.distill.signals import forward_to_workers


def main() -> None:
    signal.signal(signal.SIGUSR1, forward_to_workers)
    from torch.distributed.run import main as torchrun

    torchrun()


if __name__ == "__main__":
    main()

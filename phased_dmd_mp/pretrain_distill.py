"""Distill a teacher into a few-step MoE generator with Phased DMD or one of its baselines.

    torchrun --nproc_per_node=N -m phased_dmd_mp.pretrain_distill --out RUN \\
        [--config configs/digits_phased_dmd.yaml] [--set key=value ...] [--resume | --overwrite]
    python -m phased_dmd_mp.pretrain_distill ...        (one process)

RUN receives config.yaml, checkpoints/ (atomic; --resume continues from the latest one exactly),
tensorboard/ (losses, gradient norms, step time, sample grids, a diversity proxy), history.json
and export/ (one diffusers-format transformer per expert and generator.json, which
`python -m phased_dmd_mp.sample --checkpoint RUN` reads). See phased_dmd_mp/distill/config.py
for every key. On a cluster launch through `python -m phased_dmd_mp.launch` (torchrun that
passes SLURM's SIGUSR1 on to its workers; scripts/slurm/distill.sbatch).

Exit codes: 0 done, or stopped by SIGTERM/SIGUSR1 with a checkpoint (--resume continues);
1 the run diverged or the disk is full (the message says which); 2 a user mistake (the message
names the key, file or directory).
"""

from __future__ import annotations

from phased_dmd_mp.distill.signals import (  # the standard library only
    handle_for_process_life,
    stop_on_signals,
    stop_with_launcher,
)

if __name__ == "__main__":  # before torch loads (seconds): a stop request never kills the rank
    handle_for_process_life()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402

from phased_dmd_mp import atomic  # noqa: E402
from phased_dmd_mp.config import ConfigError, add_config_arguments, load_config  # noqa: E402
from phased_dmd_mp.distill import checkpoint, rundir  # noqa: E402
from phased_dmd_mp.distill.config import RESUMABLE_KEYS, DistillConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    # SLURM's warning may come while the job starts (validation, the rendezvous waiting for the
    # other nodes, the model load): recorded from here on, it stops the run after one iteration
    # with a checkpoint; unhandled, it would kill the rank and fail the job, which then does
    # not requeue.
    with stop_on_signals():
        return _main(argv)


class _OneLineErrors(argparse.ArgumentParser):
    """Config mistakes print one line naming the key or file; argparse's usage block above it
    would push that line out of view on every rank of a launch."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _main(argv: list[str] | None) -> int:
    parser = _OneLineErrors(
        prog="python -m phased_dmd_mp.pretrain_distill", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    add_config_arguments(parser, DistillConfig, "iterations_per_phase=50")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run RUN holds (only a run) and start over",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        config = load_config(DistillConfig, args.config, args.overrides)
        from phased_dmd_mp.distill.validate import validate_run  # imports megatron

        # every path and shape the config implies, before any rank loads a model
        validate_run(config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        if args.out.exists() and not args.out.is_dir():
            raise ConfigError(f"--out {args.out} is a file, not a directory")
    except ConfigError as error:
        parser.error(str(error))

    from phased_dmd_mp.parallel.state import initialize

    try:
        initialize(
            config.tensor_parallel,
            config.pipeline_parallel,
            context_parallel=config.context_parallel,
            timeout=datetime.timedelta(seconds=config.collective_timeout),
        )
    except ConfigError as error:  # what only the launched job can check, e.g. its world size
        parser.error(str(error))
    lock = None
    try:
        if dist.get_rank() == 0:  # held for the run's life; the kernel drops it if we die
            lock = _on_rank_0(lambda: rundir.RunLock(args.out))
        _fail_on_any_rank(parser, lock if isinstance(lock, str) else None)
        stop_with_launcher()
        try:
            return _run(parser, args, config)
        except RuntimeError as error:  # gloo and NCCL say so in their messages
            if "timed out" not in str(error).lower() and "timeout" not in str(error).lower():
                raise
            message = " ".join(str(error).split())[:400]
            print(
                f"error: rank {dist.get_rank()}: a collective timed out after collective_timeout "
                f"= {config.collective_timeout:g} s (a rank hung or died; the checkpoints are "
                f"intact, continue with --resume): {message}",
                file=sys.stderr,
            )
            return 1
    finally:
        if isinstance(lock, rundir.RunLock):
            lock.release()


def _run(parser, args, config: DistillConfig) -> int:
    from phased_dmd_mp.distill.trainer import Distiller

    is_logger = dist.get_rank() == 0
    if is_logger:
        _fail_on_any_rank(parser, _on_rank_0(lambda: _check_run_dir(args)))
    else:
        _fail_on_any_rank(parser, None)
    resume_from = None
    if args.resume:
        try:
            resume_from = checkpoint.latest_intact(args.out, report=_warn)
            checkpoint.check_layout(resume_from)
        except checkpoint.CheckpointError as error:
            parser.error(f"--resume: {error}")
        error = (
            _on_rank_0(lambda: _check_same_config(args.out, resume_from, config))
            if is_logger
            else None
        )
        _fail_on_any_rank(parser, error)
    try:
        distiller = Distiller(config, args.out, progress=not args.no_progress)
    except ConfigError as error:
        parser.error(str(error))

    def start_run_dir():
        if is_logger:
            if args.overwrite:
                removed = rundir.remove_run(args.out)
                if removed:
                    print(f"--overwrite: removed {', '.join(removed)} from {args.out}")
            rundir.mark(args.out)
            atomic.write_yaml(args.out / "config.yaml", _yaml_roundtrip(config))

    try:
        atomic.collective_write(start_run_dir)  # also the barrier before anyone resumes
    except atomic.DiskFullError as error:
        return _disk_full(error, is_logger)
    if resume_from is not None:
        distiller.load_checkpoint(resume_from)
        finished = distiller.state.iteration >= distiller.total_iterations
        if finished and (args.out / "export" / "generator.json").is_file():
            if is_logger:
                print(
                    f"--resume: {args.out} already finished its {distiller.total_iterations} "
                    f"generator updates; nothing left to train (generator in {args.out / 'export'})"
                )
            return 0
        if is_logger and not finished:
            print(
                f"--resume: continuing from {resume_from} (generator update "
                f"{distiller.state.iteration} of {distiller.total_iterations})"
            )
    try:
        last = distiller.train()
        if is_logger:
            atomic.write_json(args.out / "history.json", distiller.state.history, indent=1)
    except atomic.DiskFullError as error:  # checkpoint, export, previews, history: every rank
        return _disk_full(error, is_logger)
    if distiller.diverged:
        if is_logger:
            saved = checkpoint.complete_steps(args.out)
            print(
                f"error: {distiller.diverged}; stopped without exporting (last checkpoint: "
                f"iteration {saved[-1] if saved else 'none'}, finite weights). --resume "
                "continues from it with new random draws (the skips in a row count on: raise "
                "max_consecutive_skips to allow more); "
                "lower generator_lr / fake_lr need a new run (another --out, or --overwrite): "
                "--resume refuses changed keys",
                file=sys.stderr,
            )
        return 1
    if distiller.stopped_early:
        if is_logger:
            print(
                f"stopped by a signal after {distiller.state.iteration} generator updates, "
                f"checkpoint saved; continue with --resume"
            )
        return 0
    if is_logger:
        done, skipped = distiller.state.iteration, distiller.state.skipped
        print(
            f"done: {done} generator updates ({skipped.get('generator', 0)} skipped), "
            f"{done * config.fake_updates} fake updates ({skipped.get('fake', 0)} skipped), last "
            f"generator loss {last.get('generator_loss', float('nan')):.4g}; generator in "
            f"{args.out / 'export'}"
        )
    return 0


def _disk_full(error: atomic.DiskFullError, is_logger: bool) -> int:
    if is_logger:
        print(f"error: {error.strerror}", file=sys.stderr)
    return 1


def _on_rank_0(check):
    """check()'s result, or the message of the ConfigError it raised."""
    try:
        return check()
    except ConfigError as error:
        return str(error)


def _fail_on_any_rank(parser, error: str | None) -> None:
    """Collective: rank 0's error (or None) reaches every rank, which all exit with it."""
    if dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        if dist.get_rank() == 0:
            parser.error(error)
        sys.exit(2)


def _check_run_dir(args) -> None:
    """--out may hold a run only when told what to do with it, and never foreign files."""
    rundir.check_usable(args.out)
    steps = checkpoint.complete_steps(args.out)
    if args.resume and not steps:
        raise ConfigError(f"--resume: {args.out} has no complete checkpoint")
    if args.overwrite and any(p.name != rundir.LOCK_FILE for p in args.out.iterdir()):
        if not rundir.is_run(args.out):
            raise ConfigError(
                f"--overwrite: {args.out} does not look like a run (no {rundir.MARKER_FILE}, "
                "no config.yaml with checkpoints/); not deleting it"
            )
    if steps and not (args.resume or args.overwrite):
        raise ConfigError(
            f"{args.out} already holds a run (checkpoint at iteration {steps[-1]}); pass --resume "
            "to continue it or --overwrite to start over"
        )


def _check_same_config(run_dir: Path, resume_from: Path, config: DistillConfig) -> None:
    """The config may differ from the run's (config.yaml and the checkpoint's own) only in
    run mechanics (RESUMABLE_KEYS); otherwise a ConfigError names every differing key."""
    current = _yaml_roundtrip(config)
    manifest = checkpoint.read_manifest(resume_from) or {}
    sources = {
        str(run_dir / "config.yaml"): yaml.safe_load((run_dir / "config.yaml").read_text()),
        f"checkpoint {resume_from.name}": yaml.safe_load(yaml.safe_dump(manifest.get("config"))),
    }
    for source, saved in sources.items():
        if not isinstance(saved, dict):
            raise ConfigError(f"--resume: {source} holds no config")
        changed = [
            f"{key}: {saved.get(key, '(absent)')!r} -> {current.get(key, '(absent)')!r}"
            for key in sorted(set(saved) | set(current))
            if key not in RESUMABLE_KEYS and saved.get(key) != current.get(key)
        ]
        if changed:
            raise ConfigError(
                f"--resume: the config differs from the one in {source}: {'; '.join(changed)}; "
                "resume with the same config"
            )


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _yaml_roundtrip(config: DistillConfig) -> dict:
    """The config as YAML stores it (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(dataclasses.asdict(config)))


if __name__ == "__main__":
    sys.exit(main())

"""Distill a teacher into a few-step MoE generator with Phased DMD or one of its baselines.

    torchrun --nproc_per_node=N -m phased_dmd_mp.pretrain_distill --out RUN \\
        [--config configs/digits_phased_dmd.yaml] [--set key=value ...] [--resume | --overwrite]
    python -m phased_dmd_mp.pretrain_distill ...        (one process)

RUN receives config.yaml, checkpoints/ (atomic; --resume continues from the latest one exactly),
tensorboard/ (losses, gradient norms, step time, sample grids, a diversity proxy), history.json
and export/ (one diffusers-format transformer per expert and generator.json, which
`python -m phased_dmd_mp.sample --checkpoint RUN` reads). See phased_dmd_mp/distill/config.py
for every key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch.distributed as dist
import yaml

from phased_dmd_mp.config import ConfigError, add_config_arguments, load_config
from phased_dmd_mp.distill import checkpoint
from phased_dmd_mp.distill.config import DistillConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phased_dmd_mp.pretrain_distill", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    add_config_arguments(parser, DistillConfig, "iterations_per_phase=50")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    group.add_argument("--overwrite", action="store_true", help="discard what RUN holds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        config = load_config(DistillConfig, args.config, args.overrides)
        from phased_dmd_mp.distill.validate import validate_run  # imports megatron

        # every path and shape the config implies, before any rank loads a model
        validate_run(config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as error:
        parser.error(str(error))
    steps = checkpoint.complete_steps(args.out)
    if args.resume and not steps:
        parser.error(f"--resume: {args.out} has no complete checkpoint")
    if steps and not (args.resume or args.overwrite):
        parser.error(
            f"{args.out} already holds a run (checkpoint at iteration {steps[-1]}); pass --resume "
            "to continue it or --overwrite to start over"
        )
    if args.resume:
        saved = yaml.safe_load((args.out / "config.yaml").read_text())
        if saved != _yaml_roundtrip(config):
            parser.error(
                f"--resume: the config differs from the one {args.out} was started with "
                f"({args.out / 'config.yaml'}); resume with the same config"
            )

    from phased_dmd_mp.distill.trainer import Distiller  # imports megatron: after arg checks

    try:
        distiller = Distiller(config, args.out, progress=not args.no_progress)
    except ConfigError as error:  # what only the launched job can check, e.g. its world size
        parser.error(str(error))
    if dist.get_rank() == 0:
        if args.overwrite:
            shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "config.yaml").write_text(
            yaml.safe_dump(_yaml_roundtrip(config), sort_keys=False)
        )
    dist.barrier()
    if args.resume:
        distiller.load_checkpoint(args.out / "checkpoints" / f"step-{steps[-1]:08d}")
    last = distiller.train()
    if dist.get_rank() == 0:
        (args.out / "history.json").write_text(json.dumps(distiller.state.history, indent=1) + "\n")
    if distiller.stopped_early:
        if dist.get_rank() == 0:
            print(
                f"stopped by a signal after {distiller.state.iteration} generator updates, "
                f"checkpoint saved; continue with --resume"
            )
        return 0
    if dist.get_rank() == 0:
        print(
            f"done: {distiller.state.iteration} generator updates "
            f"({distiller.state.skipped} skipped), last generator loss "
            f"{last.get('generator_loss', float('nan')):.4g}; generator in {args.out / 'export'}"
        )
    return 0


def _yaml_roundtrip(config: DistillConfig) -> dict:
    """The config as YAML stores it (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(dataclasses.asdict(config)))


if __name__ == "__main__":
    sys.exit(main())

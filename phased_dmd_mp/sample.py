"""Sample a model for every condition of its condition set x seeds, in the evaluation's format.

    python -m phased_dmd_mp.sample --teacher DIR --out OUT [--steps 40] [--guidance G]
                                   [--seeds 8] [--shift S] [--overwrite]
    python -m phased_dmd_mp.sample --checkpoint RUN --out OUT [--seeds 8] [--overwrite]

--teacher runs the teacher of a teacher directory (data/teacher.py) with many steps and
classifier-free guidance (defaults from its teacher.yaml); --checkpoint runs the N-step MoE
generator a distillation run exported (RUN/export: one transformer per expert and
generator.json, which says which expert takes each step), without guidance, as it was trained.
Both write OUT/samples.npz ([conditions, seeds, C, H, W], model name, labels, value_range;
phased_dmd_mp/eval/samples.py), which `python -m phased_dmd_mp.evaluate` reads, and
OUT/grid.png (rows: conditions, columns: seeds). Seed j starts every condition from the same
noise, so columns compare conditions and rows compare seeds. A teacher whose teacher.yaml has a
mixture (a point teacher, data/mixture.py; for --checkpoint, the run's teacher) gives points
instead: samples [conditions, seeds, D] with the mixture_* keys, and OUT/grid.png is a scatter
over the modes.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from phased_dmd_mp.conditioning import Conditions, dit_velocity
from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.data.conditions import ConditionSet
from phased_dmd_mp.data.teacher import (
    SPEC_FILE,
    load_diffusers_transformer,
    load_transformer,
    read_conditions,
    read_spec,
)
from phased_dmd_mp.eval.mixture import Mixture
from phased_dmd_mp.eval.report import save_grid
from phased_dmd_mp.eval.samples import SampleFile
from phased_dmd_mp.evaluate import EvalConfig
from phased_dmd_mp.sampling import ConditionedVelocityFn, guided, sample
from phased_dmd_mp.schedule import timestep_table

SAMPLE_BATCH = 256  # (condition, seed) pairs integrated together


@dataclass(frozen=True)
class Source:
    """A sampleable model: the velocity it integrates under a batch of conditions (guidance
    included) over its timestep table, and the condition set it is conditioned on."""

    name: str
    velocity: ConditionedVelocityFn
    timesteps: Tensor
    conditions: ConditionSet
    latent_shape: tuple[int, ...]
    value_range: tuple[float, float]
    renoise: bool = False  # DMD2's few-step sampler: fresh noise after each step's x_0
    mixture: Mixture | None = None  # a point teacher's (TeacherSpec): samples are points


def guided_velocity(
    model, arch, conditions: ConditionSet, guidance_scale: float
) -> ConditionedVelocityFn:
    """The DiT's velocity under classifier-free guidance with the set's unconditional entry."""
    velocity = dit_velocity(model, arch)

    def fn(x: Tensor, t: Tensor, cond: Conditions) -> Tensor:
        uncond = conditions.uncond(cond.batch_size, like=cond)
        return guided(velocity, cond, uncond, guidance_scale)(x, t)

    return fn


def teacher_source(
    teacher_dir: str | Path,
    steps: int | None = None,
    guidance_scale: float | None = None,
    shift: float | None = None,
) -> Source:
    """The teacher of a teacher directory; unset options take its teacher.yaml values."""
    spec = read_spec(teacher_dir)
    steps = spec.sampling_steps if steps is None else steps
    guidance_scale = spec.guidance_scale if guidance_scale is None else guidance_scale
    shift = spec.shift if shift is None else shift
    if steps < 1 or not guidance_scale >= 1 or not shift > 0:
        raise ConfigError(
            f"need steps >= 1, guidance >= 1 and shift > 0, got {steps}, {guidance_scale}, {shift}"
        )
    conditions = read_conditions(teacher_dir)
    model = load_transformer(teacher_dir).eval()
    return Source(
        name=f"teacher {steps} steps, CFG {guidance_scale:g}",
        velocity=guided_velocity(model, model.arch, conditions, guidance_scale),
        timesteps=timestep_table(steps, shift),
        conditions=conditions,
        latent_shape=spec.latent_shape,
        value_range=spec.value_range,
        mixture=spec.mixture(),
    )


def generator_source(run_dir: str | Path) -> Source:
    """The MoE generator a distillation run exported (RUN or RUN/export)."""
    folder = Path(run_dir)
    if not (folder / "generator.json").is_file():
        folder = folder / "export"
    summary_path = folder / "generator.json"
    if not summary_path.is_file():
        raise ConfigError(
            f"{run_dir} holds no exported generator ({summary_path} is missing): a run exports "
            "when it finishes; an interrupted one finishes with pretrain_distill --resume"
        )
    summary = json.loads(summary_path.read_text())
    teacher_dir = Path(summary["teacher"])
    if not (teacher_dir / SPEC_FILE).is_file():
        raise ConfigError(
            f"the run's teacher {teacher_dir} ({summary_path}) has no {SPEC_FILE}, which says "
            "whether samples are points: run from the directory the run was started in, or edit "
            "`teacher` there"
        )
    mixture = read_spec(teacher_dir).mixture()
    conditions_dir = Path(summary["conditions"])
    if not conditions_dir.is_dir():
        raise ConfigError(
            f"the run's condition set {conditions_dir} ({summary_path}) does not exist: run "
            "from the directory the run was started in, or edit `conditions` there"
        )
    experts = [
        load_diffusers_transformer(folder / name).eval().requires_grad_(False)
        for name in summary["experts"]
    ]
    velocities = [dit_velocity(expert, expert.arch) for expert in experts]
    timesteps = torch.tensor(summary["timesteps"], dtype=torch.float64)  # as trained
    expert_of_step = summary["expert_of_step"]  # 1-based, one per step

    def velocity(x: Tensor, t: Tensor, cond: Conditions) -> Tensor:
        step = int((timesteps[:-1] - t[0].item()).abs().argmin())
        return velocities[expert_of_step[step] - 1](x, t, cond)

    return Source(
        name=f"{summary['algorithm']} {len(expert_of_step)} steps, {len(experts)} experts",
        velocity=velocity,
        timesteps=timesteps,
        conditions=ConditionSet(conditions_dir),
        latent_shape=tuple(summary["latent_shape"]),
        value_range=tuple(summary["value_range"]),
        renoise=summary["step_noise"] == "renoise",
        mixture=mixture,
    )


def _with_conditions(
    velocity: ConditionedVelocityFn, cond: Conditions, x: Tensor, t: Tensor
) -> Tensor:
    return velocity(x, t, cond)


def seed_noise(latent_shape: tuple[int, ...], seeds: int) -> Tensor:
    """[seeds, *latent_shape]: seed j's starting noise, the same for every condition."""
    return torch.stack(
        [
            torch.randn(latent_shape, generator=torch.Generator().manual_seed(j))
            for j in range(seeds)
        ]
    )


@torch.no_grad()
def generate(source: Source, seeds: int, progress: bool = True) -> Tensor:
    """Samples [conditions, seeds, *latent_shape] for every condition of the source's set."""
    noise = seed_noise(source.latent_shape, seeds)
    count = len(source.conditions)
    pairs = torch.cartesian_prod(torch.arange(count), torch.arange(seeds))  # condition-major
    chunks = pairs.split(SAMPLE_BATCH)
    out = []
    for chunk in tqdm(
        chunks, desc=f"sample {source.name}", disable=not progress or len(chunks) < 2
    ):
        velocity = functools.partial(
            _with_conditions, source.velocity, source.conditions.batch(chunk[:, 0])
        )
        renoise = torch.Generator().manual_seed(int(chunk[0, 0])) if source.renoise else None
        out.append(
            sample(
                velocity, noise[chunk[:, 1]], source.timesteps, renoise=renoise, progress=progress
            )
        )
    return torch.cat(out).view(count, seeds, *source.latent_shape)


def labels_of(conditions: ConditionSet) -> np.ndarray:
    """What each condition is, for tables and grids: its label, else its index."""
    labels = conditions.labels if conditions.labels is not None else torch.arange(len(conditions))
    return labels.numpy()


def write_samples(
    out_dir: Path, source: Source, samples: Tensor, grid_name: str = "grid.png"
) -> Path:
    """OUT/samples.npz (eval format) and the grid OUT/grid_name; returns the npz path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if source.mixture is not None:
        return _write_points(out_dir, source, samples, grid_name)
    if samples.shape[3] != 1:
        raise ConfigError(
            f"the evaluation takes images; these latents have {samples.shape[3]} frames "
            "(decode video latents with the model's VAE first)"
        )
    images = samples[:, :, :, 0]  # [conditions, seeds, C, H, W]
    path = out_dir / "samples.npz"
    labels = labels_of(source.conditions)
    np.savez(
        path,
        samples=images.float().numpy(),
        model=np.str_(source.name),
        labels=labels,
        value_range=np.array(source.value_range),
    )
    low, high = source.value_range
    grid = SampleFile(
        path=path,
        model=source.name,
        samples=(2 * (images.float() - low) / (high - low) - 1).clamp(-1, 1),
        labels=[str(label) for label in labels],
        mixture=None,
    )
    save_grid(grid, out_dir / grid_name, coverage_radius=0.0)
    return path


def _write_points(out_dir: Path, source: Source, samples: Tensor, grid_name: str) -> Path:
    """Point samples [conditions, seeds, D] (the latents flattened) with their mixture, and a
    scatter of them over its modes."""
    points = samples.flatten(2).double()
    mixture = source.mixture
    path = out_dir / "samples.npz"
    labels = labels_of(source.conditions)
    np.savez(
        path,
        samples=points.numpy(),
        model=np.str_(source.name),
        labels=labels,
        mixture_means=mixture.means.numpy(),
        mixture_weights=mixture.weights.numpy(),
        mixture_std=np.float64(mixture.std),
    )
    scatter = SampleFile(
        path=path,
        model=source.name,
        samples=points,
        labels=[str(label) for label in labels],
        mixture=mixture,
    )
    save_grid(scatter, out_dir / grid_name, EvalConfig.coverage_radius)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phased_dmd_mp.sample", description=__doc__.split("\n")[0]
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--teacher", type=Path, help="teacher directory")
    model.add_argument(
        "--checkpoint", type=Path, help="distillation run directory (its exported generator)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--steps", type=int, help="sampling steps (default: teacher.yaml's)")
    parser.add_argument("--guidance", type=float, help="CFG scale, 1 = none (default: teacher's)")
    parser.add_argument("--shift", type=float, help="timestep shift (default: teacher.yaml's)")
    parser.add_argument("--seeds", type=int, default=8, help="samples per condition (>= 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace samples already in --out")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be >= 2 (the evaluation measures diversity over seed pairs)")
    if (args.out / "samples.npz").exists() and not args.overwrite:
        parser.error(f"{args.out} already holds samples; pass --overwrite or choose another --out")
    if args.checkpoint and (args.steps, args.guidance, args.shift) != (None, None, None):
        parser.error(
            "--steps, --guidance and --shift are the teacher's; the generator runs the "
            "steps it was distilled for"
        )
    start = time.perf_counter()
    try:
        if args.checkpoint:
            source = generator_source(args.checkpoint)
        else:
            source = teacher_source(args.teacher, args.steps, args.guidance, args.shift)
        path = write_samples(args.out, source, generate(source, args.seeds))
    except ConfigError as error:
        parser.error(str(error))
    print(
        f"sampled {len(source.conditions)} conditions x {args.seeds} seeds ({source.name}) in "
        f"{time.perf_counter() - start:.1f} s\nwrote {path} and {args.out / 'grid.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

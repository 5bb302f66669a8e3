"""Sample a model for every condition of its condition set x seeds, in the evaluation's format.

    [torchrun --nproc_per_node=N] python -m phased_dmd_mp.sample --teacher DIR --out OUT
        [--steps 40] [--guidance G] [--seeds 8] [--shift S] [--dtype D] [--overwrite]
    [torchrun --nproc_per_node=N] python -m phased_dmd_mp.sample --checkpoint RUN --out OUT
        [--seeds 8] [--dtype D] [--latent-shape C F H W] [--overwrite]

--teacher runs the teacher of a teacher directory (data/teacher.py) with many steps and
classifier-free guidance (defaults from its teacher.yaml); --checkpoint runs the N-step MoE
generator a distillation run exported (RUN/export: one transformer per expert and
generator.json, which says which expert takes each step), without guidance, as it was trained,
at one of the latent shapes it was trained at (--latent-shape; default the first).
Both write OUT/samples.npz ([conditions, seeds, C, H, W], model name, labels, value_range;
phased_dmd_mp/eval/samples.py), which `python -m phased_dmd_mp.evaluate` reads, and
OUT/grid.png (rows: conditions, columns: seeds). A video teacher without a VAE (the moving
digits) gives its videos as they are, samples [conditions, seeds, C, F, H, W]
(phased_dmd_mp/eval/videos.py), and OUT/grid.png shows seed 0's frames per condition. Seed j starts every condition from the same
noise, so columns compare conditions and rows compare seeds. A teacher whose teacher.yaml has a
mixture (a point teacher, data/mixture.py; for --checkpoint, the run's teacher) gives points
instead: samples [conditions, seeds, D] with the mixture_* keys, and OUT/grid.png is a scatter
over the modes.

A teacher prepared from a diffusers pipeline folder (python -m phased_dmd_mp.prepare; for
--checkpoint, the run's teacher) is decoded with that pipeline's VAE (phased_dmd_mp.media):
OUT/media/c{condition}_s{seed}.png for images or .mp4 for video, OUT/grid.png (first frames,
conditions x seeds) and, for images, OUT/samples.npz of the pixels [conditions, seeds, 3, H, W]
in [-1, 1].

The transformers run on the GPU when there is one, in bfloat16 there (--dtype float32 to
change), on the CPU in float32; the VAE decodes in float32. Under torchrun it takes the run's
tensor/pipeline-parallel layout (a teacher's: --tensor-parallel / --pipeline-parallel) and
splits the samples over the data-parallel rest.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state
from torch import Tensor
from tqdm import tqdm

from phased_dmd_mp import media
from phased_dmd_mp.conditioning import Conditions, with_first_frame
from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.data.conditions import ConditionSet, open_conditions
from phased_dmd_mp.data.teacher import (
    SPEC_FILE,
    load_diffusers_transformer,
    pipeline_dir,
    read_conditions,
    read_spec,
    teacher_experts,
)
from phased_dmd_mp.distill.models import RoutedVelocity, VelocityModel
from phased_dmd_mp.eval.mixture import Mixture
from phased_dmd_mp.eval.report import save_grid, video_strip
from phased_dmd_mp.eval.samples import SampleFile
from phased_dmd_mp.evaluate import EvalConfig
from phased_dmd_mp.models import ExecutionConfig
from phased_dmd_mp.parallel.layout import sequence_parallel_on
from phased_dmd_mp.parallel.state import initialize
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
    pipeline: Path | None = None  # the diffusers pipeline folder whose VAE decodes the latents


@dataclass(frozen=True)
class Runtime:
    """Where and how models run: device, dtype and (under torchrun) the parallel layout."""

    device: torch.device
    execution: ExecutionConfig

    @staticmethod
    def start(
        tensor_parallel: int = 1,
        pipeline_parallel: int = 1,
        context_parallel: int = 1,
        sequence_parallel: bool | None = None,
        dtype: str | None = None,
    ):
        """Join the process group (a world of one outside torchrun) in this layout
        (sequence_parallel None: on where tensor_parallel > 1, as in a distillation run);
        dtype None: bfloat16 on a GPU, float32 on the CPU."""
        initialize(tensor_parallel, pipeline_parallel, context_parallel=context_parallel)
        cuda = torch.cuda.is_available()
        dtype = dtype or ("bfloat16" if cuda else "float32")
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        sequence_parallel = sequence_parallel_on(sequence_parallel, tensor_parallel)
        return Runtime(device, ExecutionConfig(dtype=dtype, sequence_parallel=sequence_parallel))

    def load(self, directory: Path) -> VelocityModel:
        """A diffusers transformer folder as this rank's shard, frozen, on the device."""
        module = load_diffusers_transformer(directory, self.execution).to(self.device)
        return VelocityModel(module.eval().requires_grad_(False))


def _predict(model: VelocityModel | RoutedVelocity):
    return lambda x, t, cond: model.predict(x, t, cond)


def guided_velocity(
    velocity: ConditionedVelocityFn, conditions: ConditionSet, guidance_scale: float, device
) -> ConditionedVelocityFn:
    """The velocity under classifier-free guidance with the set's unconditional entry."""

    def fn(x: Tensor, t: Tensor, cond: Conditions) -> Tensor:
        uncond = conditions.uncond(cond.batch_size, like=cond).to(device)
        return guided(velocity, cond, uncond, guidance_scale)(x, t)

    return fn


def teacher_source(
    teacher_dir: str | Path,
    steps: int | None = None,
    guidance_scale: float | None = None,
    shift: float | None = None,
    runtime: Runtime | None = None,
) -> Source:
    """The teacher of a teacher directory; unset options take its teacher.yaml values."""
    runtime = runtime or Runtime.start()
    spec = read_spec(teacher_dir)
    steps = spec.sampling_steps if steps is None else steps
    guidance_scale = spec.guidance_scale if guidance_scale is None else guidance_scale
    shift = spec.shift if shift is None else shift
    if steps < 1 or not guidance_scale >= 1 or not shift > 0:
        raise ConfigError(
            f"need steps >= 1, guidance >= 1 and shift > 0, got {steps}, {guidance_scale}, {shift}"
        )
    conditions = read_conditions(teacher_dir)
    high, low, boundary = teacher_experts(teacher_dir, spec)
    model = runtime.load(high)
    if low is not None:  # Wan2.2: the low-noise expert below the boundary, as in training
        model = RoutedVelocity(model, runtime.load(low), boundary)
    return Source(
        name=f"teacher {steps} steps, CFG {guidance_scale:g}",
        velocity=guided_velocity(_predict(model), conditions, guidance_scale, runtime.device),
        timesteps=timestep_table(steps, shift),
        conditions=conditions,
        latent_shape=spec.latent_shape,
        value_range=spec.value_range,
        mixture=spec.mixture(),
        pipeline=pipeline_dir(teacher_dir, spec),
    )


LAYOUT_KEYS = ("tensor_parallel", "pipeline_parallel", "context_parallel", "sequence_parallel")


def run_layout(run_dir: str | Path) -> dict:
    """The parallel layout of a distillation run (RUN/config.yaml): `Runtime.start` keywords."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        path = Path(run_dir).parent / "config.yaml"  # RUN/export given
    config = yaml.safe_load(path.read_text()) if path.is_file() else {}
    return {key: config[key] for key in LAYOUT_KEYS if key in config}


def require_run_world(run_dir: str | Path, layout: dict) -> None:
    """ConfigError unless this job's world size (torchrun's WORLD_SIZE, 1 without it) is a
    multiple of the run's model-parallel size: --checkpoint samples in the run's own layout."""
    sizes = [layout.get(key) or 1 for key in LAYOUT_KEYS[:3]]
    ranks = sizes[0] * sizes[1] * sizes[2]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % ranks:
        raise ConfigError(
            f"{run_dir} was trained at tensor_parallel {sizes[0]} x pipeline_parallel {sizes[1]} "
            f"x context_parallel {sizes[2]} (its config.yaml) and --checkpoint samples in that "
            f"layout: run it under torchrun --nproc_per_node={ranks} (or a multiple), not "
            f"{world} process{'es' if world > 1 else ''}"
        )


def generator_source(
    run_dir: str | Path, runtime: Runtime | None = None, latent_shape=None
) -> Source:
    """The MoE generator a distillation run exported (RUN or RUN/export), sampled at
    `latent_shape` (default: the first shape it was trained at; ConfigError for one it was
    not trained at)."""
    runtime = runtime or Runtime.start(**run_layout(run_dir))
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
    spec = read_spec(teacher_dir)
    conditions_dir = Path(summary["conditions"])
    if not conditions_dir.is_dir():
        raise ConfigError(
            f"the run's condition set {conditions_dir} ({summary_path}) does not exist: run "
            "from the directory the run was started in, or edit `conditions` there"
        )
    experts = [runtime.load(folder / name) for name in summary["experts"]]
    timesteps = torch.tensor(summary["timesteps"], dtype=torch.float64)  # as trained
    expert_of_step = summary["expert_of_step"]  # 1-based, one per step

    def velocity(x: Tensor, t: Tensor, cond: Conditions) -> Tensor:
        step = int((timesteps[:-1] - t[0].item()).abs().argmin())
        return experts[expert_of_step[step] - 1].predict(x, t, cond)

    return Source(
        name=f"{summary['algorithm']} {len(expert_of_step)} steps, {len(experts)} experts",
        velocity=velocity,
        timesteps=timesteps,
        conditions=open_conditions(conditions_dir),
        latent_shape=_trained_shape(summary, latent_shape, summary_path),
        value_range=tuple(summary["value_range"]),
        renoise=summary["step_noise"] == "renoise",
        mixture=spec.mixture(),
        pipeline=pipeline_dir(teacher_dir, spec),
    )


def _trained_shape(summary: dict, requested, summary_path: Path) -> tuple[int, ...]:
    trained = [tuple(s) for s in summary.get("latent_shapes", [summary["latent_shape"]])]
    if requested is None:
        return trained[0]
    if tuple(requested) not in trained:
        raise ConfigError(
            f"--latent-shape {list(requested)}: the generator was trained at "
            f"{[list(s) for s in trained]} ({summary_path})"
        )
    return tuple(requested)


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
def generate(
    source: Source,
    seeds: int,
    progress: bool = True,
    device: torch.device | str = "cpu",
    batch: int = SAMPLE_BATCH,
) -> Tensor:
    """Samples [conditions, seeds, *latent_shape] (float32, CPU) for every condition of the
    source's set, `batch` (condition, seed) pairs at a time; data-parallel ranks take every
    dp-th batch and all receive every sample."""
    noise = seed_noise(source.latent_shape, seeds)
    count = len(source.conditions)
    pairs = torch.cartesian_prod(torch.arange(count), torch.arange(seeds))  # condition-major
    chunks = list(enumerate(pairs.split(batch)))
    dp_rank, dp_size = _data_parallel()
    mine = chunks[dp_rank::dp_size]
    out = {}
    for index, chunk in tqdm(
        mine, desc=f"sample {source.name}", disable=not progress or len(mine) < 2
    ):
        cond = source.conditions.batch(chunk[:, 0]).to(device)
        velocity = functools.partial(_with_conditions, source.velocity, cond)
        renoise = torch.Generator().manual_seed(int(chunk[0, 0])) if source.renoise else None
        x = sample(
            velocity,
            noise[chunk[:, 1]].to(device),
            source.timesteps,
            renoise=renoise,
            progress=progress,
        )
        out[index] = with_first_frame(x, cond).float().cpu()
    if dp_size > 1:
        gathered = [None] * dp_size
        dist.all_gather_object(gathered, out, group=parallel_state.get_data_parallel_group())
        out = {k: v for part in gathered for k, v in part.items()}
    return torch.cat([out[i] for i in range(len(chunks))]).view(count, seeds, *source.latent_shape)


def _data_parallel() -> tuple[int, int]:
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return (
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
    )


def labels_of(conditions: ConditionSet) -> np.ndarray:
    """What each condition is, for tables and grids: its label, else its index."""
    labels = conditions.labels if conditions.labels is not None else torch.arange(len(conditions))
    return labels.numpy()


def write_samples(
    out_dir: Path, source: Source, samples: Tensor, grid_name: str = "grid.png"
) -> Path:
    """OUT/samples.npz (eval format: images, points, or for video latents without a VAE the
    videos [conditions, seeds, C, F, H, W]) and the grid OUT/grid_name (videos: seed 0's frames
    per condition); returns the npz path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if source.mixture is not None:
        return _write_points(out_dir, source, samples, grid_name)
    path = out_dir / "samples.npz"
    labels = labels_of(source.conditions)
    if samples.shape[3] > 1:  # videos the evaluation reads as they are (no VAE: pixels)
        np.savez(
            path,
            samples=samples.float().numpy(),
            model=np.str_(source.name),
            labels=labels,
            value_range=np.array(source.value_range),
        )
        low, high = source.value_range
        videos = (2 * (samples[:, 0].float() - low) / (high - low) - 1).clamp(-1, 1)
        strip = video_strip(source.name, videos.transpose(1, 2), [str(label) for label in labels])
        save_grid(strip, out_dir / grid_name, coverage_radius=0.0)
        return path
    images = samples[:, :, :, 0]  # [conditions, seeds, C, H, W]
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


def write_decoded(
    out_dir: Path, source: Source, samples: Tensor, runtime: Runtime, micro_batch: int = 1
) -> Path:
    """Latents [conditions, seeds, C, F, H, W] decoded with the source pipeline's VAE:
    OUT/media/c{condition}_s{seed}.png (or .mp4), OUT/grid.png of first frames and, for
    images, OUT/samples.npz of the pixels in [-1, 1]; returns the grid's path."""
    conditions, seeds = samples.shape[:2]
    # float32 whatever the transformer's dtype, as diffusers' Wan examples load the VAE
    vae = media.load_vae(source.pipeline, runtime.device)
    pixels = media.decode_latents(vae, samples.flatten(0, 1), micro_batch)  # [n, F, H, W, 3]
    pixels = pixels.unflatten(0, (conditions, seeds))
    for c in range(conditions):
        for j in range(seeds):
            stem = out_dir / "media" / f"c{c:04d}_s{j}"
            if pixels.shape[2] == 1:
                media.write_png(pixels[c, j, 0], stem.with_suffix(".png"))
            else:
                media.write_mp4(pixels[c, j], stem.with_suffix(".mp4"))
    grid = out_dir / "grid.png"  # first frames, labelled as the evaluation's grids
    first_frames = pixels[:, :, 0].permute(0, 1, 4, 2, 3) * 2 - 1  # [c, s, 3, H, W] in [-1, 1]
    labels = [str(label) for label in labels_of(source.conditions)]
    save_grid(SampleFile(grid, source.name, first_frames, labels, None), grid, coverage_radius=0.0)
    if pixels.shape[2] == 1:
        np.savez(
            out_dir / "samples.npz",
            samples=(pixels[:, :, 0].permute(0, 1, 4, 2, 3) * 2 - 1).numpy(),
            model=np.str_(source.name),
            labels=labels_of(source.conditions),
        )
    return grid


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
    parser.add_argument(
        "--latent-shape",
        type=int,
        nargs=4,
        metavar=("C", "F", "H", "W"),
        help="with --checkpoint: one of the shapes the run trained (default: its first)",
    )
    parser.add_argument("--seeds", type=int, default=8, help="samples per condition (>= 2)")
    parser.add_argument(
        "--batch",
        type=int,
        help=f"samples integrated together per rank (default: 1 for a diffusers pipeline's "
        f"model, else {SAMPLE_BATCH})",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="model dtype (default: bfloat16 on a GPU, float32 on the CPU)",
    )
    parser.add_argument(
        "--tensor-parallel", type=int, help="teacher layout under torchrun (default 1)"
    )
    parser.add_argument(
        "--pipeline-parallel", type=int, help="teacher layout under torchrun (default 1)"
    )
    parser.add_argument(
        "--context-parallel", type=int, help="teacher layout under torchrun (default 1)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--overwrite", action="store_true", help="replace samples already in --out")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be >= 2 (the evaluation measures diversity over seed pairs)")
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be >= 1")
    layout_flags = (args.tensor_parallel, args.pipeline_parallel, args.context_parallel)
    if args.latent_shape and not args.checkpoint:
        parser.error("--latent-shape picks one of a run's trained shapes: use it with --checkpoint")
    if args.checkpoint and layout_flags != (None, None, None):
        parser.error("--checkpoint runs in the run's own layout (its config.yaml)")
    done = (args.out / "samples.npz").exists() or (args.out / "grid.png").exists()
    if done and not args.overwrite:
        parser.error(f"{args.out} already holds samples; pass --overwrite or choose another --out")
    if args.checkpoint and (args.steps, args.guidance, args.shift) != (None, None, None):
        parser.error(
            "--steps, --guidance and --shift are the teacher's; the generator runs the "
            "steps it was distilled for"
        )
    start = time.perf_counter()
    try:
        if args.checkpoint:
            layout = run_layout(args.checkpoint)
            require_run_world(args.checkpoint, layout)
            runtime = Runtime.start(**layout, dtype=args.dtype)
            source = generator_source(args.checkpoint, runtime, args.latent_shape)
        else:
            layout = [flag or 1 for flag in layout_flags]
            runtime = Runtime.start(*layout, dtype=args.dtype)
            source = teacher_source(args.teacher, args.steps, args.guidance, args.shift, runtime)
        batch = args.batch or (1 if source.pipeline is not None else SAMPLE_BATCH)
        progress = not args.no_progress and dist.get_rank() == 0
        samples = generate(source, args.seeds, progress, runtime.device, batch)
        if dist.get_rank() == 0:
            if source.pipeline is not None:
                path = write_decoded(args.out, source, samples, runtime, batch)
            else:
                path = write_samples(args.out, source, samples)
    except ConfigError as error:
        parser.error(str(error))
    if dist.get_rank() == 0:
        print(
            f"sampled {len(source.conditions)} conditions x {args.seeds} seeds ({source.name}) "
            f"in {time.perf_counter() - start:.1f} s\nwrote {path.parent}: "
            + ", ".join(sorted(entry.name for entry in path.parent.iterdir()))
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

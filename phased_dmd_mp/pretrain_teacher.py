"""Train an embedded teacher: a tiny Wan DiT on scikit-learn's digits (still or moving) or on a 2D
Gaussian mixture.

    python -m phased_dmd_mp.pretrain_teacher --out DIR [--config FILE] [--set key=value ...]
                                             [--overwrite]

`dataset: digits` (the default): flow matching (Eq. 4) on the 1797 digits as [1, 1, 8, 8]
latents, conditioned on a frozen class embedding (data/digits.py). `dataset: mixture`
(configs/mixture_teacher.yaml): points of a many-mode Gaussian mixture as one-token [2, 1, 1, 1]
latents, unconditional (one condition; data/mixture.py), sampled without guidance, so that a
distilled generator's mode coverage and per-mode mass can be measured exactly; Eq. 4's target
eps - x_0 is replaced by its expectation given x_t, the mixture's exact velocity (same minimiser,
no variance), so the final loss is the squared error to it. `dataset: moving_digits`
(configs/moving_digits_teacher.yaml): class-conditioned videos [1, 5, 16, 16] of a digit crossing
the frame at a random velocity, drawn afresh for every batch (data/moving_digits.py), the
embedded video teacher whose motion a distilled student may lose. Every way the condition is dropped
to the null condition for a fraction of each batch (classifier-free guidance needs it); AdamW
with warm-up and cosine decay; an exponential moving average of the weights is the teacher. DIR
is a teacher directory (data/teacher.py):

    transformer/    the EMA weights in diffusers format     conditions/   the condition set
    real_data/      real latents (data/real_data.py): the digits with their classes, or
                    MIXTURE_REAL_POINTS seeded mixture points, for the real-data levers
    teacher.yaml    latent shape, shift, steps, guidance     config.yaml   this run's TeacherConfig
                    (and the mixture, for points)
    samples.npz     teacher samples (eval format), every condition x eval_seeds
    samples.png     digits: rows classes 0-9, columns seeds; mixture: a scatter over the modes;
                    moving digits: rows classes, columns the frames of seed 0
    metrics.json    final loss, times, and the samples measured with phased_dmd_mp.eval: against
                    the real digits (class accuracy by the digits classifier, Frechet distance,
                    precision/recall, diversity), or against the mixture (mode coverage, mass
                    error per mode, on-mode fraction, and the same Frechet distance, precision/
                    recall and diversity on the points themselves), or for moving digits the
                    optical flow and diversity of the samples and of as many data videos
    data_samples.npz  moving digits only: those data videos (eval format), the reference

DIR appears whole (it is assembled next to it and renamed into place).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from tqdm import tqdm

from phased_dmd_mp.conditioning import Conditions, dit_velocity
from phased_dmd_mp.config import ConfigError, add_config_arguments, load_config
from phased_dmd_mp.data import mixture as mixture_data
from phased_dmd_mp.data import moving_digits
from phased_dmd_mp.data.condition_writer import staging_dir
from phased_dmd_mp.data.conditions import ConditionSampler, ConditionSet
from phased_dmd_mp.data.real_data import REAL_DATA_DIR, write_latent_set
from phased_dmd_mp.data.digits import (
    LATENT_SHAPE,
    VALUE_RANGE,
    load_digits_latents,
    write_digits_condition_set,
)
from phased_dmd_mp.data.teacher import (
    CONDITIONS_DIR,
    TRANSFORMER_DIR,
    TeacherSpec,
    write_spec,
)
from phased_dmd_mp.eval.digits import NUM_CLASSES, DigitsExtractor, load_digits_images
from phased_dmd_mp.eval.extractors import PointFeatures
from phased_dmd_mp.eval.mixture import Mixture
from phased_dmd_mp.eval.motion import DISFlow
from phased_dmd_mp.eval.video_metrics import evaluate_videos
from phased_dmd_mp.eval.videos import open_video_npz
from phased_dmd_mp.eval.samples import SampleFile, load_sample_file
from phased_dmd_mp.evaluate import EvalConfig, evaluate_run, extract
from phased_dmd_mp.losses import flow_matching_loss
from phased_dmd_mp.models import ExecutionConfig, WanConfig, build
from phased_dmd_mp.models.convert import ours_to_diffusers, write_diffusers_dir
from phased_dmd_mp.models.dit import DiTStage
from phased_dmd_mp.sample import Source, generate, guided_velocity, write_samples
from phased_dmd_mp.schedule import FLOW_MATCHING, sample_timesteps, timestep_table

DATA_VIDEOS = "data_samples.npz"  # moving-digits teachers: data videos, the reference


@dataclass(frozen=True)
class TeacherConfig:
    # --- data ---
    # What the teacher learns: the digits (class-conditioned images), a Gaussian mixture
    # (unconditional 2D points; the mixture_* keys below) or moving digits (class-conditioned
    # videos of a digit crossing a 16x16 frame at a random velocity, data/moving_digits.py).
    dataset: Literal["digits", "mixture", "moving_digits"] = "digits"
    mixture_side: int = 5  # modes on a side x side grid, equal weights
    mixture_spacing: float = 1.0  # between neighbouring means (5, 1.0: {-2, -1, 0, 1, 2}^2)
    mixture_std: float = 0.05  # of every mode
    # --- the DiT (Wan architecture; 16 tokens per digit, one per point, 16 per video frame) ---
    num_layers: int = 4  # transformer blocks
    num_attention_heads: int = 4  # heads per attention layer
    attention_head_dim: int = 32  # width of each head (even); hidden = heads x head width
    ffn_dim: int = 512  # hidden width of each block's MLP
    freq_dim: int = 256  # sinusoidal timestep features (Wan's value)
    text_dim: int = 32  # width of the class embeddings
    # --- training ---
    train_steps: int = 1000  # optimizer steps
    batch_size: int = 128  # samples per step
    lr: float = 1e-3  # peak; linear warm-up, then cosine decay to 0
    warmup_steps: int = 100  # steps of the linear warm-up
    weight_decay: float = 0.01  # AdamW's weight decay
    ema_decay: float = 0.999  # ramped up as min(ema_decay, (1 + step) / (10 + step))
    condition_dropout: float = 0.1  # fraction trained on the null condition, for CFG
    shift: float = 1.0  # timestep shift of training draws and of the sampling schedule
    # --- sampling and evaluation of the teacher ---
    sampling_steps: int = 40  # written to teacher.yaml: the teacher's sampling steps
    guidance_scale: float = 1.5  # uncond + scale (cond - uncond)
    eval_seeds: int = 50  # samples per class for the metrics (the grid shows the first 8)
    seed: int = 0  # of the initial weights, batches and noise

    def __post_init__(self):
        if self.mixture_side < 1:
            raise ValueError(f"mixture_side must be >= 1, got {self.mixture_side}")
        for name in ("mixture_spacing", "mixture_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("num_layers", "num_attention_heads", "ffn_dim", "freq_dim", "text_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attention_head_dim < 2 or self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim must be even, got {self.attention_head_dim}")
        for name in ("train_steps", "batch_size", "sampling_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps <= self.train_steps:
            raise ValueError(f"warmup_steps must be in [0, train_steps], got {self.warmup_steps}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0 and weight_decay >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 < self.condition_dropout < 1:
            raise ValueError(
                f"condition_dropout must be in (0, 1) (CFG needs both conditions), got "
                f"{self.condition_dropout}"
            )
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if not self.guidance_scale >= 1:
            raise ValueError(f"guidance_scale must be >= 1, got {self.guidance_scale}")
        if self.dataset == "mixture" and self.guidance_scale != 1:
            raise ValueError(
                f"guidance_scale must be 1 for dataset: mixture (it is unconditional: guidance "
                f"would only distort the mixture), got {self.guidance_scale}"
            )
        if self.eval_seeds < 4:
            raise ValueError(
                f"eval_seeds must be >= 4 (precision/recall's k = 3), got {self.eval_seeds}"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return {
            "digits": LATENT_SHAPE,
            "mixture": mixture_data.LATENT_SHAPE,
            "moving_digits": moving_digits.LATENT_SHAPE,
        }[self.dataset]

    def mixture(self) -> Mixture:
        return mixture_data.grid_mixture(self.mixture_side, self.mixture_spacing, self.mixture_std)

    def arch(self) -> WanConfig:
        return WanConfig(
            patch_size={
                "digits": (1, 2, 2),
                "mixture": (1, 1, 1),
                "moving_digits": moving_digits.PATCH_SIZE,
            }[self.dataset],
            num_attention_heads=self.num_attention_heads,
            attention_head_dim=self.attention_head_dim,
            in_channels=self.latent_shape[0],
            out_channels=self.latent_shape[0],
            text_dim=self.text_dim,
            freq_dim=self.freq_dim,
            ffn_dim=self.ffn_dim,
            num_layers=self.num_layers,
        )

    def value_range(self) -> tuple[float, float]:
        """Of the data: the digits' pixel range, the mixture's means +- 3 std."""
        if self.dataset != "mixture":
            return VALUE_RANGE
        extent = (self.mixture_side - 1) / 2 * self.mixture_spacing + 3 * self.mixture_std
        return (-extent, extent)

    def spec(self) -> TeacherSpec:
        mixture = {} if self.dataset != "mixture" else TeacherSpec.mixture_fields(self.mixture())
        return TeacherSpec(
            latent_shape=self.latent_shape,
            shift=self.shift,
            guidance_scale=self.guidance_scale,
            sampling_steps=self.sampling_steps,
            value_range=self.value_range(),
            **mixture,
        )


def _learning_rate_factor(config: TeacherConfig, step: int) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.train_steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def training_data(config: TeacherConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents [N, *latent_shape] and their condition indices [N]: the digits with their classes,
    or train_steps x batch_size seeded mixture points (fresh ones every step), all condition 0.
    For moving digits, the still digits [N, 1, 1, 8, 8]: `train` sets each in motion afresh."""
    if config.dataset != "mixture":
        return load_digits_latents()
    points = config.mixture().sample(config.train_steps * config.batch_size, config.seed)
    return mixture_data.points_to_latents(points), torch.zeros(len(points), dtype=torch.long)


MIXTURE_REAL_POINTS = 4096  # real samples of a mixture teacher's real_data/


def real_samples(config: TeacherConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The real data written to real_data/: latents [N, *latent_shape] and their condition items:
    every digit with its class (for moving digits, each set in motion once, a seed apart from
    the training draws), or MIXTURE_REAL_POINTS mixture points, all condition 0."""
    if config.dataset == "digits":
        return load_digits_latents()
    if config.dataset == "moving_digits":
        digits, labels = load_digits_latents()
        motion = torch.Generator().manual_seed(config.seed + 1)
        return moving_digits.moving_digits(digits[:, :, 0], motion), labels
    points = config.mixture().sample(MIXTURE_REAL_POINTS, config.seed + 1)
    return mixture_data.points_to_latents(points), torch.zeros(len(points), dtype=torch.long)


def write_conditions(config: TeacherConfig, path: Path) -> ConditionSet:
    """The teacher directory's condition set: one item per digit class, or the mixture's one."""
    if config.dataset != "mixture":
        return write_digits_condition_set(path, config.text_dim, config.seed)
    return mixture_data.write_mixture_condition_set(path, config.text_dim, config.seed)


def _drop_conditions(cond: Conditions, uncond: Conditions, drop: torch.Tensor) -> Conditions:
    """The text of `cond`, replaced by the null condition where `drop` [B] is set."""
    return Conditions(text=torch.where(drop[:, None, None], uncond.text, cond.text))


def train(
    config: TeacherConfig, conditions: ConditionSet, progress: bool = True
) -> tuple[DiTStage, dict]:
    """Train on the config's dataset; returns the EMA model (the teacher, eval mode) and
    statistics."""
    torch.manual_seed(config.seed)  # initial weights
    generator = torch.Generator().manual_seed(config.seed)
    latents, labels = training_data(config)
    mixture = config.mixture() if config.dataset == "mixture" else None
    arch = config.arch()
    model = build(arch, ExecutionConfig())
    teacher = build(arch, ExecutionConfig(), init_weights=False)
    teacher.load_state_dict(model.state_dict())
    teacher.eval().requires_grad_(False)
    params, ema_params = list(model.parameters()), list(teacher.parameters())
    velocity = dit_velocity(model, arch)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _learning_rate_factor(config, step)
    )
    # Every digit (point) once per epoch, in a seeded order (the sampler the distillation uses).
    sampler = ConditionSampler(len(latents), config.batch_size, config.seed)
    uncond = conditions.uncond(config.batch_size)
    start, recent = time.perf_counter(), []
    bar = tqdm(range(config.train_steps), desc="train teacher", disable=not progress, mininterval=1)
    for step in bar:
        indices = next(sampler)
        x0 = latents[indices]
        if config.dataset == "moving_digits":  # every draw moves at a new velocity
            x0 = moving_digits.moving_digits(x0[:, :, 0], generator)
        drop = torch.rand(len(indices), generator=generator) < config.condition_dropout
        cond = _drop_conditions(conditions.batch(labels[indices]), uncond, drop)
        eps = torch.randn(x0.shape, generator=generator)
        t = sample_timesteps(len(x0), 0.0, 1.0, config.shift, generator=generator)
        x_t = FLOW_MATCHING.add_noise(x0, eps, t)
        if mixture is not None:  # the exact target: the same minimiser, without its variance
            x0, eps = mixture_data.posterior_means(mixture, x_t, t)
        loss = flow_matching_loss(velocity(x_t, t, cond), x0, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        recent = (recent + [loss.item()])[-100:]
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
    stats = {
        "steps": config.train_steps,
        "seconds": time.perf_counter() - start,
        "final_loss": sum(recent) / len(recent),  # mean of the last 100 steps
        "parameters": sum(p.numel() for p in params),
    }
    return teacher, stats


@torch.no_grad()
def class_accuracy(extractor: DigitsExtractor, images: torch.Tensor) -> list[float]:
    """Per class c: the fraction of images[c] [seeds, 1, 8, 8] the digits classifier calls c."""
    predicted = extractor.model(images.flatten(0, 1)).argmax(dim=1).view(images.shape[:2])
    return (predicted == torch.arange(len(images))[:, None]).float().mean(dim=1).tolist()


def write_data_videos(path: Path, seeds: int, seed: int) -> Path:
    """Moving digits from the data as a sample file of videos (eval/videos.py), `seeds` per
    class: real videos to hold the teacher's motion and diversity against."""
    images, labels = load_digits_images()
    generator = torch.Generator().manual_seed(seed)
    videos = []
    for label in range(NUM_CLASSES):
        members = torch.nonzero(labels == label)[:, 0]
        chosen = members[torch.randint(len(members), (seeds,), generator=generator)]
        videos.append(moving_digits.moving_digits(images[chosen], generator))
    np.savez(
        path,
        samples=torch.stack(videos).numpy(),
        model=np.str_("data: moving digits"),
        labels=np.arange(NUM_CLASSES),
    )
    return path


def measure_videos(samples_path: Path, config: TeacherConfig, progress: bool) -> dict:
    """Optical flow and diversity (digits network on the frames) of the teacher's videos and of
    as many data videos (DATA_VIDEOS in the teacher directory), as `evaluate` measures them."""
    extractor = DigitsExtractor.load(progress=progress)
    data_path = write_data_videos(samples_path.parent / DATA_VIDEOS, config.eval_seeds, config.seed)
    measured = {}
    for name, path in (("samples", samples_path), ("data", data_path)):
        videos = open_video_npz(path)
        run, _ = evaluate_videos(
            videos, DISFlow(), None, extractor, extractor, videos.frames, config.seed, False
        )
        measured[name] = run["metrics"]
    return {
        **measured["samples"],
        "data": measured["data"],
        "samples": config.eval_seeds * NUM_CLASSES,
        "reference": f"{DATA_VIDEOS}: as many moving digits from the data; optical flow: "
        "OpenCV DIS, pixels per frame; diversity: the digits network on every frame",
    }


def measure(samples_path: Path, config: TeacherConfig, progress: bool) -> dict:
    """The teacher's samples against the real digits or the mixture (the file says which)."""
    if config.dataset == "moving_digits":
        return measure_videos(samples_path, config, progress)
    file = load_sample_file(samples_path)
    if file.kind == "points":
        return measure_points(file)
    return measure_digits(file, progress)


def measure_points(file: SampleFile) -> dict:
    """Point samples against their mixture, as `python -m phased_dmd_mp.evaluate` measures them."""
    config, points = EvalConfig(), PointFeatures()
    real = points.features(file.mixture.sample(config.mixture_reference_samples, config.seed))
    run = evaluate_run(file, points, points, real, config, progress=False)
    return {
        **run["metrics"],
        "mode_fractions": run["mode_fractions"],
        "samples": file.conditions * file.seeds,
        "reference": f"the mixture ({len(real)} draws); precision and recall use equally many; "
        f"a sample counts for a mode within {config.coverage_radius:g} std of its mean",
    }


def measure_digits(file: SampleFile, progress: bool) -> dict:
    """Digit samples against the real digits, with the evaluation library."""
    extractor = DigitsExtractor.load(progress=progress)
    real_features = extract(extractor, load_digits_images()[0], False, "real features")
    run = evaluate_run(file, extractor, extractor, real_features, EvalConfig(), progress=False)
    per_class = class_accuracy(extractor, file.samples)
    return {
        "class_accuracy": sum(per_class) / len(per_class),
        **run["metrics"],
        "per_class_accuracy": per_class,
        "samples": file.conditions * file.seeds,
        "reference": "scikit-learn digits (1797 images); FD, precision and recall use equally "
        "many real images",
        "classifier_test_accuracy": extractor.test_accuracy,
    }


def run(config: TeacherConfig, out_dir: Path, progress: bool = True) -> tuple[DiTStage, dict]:
    """Train, write the teacher directory at out_dir (atomically); return the teacher (the EMA
    model, in eval mode) and its metrics."""
    staging = staging_dir(out_dir)
    try:
        teacher, metrics = _build(config, staging, progress)
        if out_dir.exists():  # replaced only now, when the new directory is complete
            replaced = staging.with_name(staging.name + ".replaced")
            out_dir.rename(replaced)
            staging.rename(out_dir)
            if replaced.is_dir():
                shutil.rmtree(replaced)
            else:
                replaced.unlink()
        else:
            staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return teacher, metrics


def _build(config: TeacherConfig, out_dir: Path, progress: bool) -> tuple[DiTStage, dict]:
    start = time.perf_counter()
    conditions = write_conditions(config, out_dir / CONDITIONS_DIR)
    write_latent_set(out_dir / REAL_DATA_DIR, *real_samples(config))
    teacher, training = train(config, conditions, progress)
    arch = teacher.arch
    write_diffusers_dir(
        out_dir / TRANSFORMER_DIR, arch, ours_to_diffusers(teacher.state_dict(), arch)
    )
    spec = config.spec()
    write_spec(out_dir, spec)
    (out_dir / "config.yaml").write_text(
        yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
    )

    sampling_start = time.perf_counter()
    source = Source(
        name=f"teacher {config.sampling_steps} steps, CFG {config.guidance_scale:g}",
        velocity=guided_velocity(
            dit_velocity(teacher, arch), conditions, config.guidance_scale, "cpu"
        ),
        timesteps=timestep_table(config.sampling_steps, config.shift),
        conditions=conditions,
        latent_shape=spec.latent_shape,
        value_range=spec.value_range,
        mixture=spec.mixture(),
    )
    samples = generate(source, config.eval_seeds, progress)
    samples_path = write_samples(out_dir, source, samples, grid_name="samples.png")
    sampling = {
        "seconds": time.perf_counter() - sampling_start,
        "steps": config.sampling_steps,
        "guidance_scale": config.guidance_scale,
        "shift": config.shift,
    }
    metrics = {
        **measure(samples_path, config, progress),
        "training": training,
        "sampling": sampling,
        "seconds": time.perf_counter() - start,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return teacher, metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phased_dmd_mp.pretrain_teacher", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="teacher directory to write")
    add_config_arguments(parser, TeacherConfig, "train_steps=500")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        config = load_config(TeacherConfig, args.config, args.overrides)
    except ConfigError as error:
        parser.error(str(error))
    empty_dir = args.out.is_dir() and not any(args.out.iterdir())
    if args.out.exists() and not empty_dir and not args.overwrite:
        parser.error(f"{args.out} already exists; pass --overwrite or choose another --out")
    _, metrics = run(config, args.out)
    print(
        f"teacher trained in {metrics['training']['seconds']:.0f} s (final loss "
        f"{metrics['training']['final_loss']:.4f}); its samples ({config.sampling_steps} steps, "
        f"CFG {config.guidance_scale:g}): {_quality(metrics)}\n"
        f"wrote {args.out} in {metrics['seconds']:.0f} s"
    )
    return 0


def _quality(metrics: dict) -> str:
    """The headline metrics, for the command line."""
    if "optical_flow" in metrics:
        data = metrics["data"]
        return (
            f"optical flow {metrics['optical_flow']:.3f} px/frame (data "
            f"{data['optical_flow']:.3f}), "
            f"perceptual diversity {metrics['perceptual_distance']:.3f} (data "
            f"{data['perceptual_distance']:.3f})"
        )
    if "mode_coverage" in metrics:
        return (
            f"mode coverage {metrics['mode_coverage']:.1%}, mass error mean "
            f"{metrics['mass_error_mean']:.4f} (max {metrics['mass_error_max']:.4f}), on-mode "
            f"{metrics['on_mode_fraction']:.1%}, FD {metrics['frechet_distance']:.4f}"
        )
    return (
        f"class accuracy {metrics['class_accuracy']:.1%}, FD {metrics['frechet_distance']:.2f}, "
        f"precision {metrics['precision']:.2f}, recall {metrics['recall']:.2f}, perceptual "
        f"diversity {metrics['perceptual_distance']:.3f}"
    )


if __name__ == "__main__":
    sys.exit(main())

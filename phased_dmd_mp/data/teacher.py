"""A teacher directory: the frozen model, its conditions and how to sample it, in one place.

    transformer/    the DiT in diffusers format (config.json + diffusion_pytorch_model.safetensors,
                    what `WanTransformer3DModel.from_pretrained` reads), so the embedded default
                    and a downloaded Wan checkpoint load the same way
    conditions/     the condition set the distillation draws from (data/conditions.py)
    teacher.yaml    TeacherSpec: latent shape, schedule shift, default steps and guidance, the
                    diffusers pipeline folder the teacher came from (if any), and for a Gaussian
                    mixture teacher (data/mixture.py) the mixture its samples, the flattened
                    latents, should follow

`python -m phased_dmd_mp.pretrain_teacher` writes one for the embedded default; for a released
model, put its transformer folder, a precomputed condition set and a teacher.yaml side by side.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import yaml
from megatron.core.process_groups_config import ProcessGroupCollection

from phased_dmd_mp.config import ConfigError, load_config
from phased_dmd_mp.data.conditions import ConditionSet
from phased_dmd_mp.eval.mixture import Mixture
from phased_dmd_mp.models import ExecutionConfig, build, load_whole_state_dict
from phased_dmd_mp.models.convert import diffusers_to_ours, read_diffusers_dir
from phased_dmd_mp.models.dit import DiTStage

SPEC_FILE = "teacher.yaml"
TRANSFORMER_DIR = "transformer"
CONDITIONS_DIR = "conditions"


@dataclass(frozen=True)
class TeacherSpec:
    """What the runner and the sampler need to know about a teacher besides its weights."""

    latent_shape: tuple[int, int, int, int]  # channels, frames, height, width
    shift: float  # timestep shift of its sampling schedule (Wan 3-5, Qwen-Image 3)
    guidance_scale: float  # CFG: uncond + scale (cond - uncond); 1 = no guidance
    sampling_steps: int = 40
    value_range: tuple[float, float] = (-1.0, 1.0)  # of the data (pixels or latents)
    # The diffusers pipeline folder (model_index.json) the teacher's transformer came from,
    # relative to the teacher directory or absolute: its VAE decodes samples to pixels and the
    # export writes the student's pipeline from it (distill/diffusers_pipeline.py).
    pipeline: str | None = None
    # Point teachers only: the Gaussian mixture (means [modes, D], weights, shared std) that the
    # samples, latents flattened to D = C * F * H * W values, should follow. With it the sampler
    # writes points and the evaluation measures modes; image and video teachers leave it out.
    mixture_means: tuple[tuple[float, ...], ...] | None = None
    mixture_weights: tuple[float, ...] | None = None
    mixture_std: float | None = None

    def __post_init__(self):
        if any(d < 1 for d in self.latent_shape):
            raise ValueError(f"latent_shape must be positive, got {list(self.latent_shape)}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if not self.guidance_scale >= 1:
            raise ValueError(f"guidance_scale must be >= 1, got {self.guidance_scale}")
        if self.sampling_steps < 1:
            raise ValueError(f"sampling_steps must be >= 1, got {self.sampling_steps}")
        if not self.value_range[0] < self.value_range[1]:
            raise ValueError(f"value_range must be [low, high], got {list(self.value_range)}")
        given = [self.mixture_means, self.mixture_weights, self.mixture_std]
        if any(value is None for value in given) and any(value is not None for value in given):
            raise ValueError("give all of mixture_means, mixture_weights, mixture_std or none")
        mixture = self.mixture()  # validates it
        dims = math.prod(self.latent_shape)
        if mixture is not None and mixture.means.shape[1] != dims:
            raise ValueError(
                f"mixture_means has {mixture.means.shape[1]} dims, but the points are latents "
                f"{list(self.latent_shape)} flattened ({dims} values)"
            )

    def mixture(self) -> Mixture | None:
        """The mixture a point teacher's samples follow; None for images and video."""
        if self.mixture_means is None:
            return None
        return Mixture.from_values(self.mixture_means, self.mixture_weights, self.mixture_std)

    @staticmethod
    def mixture_fields(mixture: Mixture) -> dict:
        """The TeacherSpec keyword arguments describing `mixture`."""
        return {
            "mixture_means": tuple(tuple(mean) for mean in mixture.means.tolist()),
            "mixture_weights": tuple(mixture.weights.tolist()),
            "mixture_std": mixture.std,
        }


def _plain(value):
    """Tuples (nested too) as lists, which YAML writes without Python tags."""
    return [_plain(item) for item in value] if isinstance(value, tuple) else value


def write_spec(teacher_dir: str | Path, spec: TeacherSpec) -> None:
    values = {  # unset optional keys (an image teacher's mixture) are left out
        key: _plain(value) for key, value in dataclasses.asdict(spec).items() if value is not None
    }
    (Path(teacher_dir) / SPEC_FILE).write_text(yaml.safe_dump(values, sort_keys=False))


def read_spec(teacher_dir: str | Path) -> TeacherSpec:
    teacher_dir = Path(teacher_dir)
    if not teacher_dir.is_dir():
        raise ConfigError(f"teacher directory {teacher_dir} does not exist")
    path = teacher_dir / SPEC_FILE
    if not path.is_file():
        raise ConfigError(
            f"{teacher_dir} has no {SPEC_FILE}: not a teacher directory (write one with "
            "python -m phased_dmd_mp.pretrain_teacher)"
        )
    return load_config(TeacherSpec, path)


def pipeline_dir(teacher_dir: str | Path, spec: TeacherSpec) -> Path | None:
    """The teacher's diffusers pipeline folder (None for teachers without one, e.g. the digits)."""
    if spec.pipeline is None:
        return None
    path = Path(teacher_dir) / spec.pipeline  # an absolute `pipeline` replaces teacher_dir
    if not (path / "model_index.json").is_file():
        raise ConfigError(
            f"{Path(teacher_dir) / SPEC_FILE}: pipeline {spec.pipeline} is not a diffusers "
            f"pipeline folder ({path / 'model_index.json'} is missing)"
        )
    return path


def read_conditions(teacher_dir: str | Path) -> ConditionSet:
    return ConditionSet(Path(teacher_dir) / CONDITIONS_DIR)


def load_transformer(
    teacher_dir: str | Path,
    execution: ExecutionConfig | None = None,
    pg_collection: ProcessGroupCollection | None = None,
) -> DiTStage:
    """The teacher's DiT (this rank's shard under TP/PP), in train mode with gradients on, as
    `build` returns models: the runner also starts its fake score from these weights."""
    return load_diffusers_transformer(Path(teacher_dir) / TRANSFORMER_DIR, execution, pg_collection)


def load_diffusers_transformer(
    directory: str | Path,
    execution: ExecutionConfig | None = None,
    pg_collection: ProcessGroupCollection | None = None,
) -> DiTStage:
    """Our DiT (this rank's shard) holding the weights of a diffusers transformer folder."""
    _, arch, state_dict = read_diffusers_dir(directory)
    model = build(arch, execution, pg_collection, init_weights=False)
    load_whole_state_dict(model, diffusers_to_ours(state_dict, arch))
    return model

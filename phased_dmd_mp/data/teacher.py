"""A teacher directory: the frozen model, its conditions and how to sample it, in one place.

    transformer/    the DiT in diffusers format (config.json + diffusion_pytorch_model.safetensors,
                    what `WanTransformer3DModel.from_pretrained` reads), so the embedded default
                    and a downloaded Wan checkpoint load the same way; optional when
                    teacher.yaml names the transformer folder instead (`transformer:`)
    conditions/     the condition set the distillation draws from (data/conditions.py)
    teacher.yaml    TeacherSpec: latent shape, schedule shift, default steps and guidance, and
                    for a Gaussian mixture teacher (data/mixture.py) the mixture its samples, the
                    flattened latents, should follow; for a teacher made from a diffusers
                    pipeline folder also `pipeline` (its VAE decodes previews), `transformer`
                    and for Wan2.2 `transformer_2` + `boundary_ratio` (the low-noise expert and
                    where it takes over), referring to that folder instead of copying it

`python -m phased_dmd_mp.pretrain_teacher` writes one for the embedded default;
`python -m phased_dmd_mp.prepare` writes one from a diffusers pipeline folder and a prompt file.
Relative paths in teacher.yaml are relative to the teacher directory.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from megatron.core.process_groups_config import ProcessGroupCollection

from phased_dmd_mp import atomic
from phased_dmd_mp.config import ConfigError, load_config
from phased_dmd_mp.data.conditions import ConditionSet, open_conditions
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

    latent_shape: tuple[int, int, int, int]  # of one sample: channels, frames, height, width
    shift: float  # timestep shift of its sampling schedule (Wan 3-5, Qwen-Image 3)
    guidance_scale: float  # CFG: uncond + scale (cond - uncond); 1 = no guidance
    sampling_steps: int = 40  # the teacher's sampling steps (sample --teacher's default)
    value_range: tuple[float, float] = (-1.0, 1.0)  # of the data (pixels or latents)
    # The diffusers pipeline folder (model_index.json) the teacher's transformer came from,
    # relative to the teacher directory or absolute: its VAE decodes samples to pixels and the
    # export writes the student's pipeline from it (distill/diffusers_pipeline.py).
    pipeline: str | None = None
    # --- point teachers only ---
    # The Gaussian mixture the samples (latents flattened to D = C * F * H * W values) should
    # follow: means [modes, D]. With it the sampler writes points and the evaluation measures
    # modes; image and video teachers leave the mixture_* keys out.
    mixture_means: tuple[tuple[float, ...], ...] | None = None
    mixture_weights: tuple[float, ...] | None = None  # one per mode, summing to 1
    mixture_std: float | None = None  # of every mode
    # --- teachers made by prepare from a diffusers pipeline folder ---
    # The transformer folder, relative to the teacher directory or absolute; default:
    # <teacher>/transformer.
    transformer: str | None = None
    transformer_2: str | None = None  # Wan2.2's low-noise expert folder (same rules)
    # Wan2.2's switch: transformer_2 scores t < boundary_ratio (t in [0, 1] = timestep / 1000)
    boundary_ratio: float | None = None

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
        if (self.transformer_2 is None) != (self.boundary_ratio is None):
            raise ValueError("transformer_2 and boundary_ratio go together (a two-expert teacher)")
        if self.boundary_ratio is not None and not 0.0 < self.boundary_ratio < 1.0:
            raise ValueError(f"boundary_ratio must be in (0, 1), got {self.boundary_ratio}")
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
    atomic.write_yaml(Path(teacher_dir) / SPEC_FILE, values)


def read_spec(teacher_dir: str | Path) -> TeacherSpec:
    teacher_dir = Path(teacher_dir)
    if not teacher_dir.is_dir():
        raise ConfigError(f"teacher directory {teacher_dir} does not exist")
    path = teacher_dir / SPEC_FILE
    if not path.is_file() and (teacher_dir / "model_index.json").is_file():
        raise ConfigError(
            f"{teacher_dir} is a diffusers pipeline folder, not a teacher directory: make one "
            f"from it with python -m phased_dmd_mp.prepare --pipeline {teacher_dir} "
            "--prompts PROMPTS.txt --out TEACHER_DIR"
        )
    if not path.is_file():
        raise ConfigError(
            f"{teacher_dir} has no {SPEC_FILE}: not a teacher directory (write one with "
            "python -m phased_dmd_mp.prepare from a diffusers pipeline, or "
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
    """The teacher directory's condition set (an OnlineConditionSet for `prepare --online`)."""
    return open_conditions(Path(teacher_dir) / CONDITIONS_DIR)


def transformer_dirs(teacher_dir: str | Path, spec: TeacherSpec) -> tuple[Path, Path | None]:
    """(the teacher's transformer folder, Wan2.2's low-noise expert folder or None)."""
    teacher_dir = Path(teacher_dir)  # an absolute path in teacher.yaml replaces it
    high = teacher_dir / (spec.transformer or TRANSFORMER_DIR)
    low = None if spec.transformer_2 is None else teacher_dir / spec.transformer_2
    return high, low


def student_transformer(path: str | Path) -> Path:
    """The transformer folder of the runner's `student`: the folder itself, or a diffusers
    pipeline folder's transformer/ (validate.py checks what it holds)."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path / TRANSFORMER_DIR
    return path


def teacher_experts(
    teacher_dir: str | Path,
    spec: TeacherSpec,
    low_noise: str | None = None,
    boundary: float | None = None,
) -> tuple[Path, Path | None, float | None]:
    """(transformer folder, low-noise expert folder or None, t where it takes over or None):
    teacher.yaml's, each overridable (the runner's teacher_low_noise / moe_boundary keys).
    Raises ConfigError for a low-noise expert without a boundary (validate.py checks the
    folders)."""
    high, spec_low = transformer_dirs(teacher_dir, spec)
    low = Path(low_noise) if low_noise is not None else spec_low
    boundary = boundary if boundary is not None else spec.boundary_ratio
    if low is not None and boundary is None:
        raise ConfigError(
            "teacher_low_noise needs moe_boundary (neither the config nor teacher.yaml's "
            "boundary_ratio sets it)"
        )
    return high, low, (boundary if low is not None else None)


def load_transformer(
    teacher_dir: str | Path,
    execution: ExecutionConfig | None = None,
    pg_collection: ProcessGroupCollection | None = None,
) -> DiTStage:
    """The teacher's DiT (this rank's shard under TP/PP), in train mode with gradients on, as
    `build` returns models: the runner also starts its fake score from these weights."""
    high, _ = transformer_dirs(teacher_dir, read_spec(teacher_dir))
    return load_diffusers_transformer(high, execution, pg_collection)


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

"""Rehearsals: every shipped recipe in configs/ runs small in the shape it ships.

The shrinking rule, in this one place (`rehearsal_overrides`): a rehearsal loads the recipe's
YAML as it is and overrides only size keys:

    teacher, teacher_low_noise, conditions   a tiny random teacher of the recipe's model family
    student                     a tiny random student smaller than that teacher (narrower heads
                                and FFN), of the recipe's student architecture
    batch_size                  2 per data-parallel rank (micro_batch_size: at most that)
    iterations_per_phase        2 generator updates in all, at least one per phase
    log_every, sample_every, checkpoint_every   1 (every iteration logs, samples, checkpoints)
    tensor_parallel, pipeline_parallel, context_parallel   1 in one process; under torchrun 2
                                where the recipe's is above 1, and data parallel is the rest of
                                2 ranks, or of TP x PP x CP where that is more (a TP=8 recipe
                                rehearses as TP=2, DP=1; a TP=8 x CP=2 one on 4 ranks; a
                                data-parallel one as DP=2); sequence_parallel stays the recipe's
    architecture, latent_shape  the tiny teacher's (its architecture.yaml: the recipe's named
                                architecture shrunk), which the run checks against the teacher
    student_architecture        the tiny student's (student_architecture.yaml), which the run
                                checks against the student

Everything else is the recipe's: algorithm, steps, phases, phase_t_ranges, shift, guidance,
normalisation, adapter and LoRA rank/alpha, fake_updates, learning rates, betas, grad_clip,
dtype (bf16), recompute, moe_boundary. So a recipe edit is rehearsed as soon as it is made.

The tiny teacher (`write_teacher`): the recipe's architecture config (RECIPES: a file of
configs/models/, or for the embedded teachers their pretrain_teacher config) with widths and
depth shrunk (`tiny_arch`) and everything that shapes the data path kept: patch size, in/out
channels (so I2V's extra image-latent channels), image cross-attention, Qwen-Image's packing.
Its heads are 2, or TP x CP of the torchrun rehearsal where that is more (heads must divide
by it). Its random weights go through our converter into the teacher directory layout
(data/teacher.py), with a condition set holding what the family needs: `text` always,
`text_mask` for Qwen-Image, `image_latents` for Wan I2V (in_channels - out_channels channels),
`image_embeds` for Wan2.1 I2V, and random real latents (real_data/, two per condition) for the
levers that need them; a two-expert teacher (Wan2.2) gets its low-noise expert in
transformer_2/, named with its boundary_ratio in teacher.yaml (as `prepare` writes Wan2.2's). Latents keep the real channel count on a 4 x 4 grid, 2 frames
for Wan video, 1 for images.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from phased_dmd_mp import pretrain_teacher
from phased_dmd_mp.config import load_config
from phased_dmd_mp.data.condition_writer import write_condition_set
from phased_dmd_mp.data.real_data import REAL_DATA_DIR, write_latent_set
from phased_dmd_mp.data.teacher import TeacherSpec, read_spec, write_spec
from phased_dmd_mp.distill.config import DistillConfig
from phased_dmd_mp.models import QwenImageConfig, WanConfig, build
from phased_dmd_mp.models.config import read_architecture
from phased_dmd_mp.models.convert import (
    diffusers_to_ours,
    ours_to_diffusers,
    read_diffusers_dir,
    write_diffusers_dir,
)
from phased_dmd_mp.models.loading import load_whole_state_dict

CONFIGS = Path(__file__).parents[1] / "configs"


@dataclass(frozen=True)
class Teacher:
    """The teacher a recipe distills: its architecture (a configs/models/ file, or for the
    embedded teachers their pretrain_teacher config, whose rehearsal then trains it) and, for
    two experts (Wan2.2), where the low-noise one takes over (teacher.yaml's boundary_ratio)."""

    model: str
    boundary_ratio: float | None = None
    student: str | None = None  # a configs/models/ file: the recipe's smaller student
    first_frame: bool = False  # Wan2.2 TI2V: image-to-video conditions (first-frame latents)


# Each distillation recipe in configs/ and its teacher.
RECIPES = {
    "digits_phased_dmd.yaml": Teacher("digits_teacher.yaml"),
    "wan2.1_t2v_14b_phased_dmd.yaml": Teacher("models/wan2.1_t2v_14b.yaml"),
    # Wan2.2-T2V-A14B's experts are each Wan2.1-T2V-14B's architecture.
    "wan2.2_t2v_a14b_phased_dmd.yaml": Teacher("models/wan2.1_t2v_14b.yaml", 0.875),
    "wan2.2_i2v_a14b_phased_dmd.yaml": Teacher("models/wan2.2_i2v_a14b.yaml", 0.9),
    "qwen_image_phased_dmd.yaml": Teacher("models/qwen_image.yaml"),
    # image-to-video, the TI2V path with more to it (first-frame latents, per-token timesteps)
    "wan2.2_ti2v_5b_phased_dmd.yaml": Teacher("models/wan2.2_ti2v_5b.yaml", first_frame=True),
    "wan2.1_t2v_1.3b_from_14b_phased_dmd.yaml": Teacher(
        "models/wan2.1_t2v_14b.yaml", student="models/wan2.1_t2v_1.3b.yaml"
    ),
}
RANK_BATCH = 2
ITERATIONS = 2
DEFAULT_PHASES = DistillConfig.num_phases
TINY_WIDTHS = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2}
TINY_TEACHER_TRAINING = [  # a pretrain_teacher config's size keys, for its rehearsal
    "num_layers=2", "num_attention_heads=2", "attention_head_dim=8", "ffn_dim=32",
    "freq_dim=16", "text_dim=8", "train_steps=2", "batch_size=16", "warmup_steps=1",
    "sampling_steps=2", "eval_seeds=4",
]  # fmt: skip
TEXT_TOKENS, IMAGE_TOKENS, ITEMS = 4, 3, 4
STUDENT_DIR = "student"  # in a recipe's tiny teacher directory: its tiny student
WEIGHT_STD = 0.3  # of the tiny teachers' weight matrices: conditions change v by ~20%


def load_recipe(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


LAYOUT_KEYS = ("tensor_parallel", "pipeline_parallel", "context_parallel")


def scaled_layout(recipe: dict, world_size: int) -> tuple[int, int, int]:
    """(tensor_parallel, pipeline_parallel, context_parallel) of the rehearsal on world_size
    ranks."""
    if world_size == 1:
        return 1, 1, 1
    return tuple(2 if recipe.get(key, 1) > 1 else 1 for key in LAYOUT_KEYS)


def rehearsal_world_size(name: str) -> int:
    """Ranks of the torchrun rehearsal: 2, or TP x PP x CP where a recipe uses several."""
    return max(2, math.prod(scaled_layout(load_recipe(name), 2)))


def tiny_heads(recipe: dict) -> int:
    """Heads of the recipe's tiny teacher: 2, or its rehearsal's TP x CP where that is more."""
    tp, _, cp = scaled_layout(recipe, 2)
    return max(2, tp * cp)


def rehearsal_overrides(name: str, teacher: Path, world_size: int = 1) -> list[str]:
    """The recipe configs/<name> shrunk by the rule of the module docstring: `--set` items."""
    return shrink(load_recipe(name), teacher, world_size)


def shrink(recipe: dict, teacher: Path, world_size: int = 1) -> list[str]:
    """The size-key overrides (module docstring) of a run whose own keys are `recipe`."""
    tp, pp, cp = scaled_layout(recipe, world_size)
    overrides = [
        f"teacher={teacher}",
        f"batch_size={RANK_BATCH * world_size // (tp * pp * cp)}",
        f"iterations_per_phase={max(1, ITERATIONS // recipe.get('num_phases', DEFAULT_PHASES))}",
        "log_every=1",
        "sample_every=1",
        "checkpoint_every=1",
        f"tensor_parallel={tp}",
        f"pipeline_parallel={pp}",
        f"context_parallel={cp}",
    ]
    if recipe.get("teacher_low_noise") is not None:
        overrides.append(f"teacher_low_noise={teacher / 'transformer_2'}")
    if recipe.get("conditions") is not None:
        overrides.append(f"conditions={teacher / 'conditions'}")
    if recipe.get("student") is not None:
        overrides.append(f"student={teacher / STUDENT_DIR}")
    if recipe.get("micro_batch_size") is not None:
        overrides.append(f"micro_batch_size={min(recipe['micro_batch_size'], RANK_BATCH)}")
    if recipe.get("architecture") is not None:  # the named architecture, shrunk (write_teacher)
        tiny = tiny_arch(read_architecture(recipe["architecture"]))
        overrides.append(f"architecture={teacher / ARCHITECTURE_FILE}")
        overrides.append(f"latent_shape={list(tiny_latent_shape(tiny))}")
    if recipe.get("student_architecture") is not None:
        overrides.append(f"student_architecture={teacher / STUDENT_ARCHITECTURE_FILE}")
    return overrides


# The official trainer's levers at its own values (LightX2V lightx2v_train's Wan2.2 A14B recipe:
# IDA 0.97/0.03, diversity loss 0.05 with its anchor after 10 of 40 teacher steps, real-data
# critic 0.1) and FastGen's GAN weight 0.03: added to a recipe's rehearsal, every lever runs in
# that recipe's shape (test_recipes.py).
LEVERS = [
    "ida_weight=0.03",
    "diversity_loss_weight=0.05",
    "diversity_teacher_steps=40",
    "diversity_anchor_steps=10",
    "real_critic_weight=0.1",
    "gan_weight=0.03",
]

# The keys `shrink` may change; test_recipes checks that a rehearsal differs from its recipe in
# these only.
SIZE_KEYS = {
    "teacher", "teacher_low_noise", "conditions", "student", "batch_size", "micro_batch_size",
    "iterations_per_phase", "log_every", "sample_every", "checkpoint_every",
    "tensor_parallel", "pipeline_parallel", "context_parallel", "architecture", "latent_shape",
    "student_architecture",
}  # fmt: skip
ARCHITECTURE_FILE = "architecture.yaml"  # the tiny teacher's architecture, as configs/models/
STUDENT_ARCHITECTURE_FILE = "student_architecture.yaml"  # the tiny student's


def rehearsal_config(name: str, teacher: Path, world_size: int = 1) -> DistillConfig:
    return load_config(
        DistillConfig, CONFIGS / name, rehearsal_overrides(name, teacher, world_size)
    )


# --- tiny teachers --------------------------------------------------------------------------


def model_config(path: str) -> WanConfig | QwenImageConfig:
    """The architecture of a configs/models/ file (Qwen-Image's are named qwen_image*)."""
    cls = QwenImageConfig if Path(path).name.startswith("qwen_image") else WanConfig
    return load_config(cls, CONFIGS / path)


def tiny_arch(arch: WanConfig | QwenImageConfig, heads: int = 2) -> WanConfig | QwenImageConfig:
    """`arch` with its widths and depth shrunk; the data path (patches, channels, image
    conditioning) unchanged. Heads (`heads` of 8 channels) and FFN stay divisible by 2 ranks,
    layers by 2 stages."""
    widths = {**TINY_WIDTHS, "num_attention_heads": heads}
    if isinstance(arch, WanConfig):
        hidden = heads * TINY_WIDTHS["attention_head_dim"]
        image = {} if arch.image_dim is None else {"image_dim": 8, "added_kv_proj_dim": hidden}
        return dataclasses.replace(arch, **widths, ffn_dim=32, text_dim=8, freq_dim=16, **image)
    return dataclasses.replace(arch, **widths, joint_attention_dim=8, axes_dims_rope=(2, 2, 4))


def tiny_student_arch(
    arch: WanConfig | QwenImageConfig, heads: int = 2
) -> WanConfig | QwenImageConfig:
    """A student smaller than `tiny_arch`'s teachers (heads of 6 against 8, FFN 16 against
    32), with the same data path: the rehearsal's small-student / larger-teacher pair."""
    return dataclasses.replace(tiny_arch(arch, heads), attention_head_dim=6, ffn_dim=16)


def tiny_latent_shape(arch: WanConfig | QwenImageConfig) -> tuple[int, int, int, int]:
    frames = 2 if isinstance(arch, WanConfig) else 1
    return (arch.out_channels, frames, 4, 4)


def tiny_conditions(
    arch: WanConfig | QwenImageConfig, latent_shape, seed: int, first_frame: bool = False
) -> tuple[dict, dict]:
    """(items, uncond) of a condition set with the fields `arch` takes; `first_frame`: Wan2.2
    TI2V image-to-video's first-frame latents (one latent frame)."""
    generator = torch.Generator().manual_seed(seed)
    width = arch.text_dim if isinstance(arch, WanConfig) else arch.joint_attention_dim
    items = {"text": torch.randn(ITEMS, TEXT_TOKENS, width, generator=generator)}
    uncond = {"text": torch.zeros(TEXT_TOKENS, width)}
    if isinstance(arch, QwenImageConfig):  # variable-length prompts
        lengths = torch.tensor([TEXT_TOKENS, 2, 3, 1])
        items["text_mask"] = (torch.arange(TEXT_TOKENS) < lengths[:, None]).long()
        uncond["text_mask"] = torch.ones(TEXT_TOKENS, dtype=torch.long)
    else:
        extra = arch.in_channels - arch.out_channels
        if extra:  # I2V: mask + first-frame latents, concatenated to x on channels
            shape = (ITEMS, extra, *latent_shape[1:])
            items["image_latents"] = torch.randn(shape, generator=generator)
        if arch.image_dim is not None:  # Wan2.1 I2V: CLIP image tokens
            shape = (ITEMS, IMAGE_TOKENS, arch.image_dim)
            items["image_embeds"] = torch.randn(shape, generator=generator)
        if first_frame:
            shape = (ITEMS, latent_shape[0], 1, *latent_shape[2:])
            items["first_frame_latents"] = torch.randn(shape, generator=generator)
    return items, uncond


def write_teacher(
    path: Path,
    arch: WanConfig | QwenImageConfig,
    boundary_ratio: float | None = None,
    seed: int = 0,
    first_frame: bool = False,
) -> Path:
    """A random-weight teacher directory of `arch` (already tiny): transformer/, conditions/,
    teacher.yaml and architecture.yaml (`arch` as a configs/models/ file, for the recipes'
    `architecture` key); with a boundary_ratio also transformer_2/, the low-noise expert, named
    in teacher.yaml as `python -m phased_dmd_mp.prepare` names Wan2.2's; with `first_frame`,
    TI2V image-to-video conditions."""
    folders = ["transformer"] if boundary_ratio is None else ["transformer", "transformer_2"]
    for k, folder in enumerate(folders):
        torch.manual_seed(seed + k)
        model = build(arch)
        with torch.no_grad():  # at megatron's init (std 0.02) a tiny model ignores its text
            for p in model.parameters():  # within bf16 precision: guidance and DMD vanish
                if p.dim() >= 2:
                    p.normal_(0.0, WEIGHT_STD)
        write_diffusers_dir(path / folder, arch, ours_to_diffusers(model.state_dict(), arch))
    write_architecture(path / ARCHITECTURE_FILE, arch)
    latent_shape = tiny_latent_shape(arch)
    items, uncond = tiny_conditions(arch, latent_shape, seed, first_frame)
    write_condition_set(path / "conditions", items, uncond)
    real = torch.randn(2 * ITEMS, *latent_shape, generator=torch.Generator().manual_seed(seed))
    write_latent_set(path / REAL_DATA_DIR, real, torch.arange(2 * ITEMS) % ITEMS)
    shift = 5.0 if isinstance(arch, WanConfig) else 3.0  # Wan's and Qwen-Image's usual shifts
    experts = {} if boundary_ratio is None else {"transformer_2": "transformer_2"}
    spec = TeacherSpec(
        latent_shape=latent_shape,
        shift=shift,
        guidance_scale=4.0,
        boundary_ratio=boundary_ratio,
        **experts,
    )
    write_spec(path, spec)
    return path


def write_architecture(path: Path, arch: WanConfig | QwenImageConfig) -> None:
    """`arch` as a configs/models/ file."""
    keys = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(arch).items()}
    path.write_text(yaml.safe_dump(keys))


def rehearse_teacher_training(name: str, out: Path) -> Path:
    """pretrain_teacher on configs/<name> with only its size keys shrunk (TINY_TEACHER_TRAINING)."""
    config = load_config(pretrain_teacher.TeacherConfig, CONFIGS / name, TINY_TEACHER_TRAINING)
    pretrain_teacher.run(config, out, progress=False)
    return out


def write_recipe_teacher(name: str, out: Path) -> Path:
    """The tiny teacher of the distillation recipe configs/<name> (RECIPES), with its tiny
    student in STUDENT_DIR when the recipe has one."""
    teacher = RECIPES[name]
    if not teacher.model.startswith("models/"):
        return rehearse_teacher_training(teacher.model, out)
    heads = tiny_heads(load_recipe(name))
    arch = tiny_arch(model_config(teacher.model), heads)
    write_teacher(out, arch, teacher.boundary_ratio, first_frame=teacher.first_frame)
    if teacher.student is not None:
        arch = tiny_student_arch(model_config(teacher.student), heads)
        torch.manual_seed(3)
        model = build(arch)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, WEIGHT_STD)
        write_diffusers_dir(out / STUDENT_DIR, arch, ours_to_diffusers(model.state_dict(), arch))
        write_architecture(out / STUDENT_ARCHITECTURE_FILE, arch)
    return out


# --- what a rehearsal checks ----------------------------------------------------------------


def shifted_timesteps(num_steps: int, shift: float) -> list[float]:
    """1 = t_0 > ... > t_N = 0: uniform steps through the shift t' = s t / (1 + (s - 1) t)."""
    uniform = [1 - i / num_steps for i in range(num_steps + 1)]
    return [shift * t / (1 + (shift - 1) * t) for t in uniform]


def check_export(run: Path, config: DistillConfig) -> dict:
    """The exported generator matches the config: its timesteps, which expert takes each step
    (phase k takes steps (k-1) N/K .. k N/K - 1), and every expert folder loads as the
    student's architecture, the teacher's without one (with LoRA, next to its adapter folder).
    Returns generator.json."""
    summary = json.loads((run / "export" / "generator.json").read_text())
    shift = config.shift or read_spec(config.teacher).shift
    expected = shifted_timesteps(config.num_steps, shift)
    assert summary["timesteps"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    per_phase = config.num_steps // config.num_phases
    assert summary["expert_of_step"] == [i // per_phase + 1 for i in range(config.num_steps)]
    assert summary["experts"] == [f"expert_{k}" for k in range(1, config.num_phases + 1)]
    assert summary["iterations"] == config.num_phases * config.iterations_per_phase
    origin = Path(config.student or Path(config.teacher) / "transformer")
    _, origin_arch, _ = read_diffusers_dir(origin)
    for name in summary["experts"]:
        _, arch, state = read_diffusers_dir(run / "export" / name)
        assert arch == origin_arch, name
        assert all(bool(torch.isfinite(v).all()) for v in state.values()), name
        load_whole_state_dict(build(arch, init_weights=False), diffusers_to_ours(state, arch))
        has_lora = (run / "export" / f"{name}_lora").is_dir()
        assert has_lora == (config.generator_adapter == "lora"), name
    return summary

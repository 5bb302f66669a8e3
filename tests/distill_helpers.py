"""A tiny teacher directory laid out like pretrain_teacher's output, for distillation tests."""

from pathlib import Path

import torch

from phased_dmd_mp.data.digits import LATENT_SHAPE, load_digits_latents, write_digits_condition_set
from phased_dmd_mp.data.real_data import REAL_DATA_DIR, write_latent_set
from phased_dmd_mp.data.teacher import TeacherSpec, write_spec
from phased_dmd_mp.models import WanConfig, build
from phased_dmd_mp.models.convert import ours_to_diffusers, write_diffusers_dir

TINY_WAN = WanConfig(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=1,
    out_channels=1,
    text_dim=8,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
)


REAL_ITEMS = 64  # real digits in the tiny teacher's real_data/


def write_tiny_teacher(path: Path, seed: int = 0, arch: WanConfig = TINY_WAN) -> Path:
    """Random-weight tiny Wan DiT + the digits condition set + REAL_ITEMS real digits + its
    TeacherSpec."""
    torch.manual_seed(seed)
    model = build(arch)
    write_diffusers_dir(path / "transformer", arch, ours_to_diffusers(model.state_dict(), arch))
    write_digits_condition_set(path / "conditions", text_dim=arch.text_dim, seed=seed)
    latents, labels = load_digits_latents()
    write_latent_set(path / REAL_DATA_DIR, latents[:REAL_ITEMS], labels[:REAL_ITEMS])
    write_spec(path, TeacherSpec(latent_shape=LATENT_SHAPE, shift=3.0, guidance_scale=2.0))
    return path


# Every algorithm at a size that runs in seconds; the multi-process tests use the same.
QUICK = [
    "batch_size=4",
    "fake_updates=1",
    "log_every=1",
    "sample_every=100",
    "iterations_per_phase=2",
]
LEVERS = [  # weights far above the recipes', so each lever's effect shows in a few updates
    "ida_weight=0.25",
    "diversity_loss_weight=0.5",
    "diversity_teacher_steps=8",
    "diversity_anchor_steps=3",
    "real_critic_weight=0.5",
    "gan_weight=0.5",
]
ALGORITHMS = {
    "phased_dmd_sgts": ["num_steps=4", "num_phases=2"],
    "phased_dmd_all": ["num_steps=4", "num_phases=2", "phase_gradient=all"],
    "dmd": ["algorithm=dmd", "num_steps=1", "num_phases=1"],
    "few_step_dmd": ["algorithm=few_step_dmd", "num_steps=2", "num_phases=1"],
    "dmd_sgts": ["algorithm=dmd_sgts", "num_steps=4", "num_phases=1"],
    # the paper's generator: LoRA experts on the shared teacher weights
    "phased_dmd_lora": [
        "num_steps=4",
        "num_phases=2",
        "generator_adapter=lora",
        "lora_rank=4",
        "lora_alpha=4",
        "ema_decay=0.5",
    ],
    # every quality lever (distill/levers.py) on the paper's generator, and on one
    # backpropagated through all steps of a phase (its adversarial term joins that backward)
    "phased_dmd_levers": ["num_steps=4", "num_phases=2", *LEVERS],
    "few_step_dmd_levers": ["algorithm=few_step_dmd", "num_steps=3", "num_phases=1", *LEVERS],
    # LightX2V's order, with DMD2's normalisation, re-noising steps, two microbatches and two
    # latent shapes (square and landscape, drawn per iteration)
    "phased_dmd_alternating": [
        "num_steps=4",
        "num_phases=2",
        "phase_order=alternating",
        "normalize_gradient=true",
        "step_noise=renoise",
        "micro_batch_size=2",
        "latent_shapes=[[1, 1, 8, 8], [1, 1, 4, 8]]",
        "latent_shape_weights=[1, 3]",
    ],
}


def distill_args(out: Path, teacher: Path, *overrides: str) -> list[str]:
    args = ["--out", str(out), "--no-progress", "--set", f"teacher={teacher}"]
    for item in (*QUICK, *overrides):
        args += ["--set", item]
    return args


def run_distill(out: Path, teacher: Path, *overrides: str, extra=()) -> int:
    from phased_dmd_mp import pretrain_distill

    return pretrain_distill.main([*distill_args(out, teacher, *overrides), *extra])


def crash_at_iteration_3(monkeypatch, out: Path, teacher: Path, *overrides: str) -> None:
    """A run of `overrides` that dies in its fourth generator update (a RuntimeError out of
    the runner, after the checkpoints of iterations 1-3); the runner is restored after."""
    import pytest

    from phased_dmd_mp.distill.trainer import Distiller

    original = Distiller.generator_update

    def crash_on_fourth(self, k):
        if self.state.iteration == 3:
            raise RuntimeError("simulated crash")
        return original(self, k)

    monkeypatch.setattr(Distiller, "generator_update", crash_on_fourth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_distill(out, teacher, *overrides)
    monkeypatch.setattr(Distiller, "generator_update", original)

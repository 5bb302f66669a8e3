"""The runner with the teachers it ships recipes for, beyond a single text-to-X model: an I2V
teacher (image conditioning in the condition set), with and without guidance, and a two-expert
teacher whose expert gets no sample in an update (phase 1 of Wan2.2) on one data-parallel rank."""

import pytest
import torch
from rehearsal import model_config, tiny_arch, write_teacher

from phased_dmd_mp.distill.config import DistillConfig
from phased_dmd_mp.distill.trainer import Distiller

QUICK = {"batch_size": 2, "fake_updates": 1, "iterations_per_phase": 1, "num_steps": 4}


@pytest.fixture(scope="module")
def i2v_teacher(tmp_path_factory):
    arch = tiny_arch(model_config("models/wan2.2_i2v_a14b.yaml"))
    return write_teacher(tmp_path_factory.mktemp("i2v"), arch)


@pytest.fixture(scope="module")
def two_expert_teacher(tmp_path_factory):
    arch = tiny_arch(model_config("models/wan2.1_t2v_14b.yaml"))
    return write_teacher(tmp_path_factory.mktemp("t2v_a14b"), arch, boundary_ratio=0.875)


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_i2v_teacher_trains_and_its_negative_branch_keeps_the_image(
    tmp_path, i2v_teacher, guidance_scale
):
    config = DistillConfig(teacher=str(i2v_teacher), guidance_scale=guidance_scale, **QUICK)
    distiller = Distiller(config, tmp_path, progress=False)
    rollout = distiller.rollout(1)
    assert rollout.cond.image_latents.shape == (2, 20, 2, 4, 4)  # 36 - 16 channels
    assert rollout.uncond.image_latents is rollout.cond.image_latents
    assert not rollout.uncond.text.any()  # the null prompt
    metrics = distiller._iteration()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_expert_without_samples_at_one_data_parallel_rank(tmp_path, two_expert_teacher):
    """Phase 1 injects noise above the boundary only: the low-noise fake expert sees no sample
    and gets no gradient. Like at DP > 1 it counts as a zero gradient: clipping (forced here by a
    tiny grad_clip) goes through, the high-noise fake moves and the low-noise one does not."""
    config = DistillConfig(
        teacher=str(two_expert_teacher),
        phase_t_ranges=((0.875, 1.0), (0.0, 1.0)),
        grad_clip=1e-8,
        **QUICK,
    )
    distiller = Distiller(config, tmp_path, progress=False)
    fake = distiller._fake(1)
    experts = {"high": fake.high, "low": fake.low} if hasattr(fake, "low") else {"high": fake}
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in experts.items()}
    metrics = distiller.fake_update(1)
    assert metrics["fake_grad_norm"] > 0
    moved = {
        k: any(not torch.equal(a, p) for a, p in zip(before[k], m.parameters(), strict=True))
        for k, m in experts.items()
    }
    assert moved == {k: k == "high" for k in experts}

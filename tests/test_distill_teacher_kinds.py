"""The runner with the teachers it ships recipes for, beyond a single text-to-X model: an I2V
teacher (image conditioning in the condition set), with and without guidance, a two-expert
teacher whose expert gets no sample in an update (phase 1 of Wan2.2) on one data-parallel rank,
and a Wan2.2 TI2V teacher conditioned on first frames, which no loss sees."""

import pytest
import torch
import yaml
from rehearsal import LEVERS, model_config, tiny_arch, write_teacher

from phased_dmd_mp.distill.config import DistillConfig
from phased_dmd_mp.distill.models import RoutedVelocity, VelocityModel
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
    """Phase 1 injects noise above the boundary only: its fake is the high-noise expert alone.
    Phase 2's fake has both experts; in an update whose samples all lie above the boundary the
    low-noise one gets no gradient, which megatron's gradient buffer holds as zeros at every
    data-parallel size: clipping (forced here by a tiny grad_clip) goes through, the high-noise
    fake moves and the low-noise one does not."""
    config = DistillConfig(
        teacher=str(two_expert_teacher),
        phase_t_ranges=((0.875, 1.0), (0.0, 1.0)),
        grad_clip=1e-8,
        **QUICK,
    )
    distiller = Distiller(config, tmp_path, progress=False)
    assert isinstance(distiller._fake(1), VelocityModel)
    fake, trained = distiller._fake(2), distiller._trained("fake", 2)
    assert isinstance(fake, RoutedVelocity)
    high = [p.detach().clone() for p in fake.high.parameters()]
    low = [p.detach().clone() for p in fake.low.parameters()]
    r = distiller.rollout(2)
    trained.zero_grad()
    t = torch.full((2,), 0.95)
    fake.train(r.x, t, r.cond, lambda v, i: v.square().mean(), micro_batch_size=2)
    assert trained.step() > 0
    assert all(not p.main_grad.any() for p in fake.low.parameters())
    assert all(torch.equal(a, p) for a, p in zip(low, fake.low.parameters(), strict=True))
    assert any(not torch.equal(a, p) for a, p in zip(high, fake.high.parameters(), strict=True))


def test_ti2v_first_frame_is_given_and_no_loss_sees_it(tmp_path, monkeypatch):
    """Wan2.2 TI2V image-to-video: the fake's flow loss and the generator's DMD loss take the
    frames after the first (the given frame's velocity means nothing); samples start with it."""
    from phased_dmd_mp.distill import trainer

    arch = tiny_arch(model_config("models/wan2.2_ti2v_5b.yaml"))
    teacher = write_teacher(tmp_path / "teacher", arch, first_frame=True)
    frames = []
    for name in ("flow_matching_loss", "subinterval_flow_loss", "dmd_generator_loss"):
        original = getattr(trainer, name)

        def recording(x, *args, original=original, **kwargs):
            frames.append(x.shape[2])
            return original(x, *args, **kwargs)

        monkeypatch.setattr(trainer, name, recording)
    config = DistillConfig(teacher=str(teacher), num_phases=2, **QUICK)
    distiller = Distiller(config, tmp_path / "run", progress=False)
    for phase in (1, 2):
        distiller.fake_update(phase)
        distiller.generator_update(phase)
    assert frames and set(frames) == {1}  # 2 latent frames, the first given
    cond = distiller.conditions.batch([0, 1])
    samples = distiller.sample(torch.randn(2, 48, 2, 4, 4), cond)
    assert torch.equal(samples[:, :, :1], cond.first_frame_latents)


def test_every_lever_with_an_i2v_teacher(tmp_path, i2v_teacher):
    """Both phases of a guided I2V run with every lever (rehearsal.LEVERS): the real latents
    bring their own conditions, image latents included, to the critic and the head."""
    config = DistillConfig(
        teacher=str(i2v_teacher), **QUICK, **{k: yaml.safe_load(v) for k, v in
                                               (item.split("=") for item in LEVERS)}
    )  # fmt: skip
    distiller = Distiller(config, tmp_path, progress=False)
    for expected_phase in (1, 2):
        metrics = distiller._iteration()
        assert metrics["phase"] == expected_phase
        assert {"gan_generator_loss", "real_critic_loss"} <= set(metrics)
        assert ("diversity_loss" in metrics) == (expected_phase == 1)
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())

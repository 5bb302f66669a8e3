"""Students beyond the teacher's own shape, end to end through stock diffusers: prepare ->
distill (2 generator updates per phase) -> export -> the exported pipeline folder in stock
diffusers gives our sampler's latents (within 1e-6 of their size, as tests/test_pipeline_e2e.py).

- Wan2.2 TI2V (WanPipeline with expand_timesteps, 48 latent channels): text-to-video, and
  image-to-video through WanImageToVideoPipeline on the same folder, whose first frame's tokens
  run at t = 0.
- Two latent shapes in one run (`latent_shapes`): each shape's samples, at the pixel size
  generator.json names for it.
- Students stock diffusers cannot run (3 Wan experts with re-noising steps; Wan2.1 I2V with
  CLIP, re-noising; 3 TI2V image-to-video experts; 2 Qwen-Image experts) through our pipeline
  class, beside model_index.json (trust_remote_code=True, or custom_pipeline= its file), each
  step on its expert.
"""

import json
from pathlib import Path

import pytest
import torch
from distill_helpers import run_distill

diffusers = pytest.importorskip("diffusers")

from pipeline_helpers import (  # noqa: E402
    compare_with_ours,
    first_frames,
    prepare_teacher,
    record_routing,
)

from phased_dmd_mp.data.teacher import read_conditions, read_spec  # noqa: E402

TI2V_SIZE = (32, 64, 5)  # height, width, frames: latents [48, 2, 2, 4], 2 tokens per frame


@pytest.mark.parametrize("mode", ["t2v", "i2v"])
def test_ti2v_student_runs_in_stock_diffusers_as_our_sampler(mode, tiny_pipeline, tmp_path):
    height, width, frames = TI2V_SIZE
    folder = Path(tiny_pipeline("wan22_ti2v"))
    images = first_frames(tmp_path, height, width) if mode == "i2v" else None
    teacher = prepare_teacher(folder, tmp_path / "teacher", video=True, images=images,
                              height=height, width=width, frames=frames)  # fmt: skip
    assert read_spec(teacher).latent_shape == (48, 2, 2, 4)
    fields = set(read_conditions(teacher).fields)
    assert fields == ({"text", "first_frame_latents"} if images else {"text"})
    run = tmp_path / "run"
    assert run_distill(run, teacher, "num_steps=4", "num_phases=2") == 0
    summary = json.loads((run / "export" / "generator.json").read_text())
    assert summary["pipeline"] == "pipeline", summary.get("pipeline_unsupported")

    cls = diffusers.WanImageToVideoPipeline if images else diffusers.DiffusionPipeline
    pipe = cls.from_pretrained(run / "export" / "pipeline")
    assert pipe.config.expand_timesteps and pipe.transformer_2 is not None
    pipe.set_progress_bar_config(disable=True)
    timesteps = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: timesteps.append(kw["timestep"].clone()), with_kwargs=True
    )
    ours, difference = compare_with_ours(
        run, pipe, video=True, images=images, size=TI2V_SIZE, steps=4
    )
    scale = max(1.0, ours.abs().max().item())
    print(f"TI2V {mode}: latents differ by {difference:.2e} (largest latent {scale:.2f})")
    assert difference < 1e-6 * scale
    # diffusers' per-token timesteps: t everywhere, 0 on frame 0's two tokens with an image
    first = timesteps[0][0]
    assert first.shape == (4,) and bool((first[2:] == 1000.0).all())
    assert bool((first[:2] == 0.0).all()) == (images is not None)
    if images is not None:  # frame 0 of every sample is the given first frame's latents
        given = read_conditions(teacher).batch([0, 1]).first_frame_latents
        for c in range(2):
            assert torch.equal(ours[c, :, :, :1], given[c : c + 1].expand(2, -1, -1, -1, -1))


def test_two_shapes_in_one_run_each_through_stock_diffusers(tiny_pipeline, tmp_path):
    folder = Path(tiny_pipeline("wan22_t2v"))
    teacher = prepare_teacher(folder, tmp_path / "teacher", video=True)  # 16 x 16 x 5
    shapes = [[16, 2, 2, 2], [16, 3, 2, 4]]  # and 16 x 32 pixels x 9 frames
    run = tmp_path / "run"
    overrides = ["num_steps=4", "num_phases=2", f"latent_shapes={shapes}", "iterations_per_phase=3"]
    assert run_distill(run, teacher, *overrides) == 0
    history = json.loads((run / "history.json").read_text())
    assert {h["shape"] for h in history if "shape" in h} == {0, 1}  # both trained
    summary = json.loads((run / "export" / "generator.json").read_text())
    assert summary["latent_shapes"] == shapes
    sizes = [{"height": 16, "width": 16, "num_frames": 5}, {"height": 16, "width": 32, "num_frames": 9}]
    assert summary["sizes"] == sizes
    pipe = diffusers.DiffusionPipeline.from_pretrained(run / "export" / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    for shape, size in zip(shapes, sizes):
        ours, difference = compare_with_ours(
            run, pipe, video=True, steps=4, latent_shape=shape,
            size=(size["height"], size["width"], size["num_frames"]),
        )  # fmt: skip
        assert ours.shape[2:] == tuple(shape)
        scale = max(1.0, ours.abs().max().item())
        print(f"shape {shape}: latents differ by {difference:.2e} (largest latent {scale:.2f})")
        assert difference < 1e-6 * scale


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """diffusers copies a folder's pipeline code into its modules cache: a temporary one."""
    from diffusers.utils import dynamic_modules_utils

    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))


CUSTOM = {
    # three Wan experts with DMD2's re-noising steps: neither is in stock diffusers
    "wan_three_experts": dict(
        pipeline="wan22_t2v", steps=3, extra=["num_phases=3", "step_noise=renoise"],
        module="pipeline_phased_dmd_wan", cls="PhasedDMDWanPipeline",
    ),
    # Wan2.1 I2V with CLIP image tokens, re-noising
    "wan21_i2v_renoise": dict(
        pipeline="wan21_i2v", steps=4, extra=["num_phases=2", "step_noise=renoise"],
        module="pipeline_phased_dmd_wan", cls="PhasedDMDWanPipeline", images=True,
    ),
    # Wan2.2 TI2V image-to-video, three experts: the first frame given, its tokens at t = 0
    "ti2v_three_experts": dict(
        pipeline="wan22_ti2v", steps=3, extra=["num_phases=3"], size=TI2V_SIZE,
        module="pipeline_phased_dmd_wan", cls="PhasedDMDWanPipeline", images=True,
    ),
    # the shipped Qwen-Image recipe's two experts: QwenImagePipeline runs one
    "qwen_two_experts": dict(
        pipeline="qwen_image", steps=4, extra=["num_phases=2"],
        module="pipeline_phased_dmd_qwen_image", cls="PhasedDMDQwenImagePipeline",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CUSTOM)
def test_our_pipeline_class_runs_what_stock_diffusers_cannot(
    case, tiny_pipeline, tmp_path, modules_cache
):
    spec = CUSTOM[case]
    video = spec["pipeline"].startswith("wan")
    height, width, frames = size = spec.get("size", (16, 16, 5))
    images = first_frames(tmp_path, height, width) if spec.get("images") else None
    teacher = prepare_teacher(Path(tiny_pipeline(spec["pipeline"])), tmp_path / "teacher",
                              video=video, images=images, height=height, width=width,
                              frames=frames)  # fmt: skip
    run = tmp_path / "run"
    assert run_distill(run, teacher, f"num_steps={spec['steps']}", *spec["extra"]) == 0
    summary = json.loads((run / "export" / "generator.json").read_text())
    assert "pipeline_unsupported" not in summary
    assert summary["pipeline_loading"] == {"class": spec["cls"], "trust_remote_code": True}
    folder = run / "export" / "pipeline"
    assert (folder / f"{spec['module']}.py").is_file()
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        diffusers.DiffusionPipeline.from_pretrained(folder)
    if video:
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    else:
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            folder, custom_pipeline=str(folder / f"{spec['module']}.py"), trust_remote_code=True
        )
    assert type(pipe).__name__ == spec["cls"]
    pipe.set_progress_bar_config(disable=True)
    routed = record_routing(pipe)
    ours, difference = compare_with_ours(
        run, pipe, video=video, images=images, size=size, steps=spec["steps"]
    )
    scale = max(1.0, ours.abs().max().item())
    print(f"{case}: latents differ by {difference:.2e} (largest latent {scale:.2f})")
    assert difference < 1e-6 * scale
    assert routed == summary["expert_of_step"] * 2  # each step on its expert, both prompts
    with pytest.raises(ValueError, match=f"distilled for {spec['steps']} steps"):
        pipe(prompt="a red cat", num_inference_steps=spec["steps"] + 1, output_type="latent")

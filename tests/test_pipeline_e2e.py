"""From a diffusers pipeline folder to a distilled pipeline folder that stock diffusers runs.

On each tiny pipeline (two-expert Wan2.2 T2V, Wan2.1 I2V with CLIP, Qwen-Image): a teacher
directory from the pipeline, 2 generator updates per phase, the export, then stock
`DiffusionPipeline.from_pretrained(RUN/export/pipeline)` at N steps, guidance 1, from prompts
(and the first frame) on the same initial noise gives our sampler's latents (fp32 tolerance)
and the same decoded pixels.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from distill_helpers import run_distill

diffusers = pytest.importorskip("diffusers")

from phased_dmd_mp import media, sample  # noqa: E402
from phased_dmd_mp.data.conditions import write_condition_set  # noqa: E402
from phased_dmd_mp.data.teacher import TeacherSpec, write_spec  # noqa: E402

PROMPTS = ["a red cat", "a blue dog"]  # as many tokens each: no padding to compare
SIZE = dict(height=16, width=16)
FRAMES = 5


def first_frame():
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)
    return Image.fromarray(pixels)


def call_args(kind: str, prompt: str) -> dict:
    args = dict(prompt=prompt, **SIZE, guidance_scale=1.0)
    if kind.startswith("wan"):
        args["num_frames"] = FRAMES
    else:
        args["true_cfg_scale"] = 1.0
    if kind == "wan21_i2v":
        args["image"] = first_frame()
    return args


def pipeline_conditions(pipe, kind: str) -> tuple[dict, dict]:
    """(items, uncond) of a condition set: what the pipeline feeds its transformer for each
    prompt (captured from its first denoising call) and its empty negative prompt."""
    seen = {}

    def capture(module, args, kwargs):
        seen.update(kwargs)

    items = {}
    hook = pipe.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    for prompt in PROMPTS:
        seen.clear()
        pipe(**call_args(kind, prompt), num_inference_steps=1, output_type="latent")
        found = {"text": seen["encoder_hidden_states"][0]}
        if kind == "qwen_image":
            found["text_mask"] = seen["encoder_hidden_states_mask"][0]
        if kind == "wan21_i2v":
            found["image_latents"] = seen["hidden_states"][0, 16:]
            found["image_embeds"] = seen["encoder_hidden_states_image"][0]
        for name, value in found.items():
            items.setdefault(name, []).append(value)
    hook.remove()
    items = {name: torch.stack(values) for name, values in items.items()}
    if kind == "qwen_image":
        embeds, mask = pipe.encode_prompt([" "])
        length = items["text"].shape[1]
        uncond = torch.zeros(1, length, embeds.shape[-1])
        uncond_mask = torch.zeros(1, length, dtype=items["text_mask"].dtype)
        uncond[:, : embeds.shape[1]] = embeds[:, :length]
        uncond_mask[:, : embeds.shape[1]] = 1 if mask is None else mask[:, :length]
        return items, {"text": uncond[0], "text_mask": uncond_mask[0]}
    negative, _ = pipe.encode_prompt("", do_classifier_free_guidance=False, max_sequence_length=512)
    return items, {"text": negative[0]}


CASES = {
    # shift 7: step 2 lands on t = 0.875, Wan2.2's boundary (phase 2 starts there)
    "wan22_t2v": dict(shift=7.0, steps=4, phases=2, extra=["moe_boundary=0.875"]),
    "wan21_i2v": dict(shift=5.0, steps=4, phases=2, extra=[]),
    # QwenImagePipeline runs one transformer: a one-expert student
    "qwen_image": dict(shift=3.0, steps=4, phases=1, extra=[]),
}


def latent_shape(kind: str, items: dict) -> tuple[int, ...]:
    if kind.startswith("wan"):
        return (16, (FRAMES - 1) // 4 + 1, 2, 2)
    return (4, 1, 4, 4)


def pack(x: torch.Tensor) -> torch.Tensor:
    """Qwen-Image's packed latents [B, H/2 * W/2, 4 C] of [B, C, 1, H, W]."""
    b, c, _, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * c)


def unpack(x: torch.Tensor, shape) -> torch.Tensor:
    c, _, h, w = shape
    b = x.shape[0]
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 1, h, w)


@pytest.mark.parametrize("kind", list(CASES))
def test_stock_diffusers_runs_the_exported_student_as_our_sampler(kind, tiny_pipeline, tmp_path):
    case = CASES[kind]
    folder = Path(tiny_pipeline(kind))
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)

    # teacher directory: the pipeline's transformer(s), its conditions, teacher.yaml
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "transformer").symlink_to(folder / "transformer")
    items, uncond = pipeline_conditions(pipe, kind)
    write_condition_set(teacher / "conditions", items, uncond)
    shape = latent_shape(kind, items)
    write_spec(teacher, TeacherSpec(shape, case["shift"], 3.0, pipeline=str(folder)))
    extra = list(case["extra"])
    if kind == "wan22_t2v":
        extra.append(f"teacher_low_noise={folder / 'transformer_2'}")
    run = tmp_path / "run"
    overrides = [f"num_steps={case['steps']}", f"num_phases={case['phases']}", *extra]
    assert run_distill(run, teacher, *overrides) == 0

    summary = json.loads((run / "export" / "generator.json").read_text())
    assert summary["pipeline"] == "pipeline", summary.get("pipeline_unsupported")
    student = diffusers.DiffusionPipeline.from_pretrained(run / "export" / "pipeline")
    student.set_progress_bar_config(disable=True)
    routed = []
    for k, name in ((1, "transformer"), (2, "transformer_2")):
        module = getattr(student, name, None)
        if module is not None:
            module.register_forward_pre_hook(
                lambda m, a, kw, k=k: routed.append(k), with_kwargs=True
            )

    source = sample.generator_source(run)
    ours = sample.generate(source, seeds=2, progress=False)  # [conditions, seeds, *shape]
    noise = sample.seed_noise(shape, 2)
    vae = media.load_vae(folder)
    for c, prompt in enumerate(PROMPTS):
        j = c  # condition c from seed c's noise
        start = noise[j : j + 1]
        args = dict(call_args(kind, prompt), num_inference_steps=case["steps"])
        if kind == "qwen_image":
            theirs = unpack(student(**args, latents=pack(start), output_type="latent").images, shape)
            pixels = student(**args, latents=pack(start), output_type="np").images[:, None]
        else:
            theirs = student(**args, latents=start.clone(), output_type="latent").frames
            pixels = student(**args, latents=start.clone(), output_type="np").frames
        difference = (theirs - ours[c, j : j + 1]).abs().max().item()
        assert difference < 1e-4, f"{kind} condition {c}: latents differ by {difference}"
        decoded = media.decode_latents(vae, ours[c, j : j + 1]).numpy()
        assert np.abs(decoded - pixels).max() < 1e-4
    expected = [summary["expert_of_step"][i] for i in range(case["steps"])]
    assert routed == expected * 2 * len(PROMPTS)  # latent and np calls per prompt

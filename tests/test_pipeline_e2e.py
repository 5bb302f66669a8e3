"""From a diffusers pipeline folder to a distilled pipeline folder that stock diffusers runs.

On each tiny pipeline (two-expert Wan2.2 T2V, Wan2.1 I2V with CLIP, Qwen-Image): a teacher
directory from the pipeline, 2 generator updates per phase, the export, then stock
`DiffusionPipeline.from_pretrained(RUN/export/pipeline)` at N steps, guidance 1, from prompts
(and the first frame) on the same initial noise gives our sampler's latents (fp32 tolerance)
and the same decoded pixels (measured: latents within 1e-6, pixels within 3e-7).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from distill_helpers import run_distill

diffusers = pytest.importorskip("diffusers")

import imageio.v3 as iio  # noqa: E402
from cli_helpers import run_cli  # noqa: E402

from phased_dmd_mp import evaluate, media, prepare, sample  # noqa: E402
from phased_dmd_mp.distill.diffusers_pipeline import COMFY_FILE  # noqa: E402
from phased_dmd_mp.data.teacher import read_spec  # noqa: E402

PROMPTS = ["a red cat", "a blue dog"]  # as many tokens each: no padding to compare
SIZE = dict(height=16, width=16)
FRAMES = 5


def first_frames(root: Path) -> Path:
    """One 16x16 first frame per prompt, in sorted order (prepare's --images)."""
    from PIL import Image

    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for c in range(len(PROMPTS)):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(folder / f"{c:03d}.png")
    return folder


def call_args(kind: str, c: int, images: Path | None) -> dict:
    """What a user passes the stock pipeline for one prompt, guidance off."""
    from PIL import Image

    args = dict(prompt=PROMPTS[c], **SIZE)
    if kind.startswith("wan"):
        args.update(num_frames=FRAMES, guidance_scale=1.0)
    else:
        args["true_cfg_scale"] = 1.0  # no negative prompt either: no CFG
    if images is not None:
        args["image"] = Image.open(images / f"{c:03d}.png")
    return args


CASES = {
    # shift 7: step 2 lands on t = 0.875, Wan2.2's boundary (phase 2 starts there); LoRA experts
    "wan22_t2v": dict(
        steps=4,
        phases=2,
        extra=["shift=7", "generator_adapter=lora", "lora_rank=4", "lora_alpha=4"],
    ),
    "wan21_i2v": dict(steps=4, phases=2, extra=[]),
    # QwenImagePipeline runs one transformer: a one-expert student
    "qwen_image": dict(steps=4, phases=1, extra=[]),
}


def pack(x: torch.Tensor) -> torch.Tensor:
    """Qwen-Image's packed latents [B, H/2 * W/2, 4 C] of [B, C, 1, H, W]."""
    b, c, _, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * c)


def unpack(x: torch.Tensor, shape) -> torch.Tensor:
    c, _, h, w = shape
    b = x.shape[0]
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 1, h, w)


@pytest.mark.parametrize("kind", list(CASES))
def test_stock_diffusers_runs_the_exported_student_as_our_sampler(
    kind, tiny_pipeline, tmp_path, capsys
):
    case = CASES[kind]
    folder = Path(tiny_pipeline(kind))

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    images = first_frames(tmp_path) if kind == "wan21_i2v" else None
    teacher = tmp_path / "teacher"
    args = ["--pipeline", str(folder), "--prompts", str(prompts), "--out", str(teacher)]
    # the stock pipeline below runs its text encoder in float32: store float32 embeddings
    args += ["--height", "16", "--width", "16", "--no-progress", "--dtype", "float32"]
    args += ["--frames", str(FRAMES)] if kind.startswith("wan") else []
    args += ["--images", str(images)] if images is not None else []
    assert prepare.main(args) == 0
    shape = read_spec(teacher).latent_shape
    extra = list(case["extra"])
    run = tmp_path / "run"
    overrides = [f"num_steps={case['steps']}", f"num_phases={case['phases']}", *extra]
    assert run_distill(run, teacher, *overrides) == 0

    summary = json.loads((run / "export" / "generator.json").read_text())
    assert summary["pipeline"] == "pipeline", summary.get("pipeline_unsupported")
    if kind == "wan22_t2v":
        # the tie: t = 0.875 >= the boundary is the high-noise expert's in training (so expert
        # 2, whose first step it is, sits on the high-noise teacher) and expert 2's at sampling
        assert summary["timesteps"][2] == 0.875 and summary["expert_of_step"] == [1, 1, 2, 2]
        assert summary["lora"]["base"] == ["transformer", "transformer"]
        assert (run / "export" / "expert_2_lora" / COMFY_FILE).is_file()
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
    for c in range(len(PROMPTS)):
        j = c  # condition c from seed c's noise
        start = noise[j : j + 1]
        args = dict(call_args(kind, c, images), num_inference_steps=case["steps"])
        if kind == "qwen_image":
            theirs = unpack(
                student(**args, latents=pack(start), output_type="latent").images, shape
            )
            pixels = student(**args, latents=pack(start), output_type="np").images[:, None]
        else:
            theirs = student(**args, latents=start.clone(), output_type="latent").frames
            pixels = student(**args, latents=start.clone(), output_type="np").frames
        difference = (theirs - ours[c, j : j + 1]).abs().max().item()
        assert difference < 1e-5, f"{kind} condition {c}: latents differ by {difference}"
        decoded = media.decode_latents(vae, ours[c, j : j + 1]).numpy()
        pixel_difference = np.abs(decoded - pixels).max()
        with capsys.disabled():  # the measured differences, shown with pytest -s
            print(f"{kind} condition {c}: latents {difference:.2e}, pixels {pixel_difference:.2e}")
        assert pixel_difference < 1e-5
    expected = [summary["expert_of_step"][i] for i in range(case["steps"])]
    assert routed == expected * 2 * len(PROMPTS)  # latent and np calls per prompt

    # python -m phased_dmd_mp.sample writes the decoded samples as files
    out = tmp_path / "samples"
    code, err = run_cli(
        sample.main,
        ["--checkpoint", str(run), "--out", str(out), "--seeds", "2", "--no-progress"],
        capsys,
    )
    assert code == 0, err
    suffix = ".png" if kind == "qwen_image" else ".mp4"
    names = sorted(path.name for path in (out / "media").iterdir())
    assert names == [f"c{c:04d}_s{j}{suffix}" for c in range(len(PROMPTS)) for j in range(2)]
    written = iio.imread(out / "media" / f"c0001_s1{suffix}")
    exact = media.to_uint8(media.decode_latents(vae, ours[1, 1:2]))[0]
    if suffix == ".png":
        assert np.array_equal(written, exact[0])
        # ... which the evaluation refuses to score as digits
        code, err = run_cli(
            evaluate.main, [str(out / "samples.npz"), "--out", str(tmp_path / "eval")], capsys
        )
        assert code == 2 and "features=module:factory" in err
        # bf16 (what a GPU runs by default) on the same models: close to the fp32 pixels
        code, err = run_cli(sample.main, ["--checkpoint", str(run), "--out", str(tmp_path / "bf16"),
                                          "--seeds", "2", "--dtype", "bfloat16", "--no-progress"],
                            capsys)  # fmt: skip
        assert code == 0, err
        bf16 = iio.imread(tmp_path / "bf16" / "media" / "c0001_s1.png").astype(float)
        assert 0 < np.abs(bf16 - written).mean() < 0.05 * 255
    else:  # H.264 is lossy
        assert written.shape == exact.shape
        assert np.abs(written.astype(float) - exact).mean() < 8
        # ... and the evaluation measures the media folder's motion (no extractor for these
        # frames: diversity is left out, and the table says so)
        code, err = run_cli(
            evaluate.main, [str(out / "media"), "--out", str(tmp_path / "eval")], capsys
        )
        assert code == 0, err
        results = json.loads((tmp_path / "eval" / "results.json").read_text())
        run = results["runs"][0]
        assert results["models"][0]["model"] == "samples"  # OUT/media is named after OUT
        assert (run["conditions"], run["seeds"]) == (len(PROMPTS), 2)
        assert run["video"]["frames"] == FRAMES and run["video"]["height"] == 16
        flows = np.array(run["per_video"]["optical_flow"])
        assert flows.shape == (2, 2) and np.isfinite(flows).all() and (flows >= 0).all()
        assert "diversity: not measured" in (tmp_path / "eval" / "results.md").read_text()
    if kind == "wan22_t2v":  # the two-expert teacher, routed at its boundary
        code, err = run_cli(
            sample.main,
            [
                "--teacher",
                str(teacher),
                "--out",
                str(tmp_path / "teacher_samples"),
                "--steps",
                "3",
                "--seeds",
                "2",
                "--no-progress",
            ],
            capsys,
        )
        assert code == 0, err
        assert (tmp_path / "teacher_samples" / "media" / "c0000_s0.mp4").is_file()

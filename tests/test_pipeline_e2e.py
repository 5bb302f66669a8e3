"""From a diffusers pipeline folder to a distilled pipeline folder that stock diffusers runs.

On each tiny pipeline (two-expert Wan2.2 T2V, Wan2.1 I2V with CLIP, two-expert Wan2.2 I2V
without CLIP, Qwen-Image): a teacher directory from the pipeline, 2 generator updates per
phase, the export, then stock `DiffusionPipeline.from_pretrained(RUN/export/pipeline)` at N
steps, guidance 1, from prompts (and the first frame) on the same initial noise gives our
sampler's latents (within 1e-6 of the latents' largest value, at least 1: measured 4.8e-7 to
1.0e-6 absolute) and the same decoded pixels (measured within 1.2e-7). A smaller student of a
larger teacher exports the same way, in its own architecture.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from distill_helpers import run_distill

diffusers = pytest.importorskip("diffusers")

import imageio.v3 as iio  # noqa: E402
from cli_helpers import run_cli  # noqa: E402
from pipeline_helpers import (  # noqa: E402
    FRAMES,
    PROMPTS,
    call_args,
    first_frames,
    prepare_teacher,
    record_routing,
    stock_output,
)

from phased_dmd_mp import evaluate, media, sample  # noqa: E402
from phased_dmd_mp.data.teacher import read_spec  # noqa: E402
from phased_dmd_mp.distill.diffusers_pipeline import COMFY_FILE  # noqa: E402
from phased_dmd_mp.models.convert import read_diffusers_config  # noqa: E402

LORA = ["generator_adapter=lora", "lora_rank=4", "lora_alpha=4"]
CASES = {
    # shift 7: step 2 lands on t = 0.875, Wan2.2's boundary (phase 2 starts there); LoRA experts
    "wan22_t2v": dict(steps=4, phases=2, extra=["shift=7", *LORA]),
    "wan21_i2v": dict(steps=4, phases=2, extra=[]),
    # Wan2.2-I2V-A14B's shape: two experts split at 0.9, no CLIP image tokens; LoRA experts,
    # phase 2's on the low-noise expert (its first step, t = 0.833, is below 0.9)
    "wan22_i2v": dict(steps=4, phases=2, extra=LORA),
    # QwenImagePipeline runs one transformer: a one-expert student
    "qwen_image": dict(steps=4, phases=1, extra=[]),
    # a smaller student (1 layer, 1 head) of the two-expert Wan2.2 teacher: LoRA experts on the
    # student's weights, each phase's fake a copy of the student
    "small_student": dict(
        pipeline="wan22_t2v", steps=4, phases=2, extra=[*LORA, "fake_init=student"]
    ),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_stock_diffusers_runs_the_exported_student_as_our_sampler(
    kind, tiny_pipeline, tmp_path, capsys
):
    case = CASES[kind]
    folder = Path(tiny_pipeline(case.get("pipeline", kind)))
    video = kind != "qwen_image"
    images = first_frames(tmp_path) if kind.endswith("i2v") else None
    teacher = prepare_teacher(folder, tmp_path / "teacher", video=video, images=images)
    shape = read_spec(teacher).latent_shape
    run = tmp_path / "run"
    overrides = [f"num_steps={case['steps']}", f"num_phases={case['phases']}", *case["extra"]]
    if kind == "small_student":
        student = Path(tiny_pipeline("wan_student"))
        overrides.append(f"student={student}")
    assert run_distill(run, teacher, *overrides) == 0

    summary = json.loads((run / "export" / "generator.json").read_text())
    assert summary["pipeline"] == "pipeline", summary.get("pipeline_unsupported")
    if kind == "wan22_t2v":
        # the tie: t = 0.875 >= the boundary is the high-noise expert's in training (so expert
        # 2, whose first step it is, sits on the high-noise teacher) and expert 2's at sampling
        assert summary["timesteps"][2] == 0.875 and summary["expert_of_step"] == [1, 1, 2, 2]
        assert summary["lora"]["base"] == ["transformer", "transformer"]
        assert (run / "export" / "expert_2_lora" / COMFY_FILE).is_file()
    if kind == "wan22_i2v":
        assert summary["expert_of_step"] == [1, 1, 2, 2]
        assert summary["lora"]["base"] == ["transformer", "transformer_2"]
    if kind == "small_student":  # the export has the student's architecture, on its weights
        assert summary["student"] == str(student.resolve())
        assert summary["lora"]["base"] == ["student", "student"]
        assert summary["lora"]["base_folder"] == [str(student.resolve())] * 2
        for k in (1, 2):
            assert read_diffusers_config(run / "export" / f"expert_{k}") == read_diffusers_config(
                student
            )
    student_pipe = diffusers.DiffusionPipeline.from_pretrained(run / "export" / "pipeline")
    student_pipe.set_progress_bar_config(disable=True)
    routed = record_routing(student_pipe)

    source = sample.generator_source(run)
    ours = sample.generate(source, seeds=2, progress=False)  # [conditions, seeds, *shape]
    noise = sample.seed_noise(shape, 2)
    vae = media.load_vae(folder)
    scale = max(1.0, ours.abs().max().item())  # fp32: 1e-6 relative to the latents' size
    for c in range(len(PROMPTS)):
        j = c  # condition c from seed c's noise
        start = noise[j : j + 1]
        args = dict(call_args(video, c, images), num_inference_steps=case["steps"])
        theirs = stock_output(student_pipe, args, start, video)
        pixels = stock_output(student_pipe, args, start, video, output_type="np")
        difference = (theirs - ours[c, j : j + 1]).abs().max().item()
        assert difference < 1e-6 * scale, f"{kind} condition {c}: latents differ by {difference}"
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
    suffix = ".mp4" if video else ".png"
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

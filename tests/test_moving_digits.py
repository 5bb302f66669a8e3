"""The embedded video teacher: its data (digits moving at constant integer velocities, always in
frame), its teacher directory (samples and data videos with their motion measured), training
previews that report motion, and a video reproduction suite end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from distill_helpers import run_distill

from phased_dmd_mp import pretrain_teacher, reproduce
from phased_dmd_mp.config import load_config
from phased_dmd_mp.data import moving_digits
from phased_dmd_mp.data.digits import load_digits_latents
from phased_dmd_mp.eval.motion import optical_flow
from phased_dmd_mp.eval.videos import open_video_npz

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "configs" / "moving_digits_teacher_smoke.yaml"


def test_digits_move_in_straight_lines_inside_the_frame():
    images = load_digits_latents()[0][:400, :, 0]
    generator = torch.Generator().manual_seed(0)
    velocity, start = moving_digits.random_motion(len(images), generator)
    videos = moving_digits.render(images, velocity, start)
    assert videos.shape == (400, 1, moving_digits.FRAMES, 16, 16)
    assert set(velocity.flatten().tolist()) == {-2, -1, 0, 1, 2}
    assert len({tuple(v) for v in velocity.tolist()}) == 25  # every velocity occurs
    for n in range(0, 400, 37):
        for frame in range(moving_digits.FRAMES):
            row, col = (start[n] + frame * velocity[n]).tolist()
            assert 0 <= row <= 8 and 0 <= col <= 8  # the whole digit in frame
            window = videos[n, 0, frame, row : row + 8, col : col + 8]
            torch.testing.assert_close(window, images[n, 0])  # the digit, sharp
            assert videos[n, 0, frame].sum() == window.sum() + (256 - 64) * -1.0  # background
    # faster digits move more: the measured flow grows with the speed
    speed = velocity.abs().max(dim=1).values
    frames = videos.transpose(1, 2)  # [N, F, 1, H, W]
    slow, fast = optical_flow(frames[speed == 0][:20]), optical_flow(frames[speed == 2][:20])
    assert slow == 0 and fast > 1.0


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("video") / "teacher"
    config = load_config(pretrain_teacher.TeacherConfig, SMOKE)
    pretrain_teacher.run(config, out, progress=False)
    return out


def test_video_teacher_directory(teacher):
    samples = open_video_npz(teacher / "samples.npz")
    data = open_video_npz(teacher / pretrain_teacher.DATA_VIDEOS)
    for videos in (samples, data):
        assert (videos.conditions, videos.seeds, videos.frames) == (10, 4, moving_digits.FRAMES)
        assert (videos.channels, videos.height, videos.width) == (1, 16, 16)
    assert data.labels == [str(c) for c in range(10)]
    metrics = json.loads((teacher / "metrics.json").read_text())
    for measured in (metrics, metrics["data"]):
        assert measured["optical_flow"] >= 0 and 0 < measured["perceptual_distance"]
    assert metrics["data"]["optical_flow"] > 0.5  # 24 of 25 velocities move
    assert yaml.safe_load((teacher / "teacher.yaml").read_text())["latent_shape"] == [1, 5, 16, 16]
    assert (teacher / "samples.png").stat().st_size > 1000


def test_previews_of_a_video_run_report_motion(teacher, tmp_path):
    run = tmp_path / "run"
    assert run_distill(run, teacher, "num_steps=2", "num_phases=2", "sample_every=1") == 0
    history = json.loads((run / "history.json").read_text())
    flows = [entry["optical_flow"] for entry in history if "optical_flow" in entry]
    assert len(flows) == 4 and all(np.isfinite(flows))  # every preview, next to the diversity
    assert all("pairwise_distance" in entry for entry in history if "optical_flow" in entry)
    assert (run / "samples" / "iter_000004.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert "samples/optical_flow" in events.Tags()["scalars"]
    assert "samples/frames" in events.Tags()["images"]


def test_video_reproduction_suite(tmp_path):
    suite = {
        "teacher_config": str(SMOKE.relative_to(ROOT)),
        "seeds": [0],
        "sample_seeds": 2,
        "common": ["batch_size=4", "fake_updates=1", "sample_every=100", "log_every=100"],
        "runs": [
            {"name": "SGTS", "set": ["algorithm=dmd_sgts", "num_steps=2", "num_phases=1",
                                     "iterations_per_phase=2"]},
            {"name": "Phased", "set": ["num_steps=2", "num_phases=2", "iterations_per_phase=1"]},
        ],
        "eval_overrides": ["features=digits", "perceptual=digits", "digit_fidelity=true"],
    }  # fmt: skip
    path = tmp_path / "video.yaml"
    path.write_text(yaml.safe_dump(suite))
    out = tmp_path / "out"
    assert reproduce.main(["--suite", str(path), "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "video" / "eval" / "results.json").read_text())
    assert results["kind"] == "videos"
    models = [row["model"] for row in results["models"]]
    assert models == ["data: moving digits", "teacher 2 steps, CFG 1.5", "SGTS", "Phased"]
    for row in results["models"]:
        assert set(row["metrics"]) == {
            "optical_flow", "cosine_similarity", "perceptual_distance",
            "digit_accuracy", "shape_change", "digit_speed",
        }  # fmt: skip
    data = {k: v["mean"] for k, v in results["models"][0]["metrics"].items()}
    # real moving digits: legible, rigid, moving
    assert data["digit_accuracy"] > 90 and data["shape_change"] == 0 and data["digit_speed"] > 1
    assert (out / "video" / "eval" / "comparison.png").is_file()
    assert "optical flow (px/frame)" in (out / "report.md").read_text()


def test_digit_fidelity_tracks_the_digit():
    """On the data, the tracked digit is the conditioned class, keeps its shape and moves at the
    drawn speed; noise and a digit that morphs into another class score as such."""
    from phased_dmd_mp.eval.digits import DigitsExtractor
    from phased_dmd_mp.eval.moving_digits import DigitFidelity

    fidelity = DigitFidelity(DigitsExtractor.load(progress=False))
    images, labels = load_digits_latents()
    generator = torch.Generator().manual_seed(1)
    chosen = torch.arange(0, 1797, 45)  # 40 digits of every class
    velocity, start = moving_digits.random_motion(len(chosen), generator)
    videos = moving_digits.render(images[chosen, :, 0], velocity, start)
    measured = [
        fidelity.measure(video.transpose(0, 1), int(label))
        for video, label in zip(videos, labels[chosen])
    ]
    speed = velocity.double().norm(dim=1)
    tracked = torch.tensor([m["digit_speed"] for m in measured], dtype=torch.float64)
    torch.testing.assert_close(tracked, speed)  # exactly the drawn velocity
    assert np.mean([m["digit_accuracy"] for m in measured]) > 95
    assert max(m["shape_change"] for m in measured) == 0  # the same window, edges included
    noise = torch.rand(5, 1, 16, 16, generator=generator) * 2 - 1
    assert fidelity.measure(noise, 3)["shape_change"] > 0.5
    # a 0 that turns into a 1 after 3 of 5 frames, standing still: 60% of its frames are right,
    # and its shape jumps once
    zero, one = images[labels == 0][0, :, 0], images[labels == 1][0, :, 0]
    still = torch.zeros(2, 2).long(), torch.full((2, 2), 4)
    morph = moving_digits.render(torch.stack([zero, one]), *still)
    frames = torch.cat([morph[0, :, :3], morph[1, :, 3:]], dim=1).transpose(0, 1)
    result = fidelity.measure(frames, 0)
    assert result["digit_accuracy"] == pytest.approx(60) and result["digit_speed"] < 0.5
    assert result["shape_change"] > 0.05
    with pytest.raises(ValueError, match="gray frames of at least 8x8"):
        fidelity.check(3, 16, 16, 10)

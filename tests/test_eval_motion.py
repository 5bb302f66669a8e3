"""Optical flow and VBench's dynamic degree on videos of known motion, and the video evaluation's
inputs: folders of MP4s and sample files of videos, streamed, with one-line errors."""

import json
import os

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from scipy.ndimage import gaussian_filter

from phased_dmd_mp import evaluate, media
from phased_dmd_mp.eval import motion
from phased_dmd_mp.eval.videos import _read_npz_video, open_video_npz

SIZE, FRAMES = 64, 6


def texture(seed=0, size=SIZE + 40):
    """A smooth random gray texture in [-1, 1], larger than the frames cut from it."""
    field = gaussian_filter(np.random.default_rng(seed).standard_normal((size, size)), 2.0)
    return 2 * (field - field.min()) / (field.max() - field.min()) - 1


def translated(d, frames=FRAMES, seed=0):
    """[1, frames, SIZE, SIZE]: a window moving right by d pixels per frame over a texture."""
    tex = texture(seed)
    windows = [tex[20 : 20 + SIZE, 5 + i * d : 5 + i * d + SIZE] for i in range(frames)]
    return np.stack(windows)[None]


def save_videos(path, videos, **extra):
    """A sample file of videos [conditions, seeds, C, F, H, W]."""
    np.savez(path, samples=np.asarray(videos, np.float32), **extra)
    return str(path)


_run = evaluate.main


def run(argv, capsys):
    return run_cli(_run, argv, capsys)


@pytest.mark.parametrize("d", [0, 1, 3])
def test_flow_of_a_translated_texture(d):
    video = torch.from_numpy(translated(d)).float().transpose(0, 1)  # [F, 1, H, W]
    flow = motion.optical_flow(video[None])
    if d == 0:
        assert flow < 0.1
    else:
        assert abs(flow - d) < 0.1 * d, flow


def test_evaluate_reads_videos_and_measures_their_motion(tmp_path, capsys):
    files = []
    for d in (0, 1, 3):  # 2 conditions x 3 seeds, every video the same motion
        videos = np.stack([np.stack([translated(d, seed=s) for s in range(3)])] * 2)
        files.append(save_videos(tmp_path / f"d{d}.npz", videos, model=f"d={d}", fps=8.0))
    out = tmp_path / "out"
    code, err = run([*files, "--out", str(out)], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    flows = {row["model"]: row["metrics"]["optical_flow"]["mean"] for row in results["models"]}
    assert flows["d=0"] < 0.1
    assert abs(flows["d=1"] - 1) < 0.1 and abs(flows["d=3"] - 3) < 0.3, flows
    run0 = results["runs"][1]
    assert run0["video"] == {"frames": FRAMES, "height": SIZE, "width": SIZE, "channels": 1,
                             "fps": 8.0, "diversity_frames": [0, 1, 2, 3, 4, 5]}  # fmt: skip
    assert np.array(run0["per_video"]["optical_flow"]).shape == (2, 3)
    table = (out / "results.md").read_text()
    assert "optical flow (px/frame)" in table
    assert "pixels per frame at the video's resolution" in table
    assert "| 6 frames, 64x64 |" in table
    # the hint is a command that parses: one --set per key
    assert "(needs --set raft_weights=FILE --set dynamic_degree=true)" in table
    assert "diversity: not measured" in table  # 64x64 frames: no automatic extractor
    assert (out / "grids" / "d_1.png").is_file() and (out / "comparison.png").is_file()


PIXELS = '''
import torch

class Pixels:
    """Gray 4x4 average-pooled pixels as features, mean absolute difference as distance."""
    name = "pixels"
    def features(self, images):
        gray = images.mean(dim=1, keepdim=True)
        return torch.nn.functional.adaptive_avg_pool2d(gray, 4).flatten(1)
    def distance(self, a, b):
        return (a - b).abs().flatten(1).mean(1)
'''


def test_video_diversity_frame_by_frame(tmp_path, capsys, monkeypatch):
    """Seeds that are the same video have no diversity; different textures have the pixel
    extractor's distance, averaged over the kept frames. (The plug-in's module name is its own:
    test_eval_cli's my_metrics would be found in sys.modules.)"""
    (tmp_path / "video_pixels.py").write_text(PIXELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    same = np.stack([np.stack([translated(1)] * 3)] * 2)
    different = np.stack([np.stack([translated(1, seed=s) for s in range(3)])] * 2)
    files = [save_videos(tmp_path / "same.npz", same)]
    files.append(save_videos(tmp_path / "diff.npz", different))
    plug = ["--set", "features=video_pixels:Pixels", "--set", "perceptual=video_pixels:Pixels"]
    out = tmp_path / "out"
    code, err = run([*files, "--out", str(out), *plug, "--set", "diversity_frames=3"], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    same_row, diff_row = (
        {key: value["mean"] for key, value in row["metrics"].items()} for row in results["models"]
    )
    assert same_row["cosine_similarity"] == pytest.approx(1.0)
    assert same_row["perceptual_distance"] == 0
    frames = results["runs"][1]["video"]["diversity_frames"]
    assert frames == [0, 2, 5]  # 3 evenly spaced of 6 (2.5 rounds to even)
    videos = torch.from_numpy(different[0, :, 0]).float()  # [seeds, F, H, W]
    expected = np.mean([
        (videos[i, frames] - videos[j, frames]).abs().mean().item()
        for i, j in [(0, 1), (0, 2), (1, 2)]
    ])  # fmt: skip
    assert diff_row["perceptual_distance"] == pytest.approx(expected, rel=1e-5)
    assert diff_row["cosine_similarity"] < 0.99


def test_a_folder_of_mp4s_as_sample_writes_them(tmp_path, capsys):
    """H.264 video files named c{condition}_s{seed}.mp4: read in a stream, motion measured at the
    file's resolution; NAME=FOLDER groups folders into runs of one model."""
    for name, d in (("slow0", 1), ("slow1", 1), ("fast", 3)):
        for c in range(2):
            for s in range(2):
                frames = (translated(d, seed=2 * c + s)[0] + 1) / 2  # [F, H, W] in [0, 1]
                video = torch.from_numpy(frames).float()[..., None].expand(-1, -1, -1, 3)
                media.write_mp4(video, tmp_path / name / "media" / f"c{c:04d}_s{s}.mp4")
    out = tmp_path / "out"
    argv = [f"slow={tmp_path / 'slow0' / 'media'}", f"slow={tmp_path / 'slow1' / 'media'}"]
    argv += [str(tmp_path / "fast" / "media"), "--out", str(out)]
    code, err = run(argv, capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    rows = {row["model"]: row for row in results["models"]}
    assert set(rows) == {"slow", "fast"} and rows["slow"]["runs"] == 2  # media: the parent's name
    slow, fast = (rows[m]["metrics"]["optical_flow"]["mean"] for m in ("slow", "fast"))
    assert abs(slow - 1) < 0.1 and abs(fast - 3) < 0.3, (slow, fast)  # lossy, still close
    assert results["runs"][0]["video"]["fps"] == media.VIDEO_FPS


def test_npz_videos_are_read_one_at_a_time(tmp_path):
    videos = np.random.default_rng(0).uniform(-1, 1, (3, 2, 1, 4, 6, 5)).astype(np.float32)
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, samples=videos)
        assert open_video_npz(path).frames == 4
        for c, s in [(0, 0), (2, 1), (1, 0)]:  # out of order too
            np.testing.assert_array_equal(_read_npz_video(path, c, s), videos[c, s])


# --- VBench's dynamic degree as a rule on given flow fields ---------------------------------


def test_vbench_parameters():
    # Wan2.2 at 480x832, 81 frames at 16 fps: every 2nd frame (41), 6 * 480 / 256 pixels, 10 pairs
    assert motion.vbench_frame_interval(16) == 2
    assert motion.vbench_parameters(480, 832, 41, 16) == (pytest.approx(11.25), 10)
    # 8 fps and below: every frame, the threshold scaled up by 8 / fps
    assert motion.vbench_frame_interval(8) == 1 and motion.vbench_frame_interval(4) == 1
    assert motion.vbench_parameters(256, 256, 16, 4) == (pytest.approx(12.0), 4)
    assert motion.vbench_parameters(64, 64, 2, 8)[1] == 0  # Python's round(0.5) is 0


def test_top_magnitude_mean():
    flow = np.zeros((20, 10, 2))
    flow.reshape(-1, 2)[:10] = [3.0, 4.0]  # 10 of 200 pixels (5%) move by 5
    assert motion.top_magnitude_mean(flow) == pytest.approx(5.0)
    flow.reshape(-1, 2)[:5] = [0.0, 1.0]  # now the top 10 are five 5s and five 1s
    assert motion.top_magnitude_mean(flow) == pytest.approx(3.0)


def _flows(pairs, moving_pairs, speed, size=32):
    """Flow fields of `pairs` frame pairs, the first `moving_pairs` a uniform `speed`."""
    return [
        np.full((size, size, 2), [speed, 0.0] if i < moving_pairs else [0.0, 0.0])
        for i in range(pairs)
    ]


def test_a_repeated_frame_is_static_and_a_mix_scores_its_moving_fraction():
    size, frames, fps = 32, 16, 8  # threshold 6 * 32 / 256 = 0.75 px, 4 pairs needed
    static = _flows(frames - 1, 0, 0.0, size)  # a repeated frame: zero flow everywhere
    assert not motion.video_is_dynamic(static, size, size, frames, fps)
    moving = _flows(frames - 1, frames - 1, 2.0, size)
    assert motion.video_is_dynamic(moving, size, size, frames, fps)
    # VBench's count rule: 4 pairs above the threshold make a video dynamic, 3 do not
    assert motion.video_is_dynamic(_flows(frames - 1, 4, 2.0, size), size, size, frames, fps)
    assert not motion.video_is_dynamic(_flows(frames - 1, 3, 2.0, size), size, size, frames, fps)
    assert not motion.video_is_dynamic(_flows(frames - 1, 15, 0.7, size), size, size, frames, fps)
    videos = [moving, static, static, moving, static]  # 2 of 5 moving
    degree = 100 * np.mean([motion.video_is_dynamic(v, size, size, frames, fps) for v in videos])
    assert degree == 40.0


def test_dynamic_degree_without_raft_weights_is_refused(tmp_path, capsys):
    path = save_videos(tmp_path / "v.npz", np.zeros((1, 2, 1, 3, 8, 8)))
    code, err = run([path, "--out", str(tmp_path / "out"), "--set", "dynamic_degree=true"], capsys)
    assert code == 2 and "dynamic_degree needs RAFT" in err and "raft_weights=FILE" in err
    assert "Traceback" not in err


def _torchvision_raft():
    try:
        from torchvision.models.optical_flow import raft_large  # noqa: F401
    except Exception as error:  # a torchvision built for another torch raises more than ImportError
        pytest.skip(f"torchvision's RAFT does not import here ({type(error).__name__}: {error})")


def test_raft_path_without_torchvision_is_one_line(tmp_path, capsys):
    try:
        import torchvision  # noqa: F401

        pytest.skip("torchvision imports here: the missing-package message is not reachable")
    except Exception:
        pass
    path = save_videos(tmp_path / "v.npz", np.zeros((1, 2, 1, 3, 8, 8)))
    weights = tmp_path / "raft.pth"
    weights.write_bytes(b"")
    argv = [path, "--out", str(tmp_path / "o"), "--set", f"raft_weights={weights}"]
    code, err = run(argv, capsys)
    assert code == 2 and "torchvision's RAFT" in err and "Traceback" not in err


RAFT_WEIGHTS = os.environ.get("PHASED_DMD_RAFT_WEIGHTS")


@pytest.mark.skipif(
    RAFT_WEIGHTS is None,
    reason="needs RAFT-large weights: set PHASED_DMD_RAFT_WEIGHTS to torchvision's "
    "raft_large_C_T_V1 state dict (no downloads here)",
)
def test_raft_flow_and_dynamic_degree_on_known_motion(tmp_path, capsys):
    _torchvision_raft()
    raft = motion.RAFTFlow(RAFT_WEIGHTS)
    for d in (0, 1, 3):
        video = torch.from_numpy(translated(d)).float().transpose(0, 1)
        flow = motion.optical_flow(video[None], raft)
        assert flow < 0.1 if d == 0 else abs(flow - d) < 0.1 * d
    # 16 frames at 8 fps, 64x64: threshold 1.5 px; still and 3 px/frame videos, 1 of 4 moving
    moving, still = translated(3, frames=16), translated(0, frames=16)
    videos = np.stack([np.stack([moving, still]), np.stack([still, still])])
    path = save_videos(tmp_path / "v.npz", videos, fps=8.0)
    out = tmp_path / "out"
    argv = [path, "--out", str(out), "--set", f"raft_weights={RAFT_WEIGHTS}"]
    code, err = run([*argv, "--set", "dynamic_degree=true"], capsys)
    assert code == 0, err
    row = json.loads((out / "results.json").read_text())["models"][0]
    assert row["metrics"]["dynamic_degree"]["mean"] == 25.0


# --- wrong inputs: one line naming the file -------------------------------------------------


def _mp4(path, frames=3, size=16):
    video = torch.rand(frames, size, size, 3, generator=torch.Generator().manual_seed(0))
    return media.write_mp4(video, path)


def _one_frame(folder):
    for s in range(2):
        _mp4(folder / f"c0_s{s}.mp4", frames=1)
    return folder / "c0_s0.mp4"


def _two_sizes(folder):
    _mp4(folder / "c0_s0.mp4")
    _mp4(folder / "c0_s1.mp4", size=32)
    return folder / "c0_s1.mp4"


def _corrupt(folder):
    _mp4(folder / "c0_s0.mp4")
    (folder / "c0_s1.mp4").write_bytes(b"not a video" * 100)
    return folder / "c0_s1.mp4"


def _misnamed(folder):
    _mp4(folder / "c0_s0.mp4")
    _mp4(folder / "video_1.mp4")
    return folder / "video_1.mp4"


def _missing_pair(folder):
    for c, s in [(0, 0), (0, 1), (1, 1)]:
        _mp4(folder / f"c{c:04d}_s{s}.mp4")
    return folder / "c0001_s0.mp4"


def _no_videos(folder):
    (folder / "c0_s0.png").write_bytes(b"")
    return folder


def _more_frames(folder):
    _mp4(folder / "c0_s0.mp4", frames=3)
    _mp4(folder / "c0_s1.mp4", frames=4)
    return folder / "c0_s1.mp4"


def _single_seed(folder):
    _mp4(folder / "c0_s0.mp4")
    _mp4(folder / "c1_s0.mp4")
    return folder


@pytest.mark.parametrize(
    "make, message",
    [
        (_no_videos, "no video files"),
        (_two_sizes, "frames of 32x32, but this model's first video has 16x16"),
        (_more_frames, "4 frames, but this model's first video has 3"),
        (_one_frame, "1 frame; optical flow needs at least 2"),
        (_corrupt, "is not a video ffmpeg can read"),
        (_misnamed, "must be named c{condition}_s{seed}.mp4"),
        (_missing_pair, "missing"),
        (_single_seed, "one seed per condition"),
    ],
)
def test_wrong_video_folders_are_one_line_naming_the_file(tmp_path, capsys, make, message):
    folder = tmp_path / "videos"
    folder.mkdir()
    named = make(folder)
    code, err = run([str(folder), "--out", str(tmp_path / "out")], capsys)
    errors = [line for line in err.splitlines() if "evaluate: error:" in line]
    assert code == 2 and len(errors) == 1, err  # after argparse's usage and progress bars
    assert message in errors[0] and str(named) in errors[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "videos, extra, message",
    [
        (np.zeros((1, 2, 1, 1, 8, 8)), {}, "1 frame; optical flow needs at least 2"),
        (np.zeros((1, 1, 1, 3, 8, 8)), {}, "at least 2 seeds"),
        (np.zeros((1, 2, 2, 3, 8, 8)), {}, "need C = 1 or 3"),
        (np.full((1, 2, 1, 3, 8, 8), np.nan), {}, "NaN"),
        (np.zeros((1, 2, 1, 3, 8, 8)), {"fps": -1.0}, "fps must be > 0"),
        (np.zeros((1, 2, 1, 3, 8, 8)), {"colour": 1}, "unknown keys ['colour']"),
    ],
)
def test_wrong_video_sample_files(tmp_path, capsys, videos, extra, message):
    path = save_videos(tmp_path / "bad.npz", videos, **extra)
    code, err = run([path, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and "bad.npz" in err, err
    assert "Traceback" not in err


def test_videos_and_images_are_not_mixed(tmp_path, capsys):
    videos = save_videos(tmp_path / "v.npz", np.zeros((1, 2, 1, 3, 8, 8)))
    np.savez(tmp_path / "i.npz", samples=np.zeros((1, 2, 1, 8, 8)))
    code, err = run([videos, str(tmp_path / "i.npz"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "mix images and videos" in err

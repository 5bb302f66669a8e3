"""Real latents: the latent set format (data/real_data.py) and how real videos and images become
latents (data/real_encoding.py): captions beside the files or the prompt file's order, clips
resampled to the fps, cut, covered and centre-cropped, and the pipeline's own VAE encoding."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.data import real_encoding
from phased_dmd_mp.data.real_data import LatentSet, real_data_dir, write_latent_set


def write_video(path, frames, size=(32, 16), fps=8.0, value=lambda i: 12 * i):
    """A clip whose frame i is uniformly value(i) (so a frame's mean names its index)."""
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(str(path), size, fps=fps, macro_block_size=16)
    writer.send(None)
    for i in range(frames):
        writer.send(np.full((size[1], size[0], 3), value(i), np.uint8).tobytes())
    writer.close()
    return path


def test_latent_set_reads_back_any_rows_with_their_conditions(tmp_path):
    latents = torch.randn(10, 2, 1, 4, 4)
    items = torch.arange(10) % 3
    written = write_latent_set(tmp_path / "real", latents, items, shard_items=4)
    assert len(written) == 10 and written.latent_shape == (2, 1, 4, 4)
    assert written.max_condition == 2
    got, got_items = LatentSet(tmp_path / "real").batch([9, 0, 5, 5])
    assert torch.equal(got, latents[[9, 0, 5, 5]]) and got_items.tolist() == [0, 0, 2, 2]
    with pytest.raises(ConfigError, match="already exists"):
        write_latent_set(tmp_path / "real", latents, items)
    with pytest.raises(ConfigError, match=r"holds latents \[2, 1, 4, 4\], the teacher's"):
        real_data_dir(str(tmp_path / "real"), tmp_path, (1, 1, 4, 4), "gan_weight")
    (tmp_path / "real" / "latents-00001.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="latents-00001.safetensors is missing or unreadable"):
        LatentSet(tmp_path / "real")


def test_captions_beside_every_file_or_none(tmp_path):
    for name in ("b.mp4", "a.mp4"):
        write_video(tmp_path / name, frames=2)
    assert real_encoding.gather(tmp_path, "video").captions is None
    (tmp_path / "a.txt").write_bytes("\ufeffa red ball\r\non the grass\r\n".encode())
    with pytest.raises(ConfigError, match="b.mp4 has no caption file b.txt"):
        real_encoding.gather(tmp_path, "video")
    (tmp_path / "b.txt").write_text("a dog\n")
    samples = real_encoding.gather(tmp_path, "video")
    assert [f.name for f in samples.files] == ["a.mp4", "b.mp4"]
    assert samples.captions == ("a red ball on the grass", "a dog")
    with pytest.raises(ConfigError, match="holds no image files"):
        real_encoding.gather(tmp_path, "image")


def test_clips_are_resampled_cut_covered_and_centre_cropped(tmp_path):
    # 30 fps, frame i of brightness 8 i: at 16 fps frames 0, 2, 4, 6, 8 of the source are shown
    clip = write_video(tmp_path / "c.mp4", 12, size=(48, 16), fps=30.0, value=lambda i: 8 * i)
    pixels = real_encoding.video_pixels(clip, height=8, width=8, frames=5, fps=16.0)
    assert pixels.shape == (3, 5, 8, 8) and pixels.dtype == torch.float32
    brightness = ((pixels.mean(dim=(0, 2, 3)) + 1) * 127.5).tolist()
    assert brightness == pytest.approx([0, 16, 32, 48, 64], abs=3)
    with pytest.raises(ConfigError, match="c.mp4 holds 12 frames at 30 fps: 9 frames at 16 fps"):
        real_encoding.video_pixels(clip, 8, 8, frames=9, fps=16.0)

    # a 6 x 2 image, left third black, middle white, right third black: covering 4 x 4 scales
    # it to 12 x 4 and the centre crop keeps the white middle
    stripes = np.zeros((2, 6, 3), np.uint8)
    stripes[:, 2:4] = 255
    Image.fromarray(stripes).save(tmp_path / "s.png")
    image = real_encoding.image_pixels(tmp_path / "s.png", height=4, width=4)
    assert image.shape == (3, 1, 4, 4)
    assert float(image[:, :, :, 1:3].mean()) == pytest.approx(1.0, abs=0.05)
    assert float(image.mean()) > 0.4


def test_latents_are_the_pipelines_own_vae_encoding(tiny_pipeline, tmp_path):
    """An image's latents equal the first latent frame of WanImageToVideoPipeline's own
    prepare_latents conditioning (the causal VAE encodes frame 0 alone), normalised alike."""
    from diffusers import WanImageToVideoPipeline

    from phased_dmd_mp.data.pipeline_folder import read_pipeline

    folder = tiny_pipeline("wan21_i2v")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(tmp_path / "f.png")
    pixels = real_encoding.image_pixels(tmp_path / "f.png", 16, 16)
    ours = real_encoding.LatentEncoder(folder, read_pipeline(folder).vae).encode(pixels[None])

    pipe = WanImageToVideoPipeline.from_pretrained(folder, dtype=torch.float32)
    processed = pipe.video_processor.preprocess(Image.open(tmp_path / "f.png"), 16, 16)
    _, condition = pipe.prepare_latents(
        processed, 1, pipe.vae.config.z_dim, 16, 16, 5, torch.float32, torch.device("cpu")
    )
    theirs = condition[:, 4:, :1]  # after the 4 mask channels: frame 0's latent
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_encoding_is_sharded_and_an_interrupted_run_resumes(tiny_pipeline, tmp_path, monkeypatch):
    """Three clips, one per shard: a crash in the third leaves two shards, a rerun encodes only
    the third and the set equals an uninterrupted one; other inputs are refused, naming them."""
    from phased_dmd_mp.data.pipeline_folder import read_pipeline

    pipe = read_pipeline(tiny_pipeline("wan22_t2v"))
    (tmp_path / "clips").mkdir()
    for i, name in enumerate(("a", "b", "c")):
        clip = tmp_path / "clips" / f"{name}.mp4"
        write_video(clip, 6, fps=16.0, value=lambda f, i=i: 30 * i + f)
    samples = real_encoding.gather(tmp_path / "clips", "video")
    args = (pipe, samples, [4, 5, 6], (16, 16, 5), 16.0, 1)
    straight = real_encoding.encode_real_data(tmp_path / "straight", *args, progress=False)

    encode, calls = real_encoding.LatentEncoder.encode, []

    def crash_on_third(self, pixels):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return encode(self, pixels)

    monkeypatch.setattr(real_encoding.LatentEncoder, "encode", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        real_encoding.encode_real_data(tmp_path / "resumed", *args, progress=False)
    partial = tmp_path / "resumed" / real_encoding.PARTIAL
    assert sorted(p.name for p in partial.glob("latents-*")) == [
        "latents-00000.safetensors", "latents-00001.safetensors"
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="was started with other height"):
        real_encoding.encode_real_data(
            tmp_path / "resumed", pipe, samples, [4, 5, 6], (8, 16, 5), 16.0, 1, progress=False
        )
    resumed = real_encoding.encode_real_data(tmp_path / "resumed", *args, progress=False)
    assert len(calls) == 4  # only the third clip again
    a, items = straight.batch([0, 1, 2])
    b, resumed_items = resumed.batch([0, 1, 2])
    assert torch.equal(a, b) and items.tolist() == resumed_items.tolist() == [4, 5, 6]
    assert a.shape == (3, 16, 2, 2, 2) and not partial.exists()


# --- prepare --videos / --images -------------------------------------------------------------


def prepare_args(pipeline, out, *extra):
    base = ["--pipeline", str(pipeline), "--out", str(out), "--batch-size", "2", "--no-progress"]
    return [*base, "--height", "16", "--width", "16", *extra]


def test_prepare_videos_with_captions_adds_items_and_feeds_the_real_critic(
    tiny_pipeline, tmp_path
):
    """Two prompts and three captioned clips of other sizes and rates: five condition items
    (the captions after the prompts, encoded as the pipeline encodes prompts), three latents
    with items 2, 3, 4 equal to the pipeline VAE's encoding of the clips as resampled, cut,
    covered and cropped; a distillation with the real-data critic and the GAN head runs on it."""
    from distill_helpers import run_distill

    from phased_dmd_mp import prepare
    from phased_dmd_mp.data.conditions import ConditionSet
    from phased_dmd_mp.data.encoders import ConditionEncoder
    from phased_dmd_mp.data.pipeline_folder import read_pipeline

    pipeline = tiny_pipeline("wan22_t2v")
    clips = tmp_path / "clips"
    clips.mkdir()
    for i, (size, fps) in enumerate([((32, 16), 8.0), ((24, 40), 30.0), ((16, 16), 16.0)]):
        write_video(clips / f"{i}.mp4", 24, size=size, fps=fps, value=lambda f, i=i: 20 * i + 5 * f)
        (clips / f"{i}.txt").write_text(["a red cat", "a dog", "blue ball in snow"][i])
    (tmp_path / "p.txt").write_text("a cat\nphoto\n")
    teacher = tmp_path / "teacher"
    args = ["--prompts", str(tmp_path / "p.txt"), "--videos", str(clips), "--frames", "5"]
    assert prepare.main(prepare_args(pipeline, teacher, *args)) == 0

    conditions, real = ConditionSet(teacher / "conditions"), LatentSet(teacher / "real_data")
    assert len(conditions) == 5 and len(real) == 3
    latents, items = real.batch([0, 1, 2])
    assert items.tolist() == [2, 3, 4]
    pipe = read_pipeline(pipeline)
    encoder = ConditionEncoder(pipe, torch.bfloat16, torch.device("cpu"))  # prepare's default
    (caption,) = encoder.text(["a red cat"])  # its real tokens; the set pads them with zeros
    text = conditions.batch([2]).text[0]
    torch.testing.assert_close(text[: len(caption)], caption, rtol=0, atol=0)
    assert not text[len(caption) :].any()
    pixels = real_encoding.video_pixels(clips / "1.mp4", 16, 16, 5, 16.0)
    expected = real_encoding.LatentEncoder(pipeline, pipe.vae).encode(pixels[None])
    torch.testing.assert_close(latents[1:2], expected)

    run = tmp_path / "run"
    levers = ["real_critic_weight=0.1", "gan_weight=0.03", "iterations_per_phase=1"]
    assert run_distill(run, teacher, "batch_size=2", *levers) == 0
    history = {key for entry in json.loads((run / "history.json").read_text()) for key in entry}
    assert {"real_critic_loss", "gan_discriminator_loss"} <= history


def test_prepare_i2v_clips_by_prompt_order_condition_on_their_own_first_frames(
    tiny_pipeline, tmp_path, capsys
):
    """Clips without captions go with the prompt file's lines in sorted order; an I2V item's
    first frame is its clip's, covered and cropped as the latent's; counts that differ, or
    first frames given besides, are one line."""
    from phased_dmd_mp import prepare
    from phased_dmd_mp.data.conditions import ConditionSet
    from phased_dmd_mp.data.encoders import ConditionEncoder
    from phased_dmd_mp.data.pipeline_folder import read_pipeline

    pipeline = tiny_pipeline("wan21_i2v")
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("b", "a"):
        write_video(clips / f"{name}.mp4", 8, size=(48, 16), fps=16.0, value=lambda f: 60 + f)
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    teacher = tmp_path / "teacher"
    args = ["--prompts", str(tmp_path / "p.txt"), "--videos", str(clips), "--frames", "5"]
    assert prepare.main(prepare_args(pipeline, teacher, *args)) == 0
    conditions = ConditionSet(teacher / "conditions")
    _, items = LatentSet(teacher / "real_data").batch([0, 1])
    assert items.tolist() == [0, 1]
    encoder = ConditionEncoder(
        read_pipeline(pipeline), torch.bfloat16, torch.device("cpu"), size=(16, 16, 5)
    )
    own = encoder.image([clips / "a.mp4"])["image_latents"]
    torch.testing.assert_close(conditions.batch([0]).image_latents, own)

    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    with pytest.raises(SystemExit):
        bad = ["--prompts", str(tmp_path / "three.txt"), "--videos", str(clips), "--frames", "5"]
        prepare.main(prepare_args(pipeline, tmp_path / "t2", *bad))
    err = capsys.readouterr().err
    assert "holds 2 video files without caption files" in err and "holds 3 prompts" in err
    with pytest.raises(SystemExit):
        prepare.main(prepare_args(pipeline, tmp_path / "t3", *args, "--images", str(clips)))
    assert "the first frames are the --videos clips' own" in capsys.readouterr().err


def test_prepare_qwen_image_real_images_are_latents_on_the_teachers_grid(
    tiny_pipeline, tmp_path, capsys
):
    from phased_dmd_mp import prepare
    from phased_dmd_mp.data.teacher import read_spec

    pipeline = tiny_pipeline("qwen_image")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        pixels = rng.integers(0, 256, (20 + 4 * i, 24, 3), np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a cat {i}")
    assert prepare.main(prepare_args(pipeline, tmp_path / "teacher", "--images", str(images))) == 0
    real = LatentSet(tmp_path / "teacher" / "real_data")
    assert real.latent_shape == read_spec(tmp_path / "teacher").latent_shape and len(real) == 3
    with pytest.raises(SystemExit):
        prepare.main(prepare_args(pipeline, tmp_path / "t2", "--videos", str(images)))
    assert "QwenImagePipeline makes images; give real images with --images" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("kind", ["truncated", "short"])
def test_prepare_refuses_a_bad_clip_before_any_model_loads(
    tiny_pipeline, tmp_path, monkeypatch, capsys, kind
):
    """A damaged clip or one too short for --frames among good ones is one line naming it
    before the text encoder or the VAE loads and before anything is written. Was: found only
    after the pipeline loaded and every condition was encoded (hours at real scale)."""
    from phased_dmd_mp import prepare

    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before the clips were checked")

    monkeypatch.setattr(prepare, "ConditionEncoder", no_model)
    clips = tmp_path / "clips"
    clips.mkdir()
    write_video(clips / "0.mp4", 16)
    bad = clips / "1.mp4"
    if kind == "truncated":
        data = write_video(tmp_path / "whole.mp4", 16).read_bytes()
        bad.write_bytes(data[: len(data) // 3])
    else:
        write_video(bad, 2)  # 5 frames at 16 fps from 8 fps take source frames 0-2
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    teacher = tmp_path / "teacher"
    args = ["--prompts", str(tmp_path / "p.txt"), "--videos", str(clips), "--frames", "5"]
    with pytest.raises(SystemExit) as exit_:
        prepare.main(prepare_args(tiny_pipeline("wan22_t2v"), teacher, *args))
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(bad) in error, error
    assert ("holds 2 frames" in error) == (kind == "short"), error
    assert not teacher.exists()

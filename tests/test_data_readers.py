"""data/readers.py: each kind of user input decoded the way the user means it, and every bad
input one line naming the file (and line). The inputs are the ones public bug reports in this
field name: BOM'd and CRLF prompt files, TABs in prompts, 16-bit greyscale PNGs, transparent and
CMYK images, rotated photos, truncated files, HTML pages saved as .png, broken videos, NaN
embeddings."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.data import readers
from phased_dmd_mp.data.condition_writer import ConditionSetWriter, write_condition_set
from phased_dmd_mp.data.conditions import ConditionSet

# --- prompt files ----------------------------------------------------------------------------


def test_bom_crlf_and_blank_lines_are_what_a_user_means(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa red cat\r\n\r\n  a dog  \r\n\t\r\nlast\r".encode())
    prompts = readers.read_prompt_file(path)
    assert [(p.text, p.line) for p in prompts] == [("a red cat", 1), ("a dog", 3), ("last", 5)]
    # UTF-16 with its BOM (Windows' "Unicode") reads the same
    path.write_bytes("a red cat\r\na dog\r\n".encode("utf-16"))
    assert [p.text for p in readers.read_prompt_file(path)] == ["a red cat", "a dog"]


def test_a_tab_in_a_text_to_video_prompt_is_text(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\tin the rain\nsunset\n")
    prompts = readers.read_prompt_file(path, images=False)
    assert [p.text for p in prompts] == ["a cat\tin the rain", "sunset"]
    assert all(p.image is None for p in prompts)
    # an image-to-video prompt file handed to a text-to-video pipeline is refused
    path.write_text("cat.png\ta cat\n")
    with pytest.raises(ConfigError, match=r"prompts.txt:1: starts with an image name"):
        readers.read_prompt_file(path, images=False)
    # for image-to-video the same line names its first frame
    (prompt,) = readers.read_prompt_file(path, images=True)
    assert (prompt.image, prompt.text) == ("cat.png", "a cat")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"fine\nbad \xff byte\n", r"p.txt:2: byte 0xff at column 5 is not UTF-8"),
        (b"", r"holds no prompts"),
        (b"\n  \n", r"holds no prompts"),
        ("a\x00b".encode(), r"p.txt:1: holds a NUL character"),
    ],
)
def test_bad_prompt_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "p.txt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        readers.read_prompt_file(path)


def test_i2v_lines_name_every_image_or_none(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(folder / name)
    path = tmp_path / "p.txt"
    path.write_text("b.png\tfirst\na.png\tsecond\n")
    files = readers.match_images(readers.read_prompt_file(path, images=True), folder, path)
    assert [f.name for f in files] == ["b.png", "a.png"]
    path.write_text("b.png\tfirst\nsecond\n")
    with pytest.raises(ConfigError, match=r"p.txt:2: names no image"):
        readers.match_images(readers.read_prompt_file(path, images=True), folder, path)
    path.write_text("b.png\tfirst\nc.png\tsecond\n")
    with pytest.raises(ConfigError, match=r"p.txt:2: image .*c.png does not exist"):
        readers.match_images(readers.read_prompt_file(path, images=True), folder, path)


# --- images ----------------------------------------------------------------------------------


def pixels(path):
    return np.asarray(readers.read_image(path))


def test_16_bit_greyscale_is_scaled_not_clamped(tmp_path):
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")  # Pillow reads it back as I;16
    with Image.open(tmp_path / "grey16.png") as raw:
        assert raw.mode == "I;16"
        clamped = np.asarray(raw.convert("RGB"))
    assert (clamped == 255).mean() > 0.99  # the bug: Pillow's convert clamps to white
    got = pixels(tmp_path / "grey16.png")
    expected = np.round(ramp * (255 / 65535)).astype(np.uint8)
    assert got.dtype == np.uint8 and got.shape == (32, 32, 3)
    np.testing.assert_array_equal(got[..., 0], expected)
    np.testing.assert_array_equal(got[..., 1], got[..., 2])
    big_endian = Image.frombytes("I;16B", (32, 32), ramp.astype(">u2").tobytes())
    big_endian.save(tmp_path / "grey16b.tif")
    np.testing.assert_array_equal(pixels(tmp_path / "grey16b.tif")[..., 0], expected)


def test_alpha_is_composited_over_white_and_palettes_converted(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 255, 0)  # fully transparent blue: white
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black: grey
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = pixels(tmp_path / "rgba.png")
    assert got[0, 0].tolist() == [255, 0, 0] and got[0, 1].tolist() == [255, 255, 255]
    assert abs(int(got[1, 0, 0]) - 127) <= 1
    Image.fromarray(rgba, "RGBA").convert("LA").save(tmp_path / "la.png")
    assert pixels(tmp_path / "la.png")[0, 1].tolist() == [255, 255, 255]
    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.save(tmp_path / "p.png", transparency=palette.getpixel((1, 0)))  # (x, y): blue
    assert pixels(tmp_path / "p.png")[0, 1].tolist() == [255, 255, 255]
    Image.fromarray(rgba[..., :3]).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    cmyk = pixels(tmp_path / "cmyk.jpg")
    assert cmyk.shape == (2, 2, 3) and cmyk[0, 0, 0] > 200 and cmyk[0, 0, 1] < 60


def test_exif_orientation_is_applied(tmp_path):
    wide = np.zeros((2, 6, 3), np.uint8)
    wide[:, 0] = 255  # a white left column
    image = Image.fromarray(wide)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "photo.jpg", exif=exif, quality=100)
    got = pixels(tmp_path / "photo.jpg")
    assert got.shape == (6, 2, 3)  # displayed upright, as the user sees it
    assert got[0].mean() > 200  # the left column is now the top row


@pytest.mark.parametrize("kind", ["html", "truncated", "empty", "text", "missing", "float"])
def test_bad_images_are_one_line_naming_the_file(tmp_path, kind):
    path = tmp_path / "frame.png"
    if kind == "html":
        path.write_text("<!DOCTYPE html>\n<html><body>Access denied</body></html>\n")
    elif kind == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
            buffer, "PNG"
        )
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not an image at all")
    elif kind == "float":
        path = tmp_path / "frame.tif"
        Image.new("F", (4, 4), 0.5).save(path)
    message = {
        "html": "is an HTML/XML page, not an image",
        "truncated": "is truncated or damaged",
        "empty": "is empty, not an image",
        "text": "is not an image Pillow can read",
        "missing": "does not exist",
        "float": "floating-point image",
    }[kind]
    with pytest.raises(ConfigError) as error:
        readers.read_image(path)
    assert str(path) in str(error.value) and message in str(error.value)
    assert "\n" not in str(error.value) and "damaged (" + message not in str(error.value)
    with pytest.raises(ConfigError, match=message):
        readers.check_images([path], progress=False)


# --- videos ----------------------------------------------------------------------------------


def write_video(path, frames=5, size=(32, 16), fps=8):
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(str(path), size, fps=fps, macro_block_size=16)
    writer.send(None)
    for i in range(frames):
        writer.send(np.full((size[1], size[0], 3), 40 * i, np.uint8).tobytes())
    writer.close()
    return path


def test_video_frames_stream_with_fps_size_and_count(tmp_path):
    video = readers.VideoReader(write_video(tmp_path / "clip.mp4"))
    assert (video.fps, video.size, video.frame_count) == (8.0, (16, 32), 5)
    assert math.isclose(video.duration, 5 / 8, abs_tol=0.1)
    frames = list(video)
    assert len(frames) == 5 and all(f.dtype == np.uint8 and f.shape == (16, 32, 3) for f in frames)
    assert [round(float(f.mean())) for f in frames] == pytest.approx([0, 40, 80, 120, 160], abs=3)


@pytest.mark.parametrize("kind", ["html", "truncated", "empty", "missing"])
def test_bad_videos_are_one_line_naming_the_file(tmp_path, kind):
    path = tmp_path / "clip.mp4"
    if kind == "html":
        path.write_text("<html><body>404</body></html>")
    elif kind == "truncated":
        data = write_video(tmp_path / "whole.mp4").read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "empty":
        path.write_bytes(b"")
    with pytest.raises(ConfigError) as error:
        list(readers.VideoReader(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


# --- condition sets --------------------------------------------------------------------------


def test_writer_refuses_a_nonfinite_condition_naming_it(tmp_path):
    text = torch.randn(5, 3, 4)
    text[3, 1, 2] = float("nan")
    with pytest.raises(ConfigError, match=r"condition 3: NaN/Inf in text"):
        with ConditionSetWriter(tmp_path / "set", {"text": torch.zeros(3, 4)}) as writer:
            writer.add(text=text[:2])
            writer.add(text=text[2:])  # item 3 of the set is row 1 of this batch
    assert not (tmp_path / "set").exists() and not list(tmp_path.iterdir())
    with pytest.raises(ConfigError, match=r"unconditional entry has NaN/Inf in text"):
        ConditionSetWriter(tmp_path / "set", {"text": torch.full((3, 4), float("inf"))})


def test_check_finite_names_the_condition_of_a_set_written_elsewhere(tmp_path):
    conditions = write_condition_set(
        tmp_path / "set", {"text": torch.randn(6, 3, 4)}, {"text": torch.zeros(3, 4)}
    )
    readers.check_finite(conditions)  # finite
    # a set made by other code: same format, no `finite` record, a NaN in item 4
    from safetensors.torch import load_file, save_file

    shard = tmp_path / "set" / "items-000000000-000000006.safetensors"
    tensors = load_file(shard)
    tensors["text"][4, 0, 0] = float("-inf")
    save_file(tensors, shard)
    with pytest.raises(ConfigError, match=r"set: condition 4: NaN/Inf in text"):
        readers.check_finite(ConditionSet(tmp_path / "set"), rows_per_read=4)


def test_every_bad_image_is_named_in_one_line(tmp_path):
    """Three bad first frames among good ones: one error naming all three (the first with its
    reason), so one rerun fixes them. Was: the first only, one rerun per bad file, each after
    every image was decoded again."""
    good = tmp_path / "good.png"
    Image.new("RGB", (4, 4)).save(good)
    bad = [tmp_path / f"bad{i}.png" for i in range(3)]
    for path in bad:
        path.write_text("<html><body>404</body></html>")
    with pytest.raises(ConfigError) as error:
        readers.check_images([good, *bad], progress=False)
    message = str(error.value)
    assert message.startswith(f"3 images cannot be read: {bad[0]} is an HTML/XML page"), message
    assert message.endswith(f"; also {bad[1]}, {bad[2]}") and "\n" not in message, message

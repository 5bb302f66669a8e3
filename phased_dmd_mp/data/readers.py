"""One reader per kind of file a user hands in: prompt files, images, videos, condition sets.

Each decodes its input the way the user means it and turns every problem into one line naming
the file (and line), a `phased_dmd_mp.config.ConfigError` the CLIs print instead of a traceback.
Callers read every input through them before any model loads (prepare checks all prompts and
all first frames up front). Configs are config.py's; what the files mean is documented in the
README's "Distill your own model".

Prompt files (`read_prompt_file`): UTF-8 with or without a byte-order mark (UTF-16 with one),
LF, CRLF or CR line ends, one prompt per line, surrounding whitespace stripped, blank lines
skipped. For image-to-video (`images=True`) a line `IMAGE<TAB>prompt` names its first frame.
Otherwise a TAB is part of the prompt (the text encoders read it as a space), except that a
line whose text before the first TAB is an image file name is refused: an image-to-video
prompt file given to a pipeline that takes no images.

Images (`read_image`): Pillow, as an 8-bit RGB image: EXIF orientation applied; 16-bit
greyscale (I;16, I;16B, 32-bit I) scaled by 255/65535 (Pillow's convert would clamp it to
white); palette, greyscale and bilevel converted; transparency composited over white; CMYK
converted through its ICC profile when it has one; animated files give their first frame.
Non-images (an HTML page saved as .png), truncated and unreadable files are one line.

Videos (`VideoReader`): imageio's ffmpeg (imageio-ffmpeg), streamed: RGB uint8 frames [H, W, 3]
one at a time, with fps and size from the header and an exact frame count on request.

Condition sets (`check_finite`, `nonfinite_items`): every float tensor of every item finite,
naming the first item that is not (its index, and its prompt where the caller knows it).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from phased_dmd_mp.config import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
_BOMS = {b"\xef\xbb\xbf": "utf-8-sig", b"\xff\xfe": "utf-16", b"\xfe\xff": "utf-16"}
_HTML_STARTS = (b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body", b"<!--")
WHITE = (255, 255, 255)


# --- prompt files ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One prompt of a prompt file: its text, its 1-based line and, for image-to-video, the
    first-frame file name the line gives (None: by order)."""

    text: str
    line: int
    image: str | None = None


def _decode_text(path: Path, data: bytes) -> str:
    """The file's text: UTF-8 (a BOM stripped), or UTF-16 with its BOM. Undecodable bytes are
    one line naming file:line:column."""
    for bom, codec in _BOMS.items():
        if data.startswith(bom):
            encoding = codec
            break
    else:
        encoding = "utf-8"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        start = error.start + (3 if encoding == "utf-8-sig" else 0)
        if encoding == "utf-16":
            raise ConfigError(f"{path}: not valid UTF-16 text ({error.reason})") from None
        line = data[:start].count(b"\n") + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise ConfigError(
            f"{path}:{line}: byte 0x{data[start]:02x} at column {column} is not UTF-8; save the "
            "file as UTF-8"
        ) from None


def read_prompt_file(path: str | Path, *, images: bool = False) -> list[Prompt]:
    """The prompts of a text file (module docstring). `images`: the pipeline takes first
    frames, so `IMAGE<TAB>prompt` lines name them. Raises ConfigError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"prompt file {path} cannot be read ({error.strerror})") from None
    text = _decode_text(path, data).replace("\r\n", "\n").replace("\r", "\n")
    prompts = []
    for number, line in enumerate(text.split("\n"), 1):
        if "\x00" in line:
            raise ConfigError(
                f"{path}:{number}: holds a NUL character (UTF-16 without a byte-order mark, or "
                "not a text file); save it as UTF-8"
            )
        if not line.strip():
            continue
        name, tab, rest = line.partition("\t")
        if tab and images:
            if not name.strip() or not rest.strip():
                raise ConfigError(
                    f"{path}:{number}: expected IMAGE<TAB>prompt, got {line.strip()!r}"
                )
            prompts.append(Prompt(rest.strip(), number, name.strip()))
            continue
        if tab and name.strip().lower().endswith(IMAGE_SUFFIXES):
            raise ConfigError(
                f"{path}:{number}: starts with an image name ({name.strip()!r} then a TAB), but "
                "this pipeline takes no images; remove the names or use an image-to-video "
                "pipeline"
            )
        prompts.append(Prompt(line.strip(), number))
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return prompts


def match_images(prompts: Sequence[Prompt], folder: str | Path, prompt_file: Path) -> list[Path]:
    """The first-frame file of each prompt: by the name its line gives, otherwise the folder's
    images in sorted order, one per prompt. Raises ConfigError naming the line or the counts."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--images {folder} is not a directory")
    named = [p for p in prompts if p.image is not None]
    if named:
        if len(named) != len(prompts):
            unnamed = next(p for p in prompts if p.image is None)
            raise ConfigError(
                f"{prompt_file}:{unnamed.line}: names no image (IMAGE<TAB>prompt) while other "
                "lines do; name one on every line or on none"
            )
        files = [folder / p.image for p in prompts]
        for prompt, file in zip(prompts, files):
            if not file.is_file():
                raise ConfigError(f"{prompt_file}:{prompt.line}: image {file} does not exist")
        return files
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) != len(prompts):
        raise ConfigError(f"{folder} holds {len(files)} images for {len(prompts)} prompts")
    return files


# --- images ----------------------------------------------------------------------------------


def _not_an_image(path: Path) -> ConfigError:
    with open(path, "rb") as file:
        head = file.read(512).lstrip().lower()
    if head.startswith(_HTML_STARTS):
        return ConfigError(
            f"{path} is an HTML/XML page, not an image (saved from a browser? download the "
            "image itself)"
        )
    if not head:
        return ConfigError(f"{path} is empty, not an image")
    return ConfigError(f"{path} is not an image Pillow can read")


def _to_rgb(image, path: Path):
    """An 8-bit RGB copy of a decoded Pillow image (module docstring)."""
    from PIL import Image, ImageCms

    mode = image.mode
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I (32-bit)
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ConfigError(
                f"{path} is a 32-bit integer image with values in [{values.min()}, "
                f"{values.max()}], outside 16 bits; save it as an 8- or 16-bit image"
            )
        grey = np.round(values * (255 / 65535)).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        raise ConfigError(
            f"{path} is a floating-point image (mode F), which has no standard range; save it "
            "as an 8- or 16-bit image"
        )
    if mode == "CMYK" and image.info.get("icc_profile"):
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
            return ImageCms.profileToProfile(
                image, source, ImageCms.createProfile("sRGB"), outputMode="RGB"
            )
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken profile: the plain conversion below
    if (mode == "P" and "transparency" in image.info) or mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, WHITE)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def read_image(path: str | Path):
    """The image at `path` as an 8-bit RGB `PIL.Image.Image` (module docstring), the input of
    diffusers' image and video processors. Raises ConfigError naming the file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"image {path} does not exist")
    try:
        with Image.open(path) as opened:
            opened.seek(0)  # animated GIF/WebP, multi-page TIFF: the first frame
            opened.load()  # decodes it all: truncation shows here
            image = ImageOps.exif_transpose(opened)
            return _to_rgb(image, path)
    except ConfigError:
        raise
    except UnidentifiedImageError:
        raise _not_an_image(path) from None
    except Image.DecompressionBombError as error:
        raise ConfigError(f"{path}: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        reason = str(error) or type(error).__name__
        raise ConfigError(f"{path} is truncated or damaged ({reason})") from None


def check_images(paths: Sequence[Path], progress: bool = True) -> None:
    """Decode every image (threads; Pillow decodes without the GIL) and raise, after all are
    read, the ConfigError of the first, in order, that `read_image` refuses, naming the other
    refused files too (one rerun fixes them all, not one rerun per bad file)."""
    from tqdm import tqdm

    if not paths:
        return
    workers = min(8, os.cpu_count() or 1, len(paths))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = pool.map(_image_error, paths)
        bad = [
            (path, error)
            for path, error in zip(
                paths,
                tqdm(results, total=len(paths), desc="checking images", unit="image",
                     disable=not progress),
            )
            if error is not None
        ]  # fmt: skip
    if len(bad) == 1:
        raise bad[0][1]
    if bad:
        others = ", ".join(str(path) for path, _ in bad[1:6]) + (", ..." if len(bad) > 6 else "")
        raise ConfigError(f"{len(bad)} images cannot be read: {bad[0][1]}; also {others}")


def _image_error(path: Path) -> ConfigError | None:
    try:
        read_image(path)
    except ConfigError as error:
        return error
    return None


# --- videos ----------------------------------------------------------------------------------


def _ffmpeg_reason(error: Exception) -> str:
    """The last line ffmpeg printed (its reason), not imageio-ffmpeg's whole log."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith(("===", "ffmpeg version", "built with", "configuration:", "lib")):
            return line[:200]
    return type(error).__name__


class VideoReader:
    """A video file, decoded by ffmpeg (imageio-ffmpeg) and streamed frame by frame.

        video = VideoReader("clip.mp4")        # reads the header: fps, size
        for frame in video:                    # np.uint8 [H, W, 3], RGB, one at a time
            ...

    Rotation metadata is applied (ffmpeg's autorotate); 10-bit and other pixel formats are
    converted by ffmpeg to 8-bit RGB. Raises ConfigError naming the file for a missing, corrupt
    or empty video, also when iteration stops early on damaged data."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"video {self.path} does not exist")
        frames = self._frames()
        self._header = next(frames)
        frames.close()
        self.fps: float = float(self._header["fps"])
        self.width, self.height = (int(d) for d in self._header["size"])
        self._frame_count: int | None = None

    def _frames(self):
        import imageio_ffmpeg

        try:
            generator = imageio_ffmpeg.read_frames(str(self.path), pix_fmt="rgb24")
            header = next(generator)
        except (OSError, RuntimeError, StopIteration) as error:
            raise ConfigError(
                f"{self.path} is not a video ffmpeg can read ({_ffmpeg_reason(error)})"
            ) from None
        yield header
        yield from generator

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the frames, in pixels."""
        return self.height, self.width

    @property
    def duration(self) -> float:
        """Seconds, from the header (0 when it gives none)."""
        value = self._header.get("duration") or 0.0
        return float(value) if math.isfinite(float(value)) else 0.0

    @property
    def frame_count(self) -> int:
        """The exact number of frames (decodes the stream once, without converting to RGB)."""
        if self._frame_count is None:
            import imageio_ffmpeg

            try:
                self._frame_count = int(imageio_ffmpeg.count_frames_and_secs(str(self.path))[0])
            except (OSError, RuntimeError) as error:
                raise ConfigError(
                    f"{self.path}: ffmpeg cannot count its frames ({_ffmpeg_reason(error)})"
                ) from None
            if self._frame_count == 0:
                raise ConfigError(f"{self.path} holds no video frames")
        return self._frame_count

    def __iter__(self) -> Iterator[np.ndarray]:
        frames = self._frames()
        next(frames)
        shape = (self.height, self.width, 3)
        count = 0
        try:
            for raw in frames:
                if len(raw) != math.prod(shape):
                    raise ConfigError(
                        f"{self.path}: frame {count} has {len(raw)} bytes, not {shape} RGB"
                    )
                count += 1
                yield np.frombuffer(raw, np.uint8).reshape(shape)
        except (OSError, RuntimeError) as error:
            raise ConfigError(
                f"{self.path}: ffmpeg failed after {count} frames ({_ffmpeg_reason(error)})"
            ) from None
        finally:
            frames.close()
        if count == 0:
            raise ConfigError(f"{self.path} holds no video frames")


# --- condition sets --------------------------------------------------------------------------


def nonfinite_items(tensors: Mapping[str, torch.Tensor]) -> dict[int, list[str]]:
    """{row: names of the float tensors with NaN/Inf in that row} of a batch of items, each
    tensor [n, ...] (empty: all finite)."""
    bad: dict[int, list[str]] = {}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        nonfinite = ~torch.isfinite(tensor)
        rows = nonfinite.flatten(1).any(1) if tensor.ndim > 1 else nonfinite
        for row in torch.nonzero(rows).flatten().tolist():
            bad.setdefault(row, []).append(name)
    return bad


def describe_nonfinite(bad: Mapping[int, Sequence[str]]) -> str:
    """'condition 17: NaN/Inf in text' for the first bad items (at most 3) of
    {index: tensor names}."""
    parts = [f"condition {index}: NaN/Inf in {', '.join(bad[index])}" for index in sorted(bad)[:3]]
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return "; ".join(parts) + more


def check_finite(conditions, rows_per_read: int = 256, progress: bool = False) -> None:
    """Raise ConfigError unless every float tensor of every item (and the unconditional entry)
    of the ConditionSet `conditions` is finite; the message names the set, the first bad items
    and their tensors. Reads the whole set, `rows_per_read` items at a time."""
    from tqdm import tqdm

    count = len(conditions)
    for start in tqdm(
        range(0, count, rows_per_read), desc="checking conditions", disable=not progress
    ):
        batch = conditions.batch(range(start, min(count, start + rows_per_read)))
        if start == 0:
            uncond = conditions.uncond(1, like=batch.select(torch.arange(1)))
            bad = nonfinite_items(condition_tensors(uncond))
            if bad:
                raise ConfigError(
                    f"condition set {conditions.path}: its unconditional entry has NaN/Inf in "
                    f"{', '.join(bad[0])}"
                )
        bad = nonfinite_items(condition_tensors(batch))
        if bad:
            found = {start + row: names for row, names in bad.items()}
            raise ConfigError(
                f"condition set {conditions.path}: {describe_nonfinite(found)}; re-encode "
                "those prompts (a text encoder in float16 overflows to NaN/Inf)"
            )


def condition_tensors(conditions) -> dict[str, torch.Tensor]:
    """The tensors of a `conditioning.Conditions` batch, by field name."""
    return {
        field.name: value
        for field in dataclasses.fields(conditions)
        if isinstance(value := getattr(conditions, field.name), torch.Tensor)
    }

"""Videos the evaluation reads: one model's videos, conditions x seeds, frames read in a stream.

Two kinds of input:
- a folder of video files named `c{condition}_s{seed}.mp4` (conditions and seeds counted from 0,
  any number of digits: what `python -m phased_dmd_mp.sample` writes to OUT/media/, or the
  videos of another trainer's student or of a stock diffusers pipeline saved under those names;
  .mp4, .mkv, .webm, .mov or .avi, anything the ffmpeg of imageio-ffmpeg decodes). Every (c, s)
  up to the largest must be there; frame rate from the files. The model is named after the
  folder (its parent's name for a folder called `media`), or NAME=FOLDER on the command line.
- a sample file (eval/samples.py) whose `samples` are videos [conditions, seeds, C, F, H, W]
  (C = 1 or 3), with the keys of image sample files plus an optional `fps` (default 16, Wan's).
  Its frames are read from the .npz member one video at a time, never the whole array.

All videos of one model must have the same frame count (at least 2) and size. Every problem is a
SampleFileError naming the file.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.data.readers import VideoReader
from phased_dmd_mp.eval.samples import SampleFileError
from phased_dmd_mp.media import VIDEO_FPS

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")
NAME_PATTERN = re.compile(r"c(\d+)_s(\d+)")
NPZ_KEYS = ("samples", "model", "labels", "value_range", "fps")


@dataclass(frozen=True)
class VideoSet:
    """One model's videos [conditions, seeds], each frames x C x height x width."""

    path: Path  # the folder or the .npz
    model: str
    conditions: int
    seeds: int
    frames: int
    channels: int
    height: int
    width: int
    fps: float
    labels: list[str] | None
    files: dict[tuple[int, int], Path] | None = None  # folder: (condition, seed) -> file
    value_range: tuple[float, float] = (-1.0, 1.0)  # npz: of the stored values

    kind = "videos"

    def name(self, condition: int, seed: int) -> str:
        """Where video (condition, seed) is, for messages."""
        if self.files is not None:
            return str(self.files[condition, seed])
        return f"{self.path} [condition {condition}, seed {seed}]"

    def frames_of(self, condition: int, seed: int) -> Iterator[Tensor]:
        """Video (condition, seed) frame by frame, each float32 [C, H, W] in [-1, 1]. Raises
        SampleFileError naming the file if a frame has another size or the count differs."""
        if self.files is not None:
            frames = (
                torch.from_numpy(frame.copy()).permute(2, 0, 1).float() / 127.5 - 1
                for frame in VideoReader(self.files[condition, seed])
            )
        else:
            frames = self._npz_frames(condition, seed)
        count = 0
        try:
            for frame in frames:
                if frame.shape[1:] != (self.height, self.width):
                    raise SampleFileError(
                        f"{self.name(condition, seed)}: frames of {frame.shape[1]}x"
                        f"{frame.shape[2]}, but this model's first video has "
                        f"{self.height}x{self.width}; one model's videos must share one size"
                    )
                count += 1
                yield frame
        except ConfigError as error:  # the reader's: a file ffmpeg cannot decode
            raise SampleFileError(str(error)) from None
        if count != self.frames:
            raise SampleFileError(
                f"{self.name(condition, seed)}: {count} frames, but this model's first video has "
                f"{self.frames}; one model's videos must have as many frames"
            )

    def _npz_frames(self, condition: int, seed: int) -> Iterator[Tensor]:
        video = _read_npz_video(self.path, condition, seed)  # [C, F, H, W]
        if not np.isfinite(video).all():
            raise SampleFileError(f"{self.name(condition, seed)}: NaN or infinite values")
        low, high = self.value_range
        for frame in torch.from_numpy(video.astype(np.float32)).unbind(1):
            yield (2 * (frame - low) / (high - low) - 1).clamp(-1, 1)


def _parse_name(path: Path) -> tuple[int, int]:
    match = NAME_PATTERN.fullmatch(path.stem)
    if match is None:
        raise SampleFileError(
            f"{path}: video files must be named c{{condition}}_s{{seed}}{path.suffix} (for "
            "example c0003_s1.mp4, as python -m phased_dmd_mp.sample writes them)"
        )
    return int(match.group(1)), int(match.group(2))


def open_video_folder(folder: Path, model: str | None = None) -> VideoSet:
    """The videos of a folder (see the module docstring); checks names and the first file."""
    if not folder.is_dir():
        raise SampleFileError(f"{folder}: no such folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not paths:
        raise SampleFileError(
            f"{folder}: no video files ({', '.join(VIDEO_SUFFIXES)}) in the folder"
        )
    files: dict[tuple[int, int], Path] = {}
    for path in paths:
        key = _parse_name(path)
        if key in files:
            raise SampleFileError(f"{path}: condition {key[0]} seed {key[1]} again ({files[key]})")
        files[key] = path
    conditions = 1 + max(c for c, _ in files)
    seeds = 1 + max(s for _, s in files)
    suffix = paths[0].suffix
    for c in range(conditions):
        for s in range(seeds):
            if (c, s) not in files:
                raise SampleFileError(
                    f"{folder / f'c{c:04d}_s{s}{suffix}'}: missing; the folder holds conditions "
                    f"0-{conditions - 1} x seeds 0-{seeds - 1} otherwise (every pair is needed)"
                )
    if seeds < 2:
        raise SampleFileError(
            f"{folder}: one seed per condition; diversity is measured over pairs of seeds"
        )
    first = files[0, 0]
    try:
        info = VideoReader(first)
        frames = info.frame_count
    except ConfigError as error:
        raise SampleFileError(str(error)) from None
    _check_frames(first, frames)
    name = model or (folder.resolve().parent.name if folder.name == "media" else folder.name)
    return VideoSet(
        path=folder,
        model=name,
        conditions=conditions,
        seeds=seeds,
        frames=frames,
        channels=3,
        height=info.height,
        width=info.width,
        fps=info.fps or float(VIDEO_FPS),
        labels=None,
        files=files,
    )


def _check_frames(where: Path | str, frames: int) -> None:
    if frames < 2:
        raise SampleFileError(
            f"{where}: {frames} frame; optical flow needs at least 2 (a still image is an "
            "image sample, not a video)"
        )


def _npy_member(archive: zipfile.ZipFile, key: str):
    name = f"{key}.npy"
    if name not in archive.namelist():
        return None
    return archive.open(name)


def _npy_header(member) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    return np.lib.format.read_array_header_2_0(member)


def npz_samples_shape(path: Path) -> tuple[int, ...] | None:
    """The shape of `samples` in a sample file, read from its header only (None if the file is
    not an .npz with a plain `samples` array; the image loader then reports why)."""
    try:
        with zipfile.ZipFile(path) as archive:
            member = _npy_member(archive, "samples")
            if member is None:
                return None
            with member:
                shape, _, dtype = _npy_header(member)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None
    return None if dtype.hasobject else tuple(shape)


def _read_npz_video(path: Path, condition: int, seed: int) -> np.ndarray:
    """One video [C, F, H, W] of the .npz's samples, read from its member by seeking."""
    with zipfile.ZipFile(path) as archive, archive.open("samples.npy") as member:
        shape, fortran_order, dtype = _npy_header(member)
        if fortran_order:  # not how numpy.savez writes; read whole (rare)
            return np.load(path)["samples"][condition, seed]
        video_shape = shape[2:]
        size = int(np.prod(video_shape)) * dtype.itemsize
        member.seek(member.tell() + (condition * shape[1] + seed) * size)
        data = member.read(size)
    if len(data) != size:
        raise SampleFileError(f"{path}: the samples array is truncated")
    return np.frombuffer(data, dtype=dtype).reshape(video_shape)


def open_video_npz(path: Path) -> VideoSet:
    """A sample file of videos [conditions, seeds, C, F, H, W] (module docstring)."""
    with np.load(path, allow_pickle=False) as data:
        unknown = sorted(set(data.files) - set(NPZ_KEYS))
        if unknown:
            raise SampleFileError(f"{path}: unknown keys {unknown}; known keys: {list(NPZ_KEYS)}")
        small = {key: data[key] for key in data.files if key != "samples"}
    with zipfile.ZipFile(path) as archive, archive.open("samples.npy") as member:
        shape, _, dtype = _npy_header(member)
    conditions, seeds, channels, frames, height, width = shape
    if dtype.kind not in "fiu":
        raise SampleFileError(f"{path}: samples must be numbers, got dtype {dtype}")
    if 0 in shape:
        raise SampleFileError(f"{path}: samples has an empty dimension: shape {shape}")
    if channels not in (1, 3):
        raise SampleFileError(
            f"{path}: videos [conditions, seeds, C, F, H, W] need C = 1 or 3, got shape {shape}"
        )
    if seeds < 2:
        raise SampleFileError(
            f"{path}: samples needs at least 2 seeds per condition for pairwise diversity, got "
            f"shape {shape}"
        )
    _check_frames(path, frames)
    value_range = small.get("value_range", np.array([-1.0, 1.0]))
    if value_range.shape != (2,) or not value_range[0] < value_range[1]:
        raise SampleFileError(f"{path}: value_range must be [low, high] with low < high")
    labels = small.get("labels")
    if labels is not None and labels.shape != (conditions,):
        raise SampleFileError(
            f"{path}: labels must be one per condition ({conditions}), got shape {labels.shape}"
        )
    fps = float(small.get("fps", VIDEO_FPS))
    if not fps > 0:
        raise SampleFileError(f"{path}: fps must be > 0, got {fps}")
    model = small.get("model")
    if model is not None and (model.ndim != 0 or model.dtype.kind != "U" or not str(model)):
        raise SampleFileError(f"{path}: model must be a non-empty string")
    return VideoSet(
        path=path,
        model=str(model) if model is not None else path.stem,
        conditions=conditions,
        seeds=seeds,
        frames=frames,
        channels=channels,
        height=height,
        width=width,
        fps=fps,
        labels=None if labels is None else [str(label) for label in labels],
        value_range=(float(value_range[0]), float(value_range[1])),
    )

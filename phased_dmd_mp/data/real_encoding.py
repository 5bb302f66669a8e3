"""Real videos and images into latents, as `python -m phased_dmd_mp.prepare --videos/--images`
feeds the real-data levers (data/real_data.py holds the latent set they land in).

What a user hands in: a folder of clips (`--videos`, Wan) or of images (`--images`, Qwen-Image;
Wan at --frames 1), each with its caption in a text file beside it (`clip.mp4` -> `clip.txt`,
read as data/readers.py reads a prompt file, its lines joined by spaces), or, without caption
files, the prompt file's lines in the files' sorted order. Every file is read through
data/readers.py (images: Pillow, 8-bit RGB; videos: ffmpeg, streamed frame by frame).

A sample becomes pixels the way a pipeline would generate them: a clip is resampled to `fps`
(frame i at i / fps seconds: the nearest source frame), cut to its first `frames` frames, each
frame scaled (bilinear, antialiased) to cover height x width and centre-cropped to it, values
mapped to [-1, 1] as diffusers' video processor does. `LatentEncoder` runs the pipeline's own
VAE (the `vae` folder's class) and normalises like its `prepare_latents`:
(mode of the posterior - latents_mean) / latents_std, giving [C, F', H', W'] latents on
teacher.yaml's grid.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.data import readers

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
CAPTION_SUFFIX = ".txt"


@dataclass(frozen=True)
class RealSamples:
    """The real samples of a prepare run: files (sorted), "video" or "image", and each one's
    caption, or None where the prompt file's lines go with the files in order."""

    files: tuple[Path, ...]
    kind: str
    captions: tuple[str, ...] | None


def gather(folder: Path, kind: str) -> RealSamples:
    """The videos or images in `folder` (not recursive) and their captions. Raises ConfigError
    for an empty folder or one where some files have a caption file and others not."""
    suffixes = VIDEO_SUFFIXES if kind == "video" else readers.IMAGE_SUFFIXES
    flag = "--videos" if kind == "video" else "--images"
    if not folder.is_dir():
        raise ConfigError(f"{flag} {folder} is not a directory")
    files = tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes))
    if not files:
        raise ConfigError(f"{flag} {folder} holds no {kind} files ({', '.join(suffixes)})")
    captioned = [f.with_suffix(CAPTION_SUFFIX).is_file() for f in files]
    if not any(captioned):
        return RealSamples(files, kind, None)
    if not all(captioned):
        missing = files[captioned.index(False)]
        raise ConfigError(
            f"{missing} has no caption file {missing.with_suffix(CAPTION_SUFFIX).name} while "
            f"other files in {folder} have one: caption every file, or none (then the prompt "
            "file's lines go with the files in sorted order)"
        )
    captions = []
    for file in files:
        lines = readers.read_prompt_file(file.with_suffix(CAPTION_SUFFIX))
        captions.append(" ".join(line.text for line in lines))
    return RealSamples(files, kind, tuple(captions))


def real_inputs(pipe, videos: Path | None, images: Path | None, frames: int) -> RealSamples | None:
    """The real samples prepare's --videos / --images name for this pipeline (None: none).
    --videos is for Wan pipelines; --images are real data for Qwen-Image and for Wan at
    --frames 1, but the first frames of a pipeline that takes them. Raises ConfigError."""
    if videos is not None:
        if not pipe.is_wan:
            raise ConfigError(f"--videos: {pipe.cls} makes images; give real images with --images")
        if images is not None and not pipe.takes_first_frames:
            raise ConfigError("give real data with --videos or with --images, not both")
        return gather(videos, "video")
    if images is None or pipe.takes_first_frames:
        return None
    if frames != 1:
        raise ConfigError(
            f"--images are single frames, {pipe.cls} generates --frames {frames}: give real "
            "clips with --videos (or --frames 1)"
        )
    return gather(images, "image")


def condition_items(samples: RealSamples, prompts: list, prompt_file: Path | None):
    """(prompts to add to the condition set, each sample's item in it): a captioned sample gets
    its caption as a new item after the prompt file's; otherwise sample i is line i. Raises
    ConfigError when the counts differ."""
    if samples.captions is not None:
        start = len(prompts)
        added = [readers.Prompt(caption, 0) for caption in samples.captions]
        return added, list(range(start, start + len(added)))
    if len(prompts) != len(samples.files):
        folder = samples.files[0].parent
        raise ConfigError(
            f"{folder} holds {len(samples.files)} {samples.kind} files without caption files, so "
            f"the prompt file's lines go with them in sorted order, but {prompt_file} holds "
            f"{len(prompts)} prompts"
        )
    return [], list(range(len(prompts)))


def first_frame(path: Path, height: int, width: int):
    """A clip's first frame, covered and centre-cropped to height x width, as an 8-bit RGB
    PIL image (an image-to-video item's conditioning when the clip is its real sample)."""
    from PIL import Image

    frame = next(iter(readers.VideoReader(path)))
    pixels = cover_and_crop(torch.from_numpy(np.array(frame))[None], height, width)
    rgb = ((pixels[:, 0] + 1.0) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0)
    return Image.fromarray(rgb.numpy())


def cover_and_crop(frames: Tensor, height: int, width: int) -> Tensor:
    """uint8 frames [F, h, w, 3] scaled to cover height x width and centre-cropped to it:
    float32 [3, F, height, width] in [-1, 1]."""
    video = frames.permute(0, 3, 1, 2).float()  # [F, 3, h, w]
    scale = max(height / video.shape[2], width / video.shape[3])
    size = (max(height, round(video.shape[2] * scale)), max(width, round(video.shape[3] * scale)))
    video = F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    video = video[:, :, top : top + height, left : left + width]
    return (video / 127.5 - 1.0).clamp(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()


def source_frames(count: int, source_fps: float, fps: float) -> list[int]:
    """Indices of the source frames shown at i / fps seconds, i < count (nearest frame)."""
    return [math.floor(i * source_fps / fps + 0.5) for i in range(count)]


def check_videos(paths, frames: int, fps: float, progress: bool = True) -> None:
    """Open every clip and count its frames (ffmpeg copies the stream, no decoding; threads)
    before any model loads, and raise the ConfigError of the first, in order, that is not a
    video ffmpeg reads or is too short for `frames` at `fps` (what video_pixels would raise
    only after the pipeline loaded and the conditions were encoded)."""
    import concurrent.futures

    from tqdm import tqdm

    if not paths:
        return
    workers = min(8, os.cpu_count() or 1, len(paths))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda path: _video_error(path, frames, fps), paths)
        for error in tqdm(
            results, total=len(paths), desc="checking videos", unit="video", disable=not progress
        ):
            if error is not None:
                raise error


def _video_error(path: Path, frames: int, fps: float) -> ConfigError | None:
    try:
        video = readers.VideoReader(path)
        needed = source_frames(frames, video.fps, fps)[-1] + 1
        if video.frame_count < needed:
            return ConfigError(
                f"{path} holds {video.frame_count} frames at {video.fps:g} fps: {frames} frames "
                f"at {fps:g} fps need {needed}; use longer clips or a smaller --frames"
            )
    except ConfigError as error:
        return error
    return None


def video_pixels(path: Path, height: int, width: int, frames: int, fps: float) -> Tensor:
    """The clip at `path` resampled to `fps`, its first `frames` frames, covered and cropped:
    [3, frames, height, width] in [-1, 1]. Streams: decodes only up to the last frame it keeps.
    Raises ConfigError naming the file when it is shorter."""
    video = readers.VideoReader(path)
    wanted = source_frames(frames, video.fps, fps)
    kept, position = [], 0
    for index, frame in enumerate(video):
        while position < frames and wanted[position] == index:
            kept.append(torch.from_numpy(np.array(frame)))
            position += 1
        if position == frames:
            break
    if position < frames:
        raise ConfigError(
            f"{path} holds {index + 1} frames at {video.fps:g} fps: {frames} frames at {fps:g} "
            f"fps need {wanted[-1] + 1}; use longer clips or a smaller --frames"
        )
    return cover_and_crop(torch.stack(kept), height, width)


def image_pixels(path: Path, height: int, width: int) -> Tensor:
    """The image at `path` covered and cropped: [3, 1, height, width] in [-1, 1]."""
    image = np.asarray(readers.read_image(path))
    return cover_and_crop(torch.from_numpy(image.copy())[None], height, width)


class LatentEncoder:
    """The pipeline's VAE alone (its `vae` folder), encoding pixels [n, 3, F, H, W] in [-1, 1]
    into normalised latents [n, C, F', H', W'] (float32; GPU when there is one)."""

    def __init__(self, pipeline: Path, vae_config: dict):
        import diffusers

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cls = getattr(diffusers, vae_config["_class_name"])
        self.vae = cls.from_pretrained(Path(pipeline) / "vae", dtype=torch.float32)
        self.vae.to(self.device).eval()
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        self.mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(self.device)
        self.std = torch.tensor(self.vae.config.latents_std).view(shape).to(self.device)

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents

        latents = retrieve_latents(self.vae.encode(pixels.to(self.device)), sample_mode="argmax")
        return ((latents - self.mean) / self.std).float().cpu()


def samples_pixels(samples: RealSamples, index: int, height: int, width: int, frames: int, fps):
    """Pixels [3, F, H, W] of sample `index` (module docstring)."""
    file = samples.files[index]
    if samples.kind == "image":
        return image_pixels(file, height, width)
    return video_pixels(file, height, width, frames, fps)


PARTIAL = "real_data.partial"  # in the teacher directory while the shards are written
RUN_FILE = "prepare.json"  # in PARTIAL: what the shards are made of


def _fingerprint(pipe, samples: RealSamples, items, height, width, frames, fps, batch) -> dict:
    return {
        "pipeline": str(Path(pipe.path).resolve()),
        "files": [[str(f.resolve()), f.stat().st_size] for f in samples.files],
        "conditions": list(items),
        "height": height,
        "width": width,
        "frames": frames,
        "fps": fps,
        "batch_size": batch,
    }


def encode_real_data(
    out: Path,
    pipe,
    samples: RealSamples,
    items: list[int],
    size: tuple[int, int, int],
    fps: float,
    batch_size: int,
    progress: bool = True,
):
    """Encode every sample (module docstring) into the latent set out/real_data/, sample i
    with condition item items[i]: `batch_size` samples per shard, each shard renamed into
    out/real_data.partial/ when complete, so a rerun with the same inputs resumes after the
    last whole shard (and reuses a finished set; its prepare.json records the inputs).
    size = (height, width, frames). Returns the LatentSet. Raises ConfigError naming the file
    of a sample that cannot be read or encodes to NaN/Inf, or inputs unlike the earlier run's."""
    from tqdm import tqdm

    from phased_dmd_mp.data import real_data

    height, width, frames = size
    final, partial = out / real_data.REAL_DATA_DIR, out / PARTIAL
    run = _fingerprint(pipe, samples, items, height, width, frames, fps, batch_size)
    if final.exists():  # published by an earlier run of the same inputs (or refused)
        real_data.check_run_file(final / RUN_FILE, run)
        return real_data.LatentSet(final)
    partial.mkdir(parents=True, exist_ok=True)
    real_data.check_run_file(partial / RUN_FILE, run)
    count = len(samples.files)
    batches = math.ceil(count / batch_size)
    done = real_data.complete_shards(partial, batches)
    encoder = LatentEncoder(pipe.path, pipe.vae) if done < batches else None
    with tqdm(
        total=count,
        initial=min(count, done * batch_size),
        unit=samples.kind,
        desc="encoding real data",
        disable=not progress,
    ) as bar:
        for index in range(done, batches):
            rows = range(index * batch_size, min(count, (index + 1) * batch_size))
            latents = []
            for i in rows:
                pixels = samples_pixels(samples, i, height, width, frames, fps)
                latents.append(encoder.encode(pixels[None]))
                if not torch.isfinite(latents[-1]).all():
                    raise ConfigError(f"{samples.files[i]}: the VAE gave NaN/Inf latents")
                bar.update()
            shard = {"latents": torch.cat(latents), "conditions": torch.tensor(items)[rows]}
            real_data.save_shard(shard, partial / real_data.shard_name(index))
    counts = [len(range(i * batch_size, min(count, (i + 1) * batch_size))) for i in range(batches)]
    return real_data.publish(partial, counts, final)

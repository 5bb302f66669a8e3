"""Latents to pixels and files: decode with a diffusers pipeline's VAE, write PNGs and MP4s.

Decoding follows diffusers' Wan and Qwen-Image pipelines (pipeline_wan.py, pipeline_qwenimage.py,
`__call__` after the denoising loop): latents [B, C, F, H, W] are de-normalised with the VAE
config's `latents_mean` / `latents_std` (`latents / (1 / std) + mean`, the same float ops),
decoded, and mapped from [-1, 1] to [0, 1] as `VaeImageProcessor.denormalize` does. Qwen-Image's
single-frame latents are [B, C, 1, H, W] here, the shape its pipeline unpacks them to.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from phased_dmd_mp.config import ConfigError

VAE_DIR = "vae"
VIDEO_FPS = 16  # Wan's frame rate (diffusers' Wan examples export at 16 fps)


def load_vae(pipeline_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32):
    """The VAE of a diffusers pipeline folder (`<dir>/vae`, class from its config.json), in eval
    mode on `device`. Raises ConfigError if the folder has no VAE diffusers knows."""
    import diffusers

    folder = Path(pipeline_dir) / VAE_DIR
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder} has no config.json (expected the pipeline's VAE folder)")
    class_name = json.loads(config_path.read_text()).get("_class_name")
    cls = getattr(diffusers, str(class_name), None)
    if cls is None or not class_name.startswith("AutoencoderKL"):
        raise ConfigError(f"{config_path}: _class_name {class_name!r} is not a diffusers VAE")
    return cls.from_pretrained(folder, dtype=dtype).to(device).eval()


@torch.no_grad()
def decode_latents(vae, latents: Tensor, micro_batch: int = 1) -> Tensor:
    """Pixels of `latents` [B, C, F, H, W] (any dtype, any device) as float32 [B, F', H', W', 3]
    in [0, 1] on the CPU, F' = (F - 1) x temporal factor + 1 for video VAEs, decoded
    `micro_batch` items at a time on the VAE's device and dtype."""
    channels = vae.config.z_dim
    if latents.ndim != 5 or latents.shape[1] != channels:
        raise ValueError(f"latents must be [B, {channels}, F, H, W], got {list(latents.shape)}")
    param = next(vae.parameters())
    mean = torch.tensor(vae.config.latents_mean).view(1, channels, 1, 1, 1)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, channels, 1, 1, 1)
    mean, std = mean.to(param.device, param.dtype), std.to(param.device, param.dtype)
    pixels = []
    for chunk in latents.split(micro_batch):
        chunk = chunk.to(param.device, param.dtype) / std + mean
        video = vae.decode(chunk, return_dict=False)[0]  # [b, 3, F', H', W'] in [-1, 1]
        pixels.append((video / 2 + 0.5).clamp(0, 1).float().permute(0, 2, 3, 4, 1).cpu())
    return torch.cat(pixels)


def to_uint8(pixels: Tensor) -> np.ndarray:
    """[..., 3] floats in [0, 1] as uint8, rounded as diffusers' `numpy_to_pil` does."""
    return (pixels.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def write_png(image: Tensor, path: str | Path) -> Path:
    """An [H, W, 3] image in [0, 1] as a PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path)
    return path


def write_mp4(video: Tensor, path: str | Path, fps: int = VIDEO_FPS) -> Path:
    """A [F, H, W, 3] video in [0, 1] as an MP4, written as a Wan pipeline user writes one:
    diffusers' `export_to_video` (imageio-ffmpeg; sides not divisible by 16 are scaled up to the
    next multiple by ffmpeg)."""
    from diffusers.utils import export_to_video

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_to_video(list(video.clamp(0, 1).float().numpy()), str(path), fps=fps)
    return path

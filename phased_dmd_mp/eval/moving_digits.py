"""Fidelity of moving-digits videos (the embedded video teacher's data, data/moving_digits.py).

Each frame of such a video should hold one sharp 8x8 digit of the video's class on a background
of -1, the same digit in every frame, displaced by the video's velocity. In every frame the digit
is taken to be the 8x8 window with the most ink (pixel value + 1, summed), recentred on the ink
inside it (digit_windows), and:

- digit_accuracy: % of frames whose window the digits network (eval/digits.py) calls the
  video's class (condition c is digit c): class conditioning, legibility and sharpness at once;
- shape_change: the mean absolute difference between consecutive frames' windows, in pixel
  values of [-1, 1] (0 for the data: a digit that melts, flickers or morphs scores higher);
- digit_speed: how far the window moves between consecutive frames, pixels per frame (the
  digit tracked, next to the optical flow's mean over every pixel, most of them background).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from phased_dmd_mp.eval.digits import IMAGE_SIZE, NUM_CLASSES, DigitsExtractor

METRICS = ("digit_accuracy", "shape_change", "digit_speed")


def _crop(frames: Tensor, corners: Tensor) -> Tensor:
    """The 8x8 windows [N, 8, 8] of frames [N, H, W] at top-left corners [N, 2]."""
    rows = corners[:, :1, None] + torch.arange(IMAGE_SIZE)[None, :, None]  # [N, 8, 1]
    cols = corners[:, 1:, None] + torch.arange(IMAGE_SIZE)[None, None, :]  # [N, 1, 8]
    return frames[torch.arange(len(frames))[:, None, None], rows, cols]


def digit_windows(frames: Tensor) -> tuple[Tensor, Tensor]:
    """The digit's 8x8 window in each of frames [N, H, W] (values in [-1, 1]): windows [N, 1, 8,
    8] and their top-left corners [N, 2] (row, column; may reach 8 pixels outside the frame, which
    counts as background). The window with the most ink (value + 1), recentred on the ink's
    centroid inside it: a digit translated by whole pixels gets the same window, moved as much,
    wherever it is in the frame (ties between windows and the frame's edge cannot shift it)."""
    padded = F.pad(frames, (IMAGE_SIZE,) * 4, value=-1.0)
    ink = (padded + 1).clamp(min=0)
    pooled = F.avg_pool2d(ink[:, None], IMAGE_SIZE, stride=1)[:, 0]
    best = pooled.flatten(1).argmax(dim=1)
    corners = torch.stack([best // pooled.shape[-1], best % pooled.shape[-1]], dim=1)
    window_ink = _crop(ink, corners)
    mass = window_ink.sum(dim=(1, 2)).clamp(min=1e-6)
    offsets = torch.arange(IMAGE_SIZE, dtype=ink.dtype)
    centroid = torch.stack(
        [(window_ink.sum(dim=2) * offsets).sum(dim=1), (window_ink.sum(dim=1) * offsets).sum(dim=1)],
        dim=1,
    ) / mass[:, None]
    corners = corners + (centroid - (IMAGE_SIZE - 1) / 2).round().long()
    corners = torch.minimum(corners.clamp(min=0), torch.tensor(pooled.shape[-2:]) - 1)
    return _crop(padded, corners)[:, None], corners - IMAGE_SIZE


class DigitFidelity:
    """The module docstring's metrics of one video at a time, with the digits network."""

    def __init__(self, extractor: DigitsExtractor):
        self.extractor = extractor

    @staticmethod
    def check(channels: int, height: int, width: int, conditions: int) -> None:
        """ValueError unless videos of this shape can be moving digits (gray, frames of at least
        8x8, at most 10 conditions: one per digit class)."""
        if channels != 1 or min(height, width) < IMAGE_SIZE or conditions > NUM_CLASSES:
            raise ValueError(
                f"digit fidelity needs gray frames of at least {IMAGE_SIZE}x{IMAGE_SIZE} and at "
                f"most {NUM_CLASSES} conditions (the digit classes), got {channels} channels, "
                f"{height}x{width}, {conditions} conditions"
            )

    @torch.no_grad()
    def measure(self, frames: Tensor, digit: int) -> dict[str, float]:
        """frames [F, 1, H, W] in [-1, 1] of a video of class `digit`: the three metrics."""
        windows, corners = digit_windows(frames[:, 0].float().clamp(-1, 1))
        predicted = self.extractor.model(windows).argmax(dim=1)
        return {
            "digit_accuracy": 100.0 * (predicted == digit).float().mean().item(),
            "shape_change": (windows[1:] - windows[:-1]).abs().mean().item(),
            "digit_speed": (corners[1:] - corners[:-1]).double().norm(dim=1).mean().item(),
        }

"""The embedded video teacher's data: scikit-learn's digits moving across a small frame.

A video is one 8x8 digit on a SIZE x SIZE background (-1), FRAMES frames long, moving in a straight
line at a constant integer velocity of at most MAX_SPEED pixels per frame on each axis (drawn
uniformly from {-MAX_SPEED, ..., MAX_SPEED}^2, so a fifth of the videos hold still on an axis and
1 in 25 is static), from a start drawn uniformly among those that keep the whole digit in frame.
Integer steps keep the digit sharp in every frame, so motion is all that varies within a video.
As latents a video is [1, FRAMES, SIZE, SIZE] (C, F, H, W) in [-1, 1]; the Wan DiT sees it with
(1, 4, 4) patches (16 tokens a frame). Conditions are the digit classes, exactly as for the still
digits (data/digits.py): what moves is drawn by the teacher, not asked for.
"""

from __future__ import annotations

import torch
from torch import Tensor

from phased_dmd_mp.eval.digits import IMAGE_SIZE

FRAMES = 5
SIZE = 16
MAX_SPEED = 2  # pixels per frame on each axis
LATENT_SHAPE = (1, FRAMES, SIZE, SIZE)
PATCH_SIZE = (1, 4, 4)
BACKGROUND = -1.0


def random_motion(count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Velocities [count, 2] (rows, columns; integers in pixels per frame) and start positions
    [count, 2] (top-left corner) that keep the digit inside the frame for all FRAMES frames."""
    room = SIZE - IMAGE_SIZE  # the largest top-left coordinate
    velocity = torch.randint(-MAX_SPEED, MAX_SPEED + 1, (count, 2), generator=generator)
    travel = velocity * (FRAMES - 1)
    low = (-travel).clamp(min=0)  # a negative velocity must start far enough from the edge
    high = room - travel.clamp(min=0)
    start = low + (torch.rand(count, 2, generator=generator) * (high - low + 1)).long()
    return velocity, start.clamp(max=high)  # clamp: rand() < 1 in exact arithmetic only


def render(images: Tensor, velocity: Tensor, start: Tensor) -> Tensor:
    """Videos [N, 1, FRAMES, SIZE, SIZE] of images [N, 1, 8, 8] (in [-1, 1]) moved by `velocity`
    from `start` (both [N, 2], integer pixels; every position must keep the digit in frame)."""
    count = len(images)
    videos = torch.full((count, 1, FRAMES, SIZE, SIZE), BACKGROUND, dtype=images.dtype)
    for frame in range(FRAMES):
        position = start + frame * velocity
        if position.min() < 0 or position.max() > SIZE - IMAGE_SIZE:
            raise ValueError("a digit would leave the frame")
        for n, (row, col) in enumerate(position.tolist()):
            videos[n, 0, frame, row : row + IMAGE_SIZE, col : col + IMAGE_SIZE] = images[n, 0]
    return videos


def moving_digits(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each of images [N, 1, 8, 8] moving with a fresh random velocity and start: [N, 1, FRAMES,
    SIZE, SIZE]."""
    velocity, start = random_motion(len(images), generator)
    return render(images, velocity, start)

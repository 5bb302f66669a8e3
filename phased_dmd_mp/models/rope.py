"""Rotary position tables: Wan's 3D (frame, height, width) and Qwen-Image's centred 2D + text.

Both rotate interleaved pairs of each head's channels; the head dimension is split between the
axes. Each table reproduces its model's own precision (Wan: float64 angles, Qwen-Image: float32)
because the released weights were trained with it. Tables are returned as (cos, sin), each
[tokens, 1, 1, head_dim / 2] in float32, ready for `layers.apply_rotary`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

THETA = 10000.0


def _as_table(angles: Tensor) -> tuple[Tensor, Tensor]:
    return angles.cos().float()[:, None, None, :], angles.sin().float()[:, None, None, :]


def wan_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """(frame, height, width) channels: height and width get 2 * (head_dim // 6) each."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


@functools.lru_cache(maxsize=16)
def wan_rotary(grid: tuple[int, int, int], head_dim: int, device=None) -> tuple[Tensor, Tensor]:
    """Tables for a (frames, height, width) grid of patches, tokens in row-major order.

    Cached per (grid, head_dim, device), as diffusers keeps its tables: every forward of a
    model asks for the same ones. The tables are shared, so callers must not modify them;
    they are built outside inference mode so that a grad-enabled forward can save them.
    """
    with torch.inference_mode(False):
        return _wan_rotary(grid, head_dim, device)


def _wan_rotary(grid: tuple[int, int, int], head_dim: int, device) -> tuple[Tensor, Tensor]:
    def axis(length: int, dim: int) -> Tensor:
        inv_freq = 1.0 / THETA ** (
            torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
        )
        return torch.outer(torch.arange(length, dtype=torch.float64, device=device), inv_freq)

    frames, height, width = grid
    t, h, w = (axis(n, d) for n, d in zip(grid, wan_axis_dims(head_dim)))
    angles = torch.cat(
        [
            t[:, None, None].expand(frames, height, width, -1),
            h[None, :, None].expand(frames, height, width, -1),
            w[None, None, :].expand(frames, height, width, -1),
        ],
        dim=-1,
    )
    return _as_table(angles.reshape(frames * height * width, -1))


def qwen_rotary(
    image_shapes: list[tuple[int, int, int]],
    text_len: int,
    axes_dims: tuple[int, int, int],
    device=None,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """((image cos, sin), (text cos, sin)) for the images of one sample, concatenated in order.

    Image i's frames sit at positions i, i + 1, ...; heights and widths are centred on zero
    (-(n - n // 2) .. n // 2 - 1); text tokens follow after the largest half-extent.
    """
    inv_freqs = [
        1.0 / torch.pow(THETA, torch.arange(0, dim, 2, device=device).to(torch.float32).div(dim))
        for dim in axes_dims
    ]

    def angles(positions: Tensor, axis: int) -> Tensor:
        return torch.outer(positions.to(device), inv_freqs[axis])

    def centred(n: int) -> Tensor:
        return torch.arange(-(n - n // 2), n // 2)

    image_angles, text_start = [], 0
    for index, (frames, height, width) in enumerate(image_shapes):
        f = angles(torch.arange(index, index + frames), 0)
        h = angles(centred(height), 1)
        w = angles(centred(width), 2)
        grid = torch.cat(
            [
                f[:, None, None].expand(frames, height, width, -1),
                h[None, :, None].expand(frames, height, width, -1),
                w[None, None, :].expand(frames, height, width, -1),
            ],
            dim=-1,
        )
        image_angles.append(grid.reshape(frames * height * width, -1))
        text_start = max(text_start, height // 2, width // 2)
    text_positions = torch.arange(text_start, text_start + text_len)
    text_angles = torch.cat([angles(text_positions, axis) for axis in range(3)], dim=-1)
    return _as_table(torch.cat(image_angles)), _as_table(text_angles)

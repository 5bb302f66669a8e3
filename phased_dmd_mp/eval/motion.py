"""Motion of a video: mean absolute optical flow (the paper's Table 3) and VBench's dynamic degree.

Frames are float tensors [C, H, W] in [-1, 1] (C = 1 or 3), the evaluation's convention. A flow
estimator maps two frames to the flow field from the first to the second, a float32 array
[H, W, 2] (x then y displacement) in pixels of the frames' own resolution.

- `mean_flow_magnitude`: sqrt(u^2 + v^2) averaged over all pixels; a video's optical flow is its
  mean over consecutive frame pairs, i.e. over all pixels and pairs (the pairs are equally big).
- VBench's dynamic degree (vbench/dynamic_degree.py of VBench, restated): frames are taken every
  `max(1, round(fps / 8))`-th (about 8 a second); each consecutive pair of those is scored by the
  mean of the largest 5% of its RAFT flow magnitudes (`top_magnitude_mean`); a pair moves if its
  score exceeds 6 * max(1, 8 / fps) * min(H, W) / 256 pixels, and the video is dynamic if at least
  round(4 * frames / 16) of its pairs move (`is_dynamic`; Python's rounding, so with 2 sampled
  frames that count is 0 and any video with a pair is dynamic, as in VBench). The dynamic degree
  of a set is the percentage of dynamic videos. The rule is a pure function of the flow fields, so
  it is tested on given fields; VBench computes them with RAFT (20 refinement iterations, frames
  padded by replication to multiples of 8, the score taken over the padded field), which
  `RAFTFlow` reproduces with torchvision's RAFT-large.

Default estimator: OpenCV's DIS (dense inverse search, MEDIUM preset), which needs no weights.
Measured on a smooth random texture translated by d pixels per frame (benchmarks/bench_flow.py):
within 4% of d for d in {1, 3, 5} from 64x64 to 480x832 and within 13% for d = 0.5, exactly 0
for d = 0, and within 3% up to d = 3 on 16x16 frames; OpenCV's Farneback with its example
parameters read 0.58 d at 256x256 and 0.02 d at 480x832 (a texture that smooth is flat to its
15-pixel window), so it cannot be the default for real videos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

VBENCH_TOP_FRACTION = 0.05
VBENCH_FPS = 8.0  # VBench samples frames at about this rate and scales its threshold by it
VBENCH_THRESHOLD = 6.0  # pixels, at a short side of VBENCH_SIDE pixels
VBENCH_SIDE = 256.0
RAFT_ITERATIONS = 20  # VBench's


class FlowError(ValueError):
    """An estimator that cannot run here (a missing package or weights file)."""


def to_gray_uint8(frame: Tensor) -> np.ndarray:
    """[C, H, W] in [-1, 1] -> [H, W] uint8 luminance (ITU-R BT.601 weights for 3 channels, as
    OpenCV's RGB2GRAY)."""
    frame = frame.float()
    if frame.shape[0] == 3:
        frame = (frame * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    return ((frame[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


class DISFlow:
    """OpenCV's DIS optical flow (MEDIUM preset) on the frames' luminance; no weights needed."""

    name = "OpenCV DIS (medium preset)"

    def __init__(self):
        try:
            import cv2
        except ImportError as error:
            raise FlowError(
                f"optical flow needs OpenCV: pip install opencv-python-headless ({error})"
            ) from None
        self.estimator = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)

    def __call__(self, first: Tensor, second: Tensor) -> np.ndarray:
        return self.estimator.calc(to_gray_uint8(first), to_gray_uint8(second), None)


class RAFTFlow:
    """torchvision's RAFT-large with the weights in `weights_path` (a state dict, e.g. the file
    of torchvision's Raft_Large_Weights.C_T_V1, the original RAFT authors' Things weights that
    VBench uses), run as VBench runs RAFT: RGB frames in [-1, 1] replicate-padded to multiples of
    8, RAFT_ITERATIONS refinement iterations, the flow of the padded frames. On the GPU if there
    is one. Raises FlowError when torchvision or the weights file is missing."""

    name = "RAFT-large (torchvision)"

    def __init__(self, weights_path: str | Path):
        try:
            from torchvision.models.optical_flow import raft_large
        except Exception as error:  # ImportError, or a torchvision built for another torch
            raise FlowError(
                f"raft_weights needs torchvision's RAFT, which does not import here ({error}); "
                "install the torchvision that matches your torch"
            ) from None
        path = Path(weights_path)
        if not path.is_file():
            raise FlowError(f"raft_weights: {path} does not exist")
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise FlowError(f"raft_weights: {path} is not a readable weights file ({error})")
        model = raft_large(weights=None, progress=False)
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as error:
            first = str(error).splitlines()[0]
            raise FlowError(f"raft_weights: {path} does not hold RAFT-large weights ({first})")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval().requires_grad_(False).to(self.device)

    @staticmethod
    def _rgb_padded(frame: Tensor) -> Tensor:
        frame = frame.float().clamp(-1, 1)
        if frame.shape[0] == 1:
            frame = frame.expand(3, -1, -1)
        height, width = frame.shape[-2:]
        pad_h, pad_w = -height % 8, -width % 8  # VBench's InputPadder ("sintel" mode) split
        padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        return torch.nn.functional.pad(frame[None], padding, mode="replicate")

    @torch.no_grad()
    def __call__(self, first: Tensor, second: Tensor) -> np.ndarray:
        a, b = (self._rgb_padded(frame).to(self.device) for frame in (first, second))
        flow = self.model(a, b, num_flow_updates=RAFT_ITERATIONS)[-1]  # [1, 2, H', W']
        return flow[0].permute(1, 2, 0).float().cpu().numpy()


def flow_magnitude(flow: np.ndarray) -> np.ndarray:
    """[H, W, 2] -> [H, W]: the length of each flow vector, in pixels."""
    flow = np.asarray(flow, dtype=np.float64)
    return np.sqrt(np.square(flow[..., 0]) + np.square(flow[..., 1]))


def mean_flow_magnitude(flow: np.ndarray) -> float:
    """The mean over all pixels of the flow vectors' lengths (one frame pair's optical flow)."""
    return float(flow_magnitude(flow).mean())


def top_magnitude_mean(flow: np.ndarray, fraction: float = VBENCH_TOP_FRACTION) -> float:
    """VBench's score of one frame pair: the mean of the int(H W fraction) largest flow lengths
    (at least one, where VBench would average an empty list for frames under 20 pixels)."""
    magnitudes = flow_magnitude(flow).ravel()
    count = max(1, int(magnitudes.size * fraction))
    return float(np.partition(magnitudes, magnitudes.size - count)[-count:].mean())


def vbench_frame_interval(fps: float) -> int:
    """VBench keeps every interval-th frame, about VBENCH_FPS of them a second."""
    return max(1, round(fps / VBENCH_FPS))


def vbench_parameters(
    height: int, width: int, sampled_frames: int, fps: float
) -> tuple[float, int]:
    """(threshold in pixels, pairs that must exceed it) for frames of height x width, of which
    `sampled_frames` were kept, from a video at `fps` frames per second (VBench's set_params)."""
    factor = max(1.0, VBENCH_FPS / fps)
    threshold = factor * VBENCH_THRESHOLD * min(height, width) / VBENCH_SIDE
    return threshold, round(4 * sampled_frames / 16)


def is_dynamic(pair_scores: list[float], threshold: float, pairs_needed: int) -> bool:
    """VBench's check_move: at least `pairs_needed` pair scores above `threshold` (and at least
    one pair to look at)."""
    moving = sum(score > threshold for score in pair_scores)
    return len(pair_scores) > 0 and moving >= pairs_needed


def video_is_dynamic(
    flows: list[np.ndarray], height: int, width: int, sampled_frames: int, fps: float
) -> bool:
    """VBench's verdict on a video from the flow fields of its consecutive sampled frames (of
    height x width before any padding); sampled_frames = len(flows) + 1."""
    threshold, pairs_needed = vbench_parameters(height, width, sampled_frames, fps)
    return is_dynamic([top_magnitude_mean(flow) for flow in flows], threshold, pairs_needed)


def optical_flow(videos: Tensor, flow=None) -> float:
    """Mean optical flow of videos [N, F, C, H, W] in [-1, 1] (pixels per frame; the mean over
    videos, pairs and pixels), by `flow` (default: DISFlow). For previews while training."""
    flow = flow or DISFlow()
    pairs = [
        mean_flow_magnitude(flow(video[i], video[i + 1]))
        for video in videos
        for i in range(len(video) - 1)
    ]
    return float(np.mean(pairs))

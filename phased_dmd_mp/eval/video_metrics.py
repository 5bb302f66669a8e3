"""One model's videos measured in one streaming pass: motion and diversity.

Each video is read frame by frame (eval/videos.py); only two consecutive frames (the flow), the
last frame VBench's sampling kept (the dynamic degree) and `diversity_frames` evenly spaced frames
of each seed of the current condition (the diversity) are held at once.

- optical_flow: the mean over all pixels and consecutive frame pairs of the flow's length, pixels
  per frame at the video's resolution (eval/motion.py), averaged over the videos;
- dynamic_degree: the percentage of videos VBench's rule calls dynamic (RAFT flow only);
- cosine_similarity and perceptual_distance: the diversity of the image evaluation
  (eval/metrics.py) over the seeds of each condition, frame against frame: video features are
  the per-frame features of the kept frames, each unit-normalised, concatenated and scaled by
  1/sqrt(frames), so their cosine similarity is the mean over frames of the frames' cosine
  similarity; a pair's perceptual distance is the mean over the kept frames of the frames';
- with a DigitFidelity (videos of the embedded moving digits): digit_accuracy, shape_change and
  digit_speed (eval/moving_digits.py), averaged over the videos; each video's frames are then
  held at once (they are tiny).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from phased_dmd_mp.eval.extractors import FeatureExtractor, PerceptualDistance
from phased_dmd_mp.eval.metrics import cosine_diversity, perceptual_diversity
from phased_dmd_mp.eval.moving_digits import METRICS as DIGIT_METRICS
from phased_dmd_mp.eval.moving_digits import DigitFidelity
from phased_dmd_mp.eval.motion import (
    mean_flow_magnitude,
    top_magnitude_mean,
    vbench_frame_interval,
    vbench_parameters,
    is_dynamic,
)
from phased_dmd_mp.eval.videos import VideoSet

FEATURE_BATCH = 512  # frames per feature-extractor call
STRIP_CONDITIONS = 4  # conditions shown in a model's strip of frames (seed 0 of each)


def kept_frame_indices(frames: int, count: int) -> list[int]:
    """`count` evenly spaced frame indices from the first to the last (all if fewer frames)."""
    return sorted({round(i) for i in np.linspace(0, frames - 1, min(count, frames))})


class FramewiseFeatures:
    """A frame feature extractor applied to videos [B, K, C, H, W]: the K frames' unit features
    concatenated over frames and scaled by 1 / sqrt(K) (module docstring)."""

    def __init__(self, extractor: FeatureExtractor):
        self.extractor = extractor
        self.name = extractor.name

    def features(self, videos: Tensor) -> Tensor:
        batch, frames = videos.shape[:2]
        flat = videos.flatten(0, 1)
        per_frame = torch.cat(
            [self.extractor.features(chunk).double() for chunk in flat.split(FEATURE_BATCH)]
        )
        unit = F.normalize(per_frame, dim=-1).view(batch, frames, -1)
        return unit.flatten(1) / math.sqrt(frames)


class FramewisePerceptual:
    """A frame perceptual distance applied to videos [B, K, C, H, W]: the mean over the K frames."""

    def __init__(self, perceptual: PerceptualDistance):
        self.perceptual = perceptual
        self.name = perceptual.name

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        batch, frames = a.shape[:2]
        per_frame = self.perceptual.distance(a.flatten(0, 1), b.flatten(0, 1))
        return per_frame.double().view(batch, frames).mean(dim=1)


@dataclass
class VideoMeasurement:
    """What one video contributes: its optical flow, VBench's verdict and its kept frames."""

    optical_flow: float
    dynamic: bool | None
    kept: Tensor  # [K, C, H, W]
    digit: dict[str, float] | None = None  # DigitFidelity's metrics


def measure_video(
    videos: VideoSet,
    condition: int,
    seed: int,
    flow,
    dynamic_flow,
    keep: list[int],
    fidelity: DigitFidelity | None = None,
) -> VideoMeasurement:
    """Stream one video through the flow estimator (consecutive pairs), VBench's rule (when
    `dynamic_flow` is given: its flow on every interval-th frame), the kept frames and the
    digit fidelity (when given; condition c is digit c, or the digit its label names)."""
    interval = vbench_frame_interval(videos.fps)
    previous = sampled = None
    pair_flows, scores, kept, sampled_count, every = [], [], [], 0, []
    for index, frame in enumerate(videos.frames_of(condition, seed)):
        if fidelity is not None:
            every.append(frame)
        if previous is not None:
            pair_flows.append(mean_flow_magnitude(flow(previous, frame)))
        if dynamic_flow is not None and index % interval == 0:
            if sampled is not None:
                scores.append(top_magnitude_mean(dynamic_flow(sampled, frame)))
            sampled, sampled_count = frame, sampled_count + 1
        if index in keep:
            kept.append(frame)
        previous = frame
    dynamic = None
    if dynamic_flow is not None:
        threshold, needed = vbench_parameters(
            videos.height, videos.width, sampled_count, videos.fps
        )
        dynamic = is_dynamic(scores, threshold, needed)
    digit = None
    if fidelity is not None:
        label = videos.labels[condition] if videos.labels else str(condition)
        digit = fidelity.measure(torch.stack(every), int(label) if label.isdigit() else condition)
    return VideoMeasurement(float(np.mean(pair_flows)), dynamic, torch.stack(kept), digit)


def evaluate_videos(
    videos: VideoSet,
    flow,
    dynamic_flow,
    extractor: FeatureExtractor | None,
    perceptual: PerceptualDistance | None,
    diversity_frames: int,
    seed: int = 0,
    progress: bool = True,
    fidelity: DigitFidelity | None = None,
) -> tuple[dict, Tensor]:
    """All metrics of one model's videos (module docstring); returns the run's results (as the
    image evaluation's runs) and its strip, seed 0's kept frames of the first STRIP_CONDITIONS
    conditions [rows, K, C, H, W] in [-1, 1]."""
    keep = kept_frame_indices(videos.frames, diversity_frames)
    flows = np.zeros((videos.conditions, videos.seeds))
    dynamic = np.zeros((videos.conditions, videos.seeds), dtype=bool)
    cosine, distance, strip = [], [], []
    digits = {name: np.zeros((videos.conditions, videos.seeds)) for name in DIGIT_METRICS}
    if fidelity is not None:
        fidelity.check(videos.channels, videos.height, videos.width, videos.conditions)
    features = None if extractor is None else FramewiseFeatures(extractor)
    framewise = None if perceptual is None else FramewisePerceptual(perceptual)
    bar = tqdm(
        total=videos.conditions * videos.seeds,
        desc=f"{videos.model}: videos",
        disable=not progress,
        leave=False,
    )
    for condition in range(videos.conditions):
        kept = []
        for sample_seed in range(videos.seeds):
            measured = measure_video(
                videos, condition, sample_seed, flow, dynamic_flow, keep, fidelity
            )
            flows[condition, sample_seed] = measured.optical_flow
            for name, value in (measured.digit or {}).items():
                digits[name][condition, sample_seed] = value
            dynamic[condition, sample_seed] = bool(measured.dynamic)
            kept.append(measured.kept)
            bar.update()
        kept = torch.stack(kept)[None]  # [1, S, K, C, H, W]
        if condition < STRIP_CONDITIONS:
            strip.append(kept[0, 0])
        if features is not None:
            cosine.append(float(cosine_diversity(features.features(kept[0])[None])[0]))
        if framewise is not None:
            distance.append(float(perceptual_diversity(kept, framewise, False, seed)[0]))
    bar.close()
    metrics = {"optical_flow": float(flows.mean())}
    per_condition = {"labels": videos.labels, "optical_flow": flows.mean(axis=1).tolist()}
    if dynamic_flow is not None:
        metrics["dynamic_degree"] = 100.0 * float(dynamic.mean())
        per_condition["dynamic_degree"] = (100.0 * dynamic.mean(axis=1)).tolist()
    if features is not None:
        metrics["cosine_similarity"] = float(np.mean(cosine))
        per_condition["cosine_similarity"] = cosine
    if framewise is not None:
        metrics["perceptual_distance"] = float(np.mean(distance))
        per_condition["perceptual_distance"] = distance
    if fidelity is not None:
        for name, values in digits.items():
            metrics[name] = float(values.mean())
            per_condition[name] = values.mean(axis=1).tolist()
    run = {
        "model": videos.model,
        "file": str(videos.path),
        "conditions": videos.conditions,
        "seeds": videos.seeds,
        "video": {
            "frames": videos.frames,
            "height": videos.height,
            "width": videos.width,
            "channels": videos.channels,
            "fps": videos.fps,
            "diversity_frames": keep,
        },
        "metrics": metrics,
        "per_condition": per_condition,
        "per_video": {"optical_flow": flows.tolist()}
        | ({"dynamic": dynamic.tolist()} if dynamic_flow is not None else {}),
    }
    return run, torch.stack(strip)

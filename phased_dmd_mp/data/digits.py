"""The embedded default's data and conditions: scikit-learn's digits, shipped with scikit-learn.

The 1797 grayscale 8x8 digits are the teacher's training data, as single-frame, single-channel
"video latents" [N, 1, 1, 8, 8] (C, F, H, W) in [-1, 1] (digits' 0..16 ink scale maps to
x / 8 - 1, as in the evaluation). Distillation never sees them: it reads only the condition set,
one entry per class, whose "text" is a frozen class embedding: a fixed, seeded random table of one
token per class, the embedded default's stand-in for a frozen text encoder. The unconditional
entry is zeros, the null condition the teacher learns with condition dropout.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from phased_dmd_mp.data.condition_writer import write_condition_set
from phased_dmd_mp.data.conditions import ConditionSet
from phased_dmd_mp.eval.digits import NUM_CLASSES, load_digits_images

LATENT_SHAPE = (1, 1, 8, 8)  # channels, frames, height, width
VALUE_RANGE = (-1.0, 1.0)


def load_digits_latents() -> tuple[Tensor, Tensor]:
    """All digits as latents [1797, 1, 1, 8, 8] in [-1, 1] and their classes [1797] (int64)."""
    images, labels = load_digits_images()
    return images[:, :, None], labels


def class_embeddings(text_dim: int, seed: int) -> Tensor:
    """The frozen "text encoder": one token of text_dim standard normal values per class,
    [10, 1, text_dim], the same for the same seed on every machine."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_CLASSES, 1, text_dim, generator=generator)


def write_digits_condition_set(path: str | Path, text_dim: int, seed: int) -> ConditionSet:
    """The digits condition set: item i is class i (labels 0..9), null condition = zeros."""
    table = class_embeddings(text_dim, seed)
    return write_condition_set(
        path,
        items={"text": table, "labels": torch.arange(NUM_CLASSES)},
        uncond={"text": torch.zeros(1, text_dim)},
    )

"""The default image feature network: a small CNN trained by the project on scikit-learn's digits.

DINOv3 and LPIPS weights cannot be downloaded here, so the project trains its own extractor on the
dataset the embedded teacher learns (scikit-learn's `load_digits`: 1797 grayscale 8x8 images, 10
classes, shipped with scikit-learn). Training is deterministic (fixed seed, a few seconds on 2 CPU
cores) and runs on first use; the weights are cached under `$PHASED_DMD_CACHE` (default
`~/.cache/phased_dmd_mp`) in a file keyed by a hash of the training recipe, written atomically,
and never committed.

Inputs are images [B, C, H, W] in [-1, 1] (digits' 0..16 ink scale maps to x / 8 - 1). Three
channels are averaged to gray; other sizes are resized to 8x8 (bilinear, antialiased).
- features: the penultimate layer (128 ReLU units);
- perceptual distance: an LPIPS-like proxy, not LPIPS. The activations of every hidden layer are
  unit-normalised over channels at each position, their squared differences summed over
  channels, averaged over positions, then averaged over layers (no learned layer weights, range
  [0, 4]).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

IMAGE_SIZE = 8
NUM_CLASSES = 10
FEATURE_DIM = 128
# Part of the cache key: bump it when the network or the training code changes.
CODE_VERSION = 1


@dataclass(frozen=True)
class DigitsRecipe:
    """Everything that decides the trained weights; its hash names the cache file."""

    seed: int = 0
    test_fraction: float = 0.2
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 1  # augmentation: random translations of up to this many pixels

    def cache_key(self) -> str:
        text = json.dumps({"code": CODE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def single_threaded(function):
    """Run `function` with one intra-op thread. For this network's tiny convolutions threads cost
    more in synchronisation than they save: on 2 cores shared with another busy process, training
    took 72-86 s with 2 threads and 7-12 s with 1."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def load_digits_images() -> tuple[Tensor, Tensor]:
    """All of scikit-learn's digits as images [1797, 1, 8, 8] in [-1, 1] and labels [1797]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    return images, torch.from_numpy(data.target.astype(np.int64))


def train_test_split(recipe: DigitsRecipe) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fixed split (a permutation seeded by the recipe): train images, labels, test images, labels."""
    images, labels = load_digits_images()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(recipe.seed))
    n_test = round(recipe.test_fraction * len(images))
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


class DigitsNet(nn.Module):
    """Three 3x3 convs (32, 64, 64 channels; a 2x2 max-pool after the second), the 128-unit
    feature layer and a linear classifier: 0.2M parameters."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, padding=1) for c_in, c_out in [(1, 32), (32, 64), (64, 64)]
        )
        self.feature = nn.Linear(64 * (IMAGE_SIZE // 2) ** 2, FEATURE_DIM)
        self.classifier = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def activations(self, x: Tensor) -> list[Tensor]:
        """Every hidden layer's ReLU output; the last one, [B, feature_dim], is the features."""
        outputs = []
        for index, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            outputs.append(x)
            if index == 1:
                x = F.max_pool2d(x, 2)
        outputs.append(F.relu(self.feature(x.flatten(1))))
        return outputs

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.activations(x)[-1])


def _random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to max_shift pixels, filling with background (-1)."""
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    rows = offsets[:, 0, None] + torch.arange(IMAGE_SIZE)  # [B, 8]
    cols = offsets[:, 1, None] + torch.arange(IMAGE_SIZE)
    batch = torch.arange(len(images))[:, None, None]
    return padded[batch, 0, rows[:, :, None], cols[:, None, :]][:, None]


def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        return float((model(images).argmax(dim=1) == labels).float().mean())


@single_threaded
def train_digits_network(recipe: DigitsRecipe, progress: bool = True) -> tuple[DigitsNet, float]:
    """Train the network from scratch; returns it (in eval mode) and its test accuracy."""
    torch.manual_seed(recipe.seed)  # initial weights
    generator = torch.Generator().manual_seed(recipe.seed)
    train_images, train_labels, test_images, test_labels = train_test_split(recipe)
    model = DigitsNet()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
    )
    steps_per_epoch = -(-len(train_images) // recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch, pct_start=0.1
    )
    bar = tqdm(range(recipe.epochs), desc="train digits feature net", disable=not progress)
    for _ in bar:
        order = torch.randperm(len(train_images), generator=generator)
        for batch in order.split(recipe.batch_size):
            images = _random_shift(train_images[batch], recipe.max_shift, generator)
            loss = F.cross_entropy(model(images), train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model, accuracy(model, test_images, test_labels)


def cache_dir() -> Path:
    return Path(os.environ.get("PHASED_DMD_CACHE") or Path.home() / ".cache" / "phased_dmd_mp")


def _atomic_save(payload: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


class DigitsExtractor:
    """Features and LPIPS-like perceptual distance from the digits network (see module docstring)."""

    name = "digits-cnn"

    def __init__(self, model: DigitsNet, test_accuracy: float, weights_path: Path | None = None):
        self.model = model.eval().requires_grad_(False)
        self.test_accuracy = test_accuracy
        self.weights_path = weights_path

    @classmethod
    def load(cls, recipe: DigitsRecipe = DigitsRecipe(), progress: bool = True) -> DigitsExtractor:
        """The cached network for `recipe`, trained and cached first if absent."""
        path = cache_dir() / f"digits_cnn-{recipe.cache_key()}.pt"
        if path.is_file():
            payload = torch.load(path, weights_only=True)
            model = DigitsNet()
            model.load_state_dict(payload["state_dict"])
            return cls(model, payload["test_accuracy"], path)
        start = time.perf_counter()
        model, test_accuracy = train_digits_network(recipe, progress)
        if progress:
            print(
                f"trained the digits feature network in {time.perf_counter() - start:.1f} s, "
                f"test accuracy {test_accuracy:.2%}; cached at {path}"
            )
        _atomic_save({"state_dict": model.state_dict(), "test_accuracy": test_accuracy}, path)
        return cls(model, test_accuracy, path)

    def _prepare(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"{self.name} takes images [B, 1 or 3, H, W], got shape {tuple(images.shape)}"
            )
        images = images.float().mean(dim=1, keepdim=True)
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(
                images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True
            )
        return images

    @single_threaded
    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return self.model.activations(self._prepare(images))[-1]

    @single_threaded
    @torch.no_grad()
    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        layers_a = self.model.activations(self._prepare(a))
        layers_b = self.model.activations(self._prepare(b))
        per_layer = []
        for x, y in zip(layers_a, layers_b):
            if x.ndim == 2:  # the feature layer: one position
                x, y = x[:, :, None, None], y[:, :, None, None]
            x = x / (x.norm(dim=1, keepdim=True) + 1e-10)
            y = y / (y.norm(dim=1, keepdim=True) + 1e-10)
            per_layer.append((x - y).square().sum(dim=1).mean(dim=(1, 2)))
        return torch.stack(per_layer).mean(dim=0)

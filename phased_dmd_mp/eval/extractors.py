"""Pluggable feature extractors and perceptual distances.

Both receive samples as float tensors: images [B, C, H, W] with values in [-1, 1], or points
[B, D]. A feature extractor returns features [B, F]; a perceptual distance returns one distance
per pair (a[i], b[i]), [B], larger meaning more different (LPIPS-style).

The evaluation config names each with a spec, resolved by `resolve`:
- a name in `EXTRACTORS`: "digits" (the project's digits CNN, both roles, see digits.py) or
  "points" (point data: the points themselves, Euclidean distance);
- "package.module:factory": any zero-argument callable returning such an object, which is how
  DINOv3 features or LPIPS distances with weights on disk plug in (docs/evaluation.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from torch import Tensor

from phased_dmd_mp.eval.digits import DigitsExtractor


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str

    def features(self, samples: Tensor) -> Tensor: ...


@runtime_checkable
class PerceptualDistance(Protocol):
    name: str

    def distance(self, a: Tensor, b: Tensor) -> Tensor: ...


class PointFeatures:
    """Points are their own features; their perceptual distance is the Euclidean distance."""

    name = "points"

    def _check(self, points: Tensor) -> Tensor:
        if points.ndim != 2:
            raise ValueError(f"{self.name} takes points [B, D], got shape {tuple(points.shape)}")
        return points.double()

    def features(self, points: Tensor) -> Tensor:
        return self._check(points)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        return (self._check(a) - self._check(b)).norm(dim=1)


EXTRACTORS: dict[str, Callable[[], object]] = {
    "digits": DigitsExtractor.load,
    "points": PointFeatures,
}


def resolve(spec: str) -> object:
    """Build the object a spec names (a key of EXTRACTORS or "package.module:factory")."""
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot load {spec!r}: {error}") from error
    elif spec in EXTRACTORS:
        factory = EXTRACTORS[spec]
    else:
        raise ValueError(
            f"unknown extractor {spec!r}: use one of {sorted(EXTRACTORS)} or 'package.module:factory'"
        )
    return factory()


def check_role(extractor: object, spec: str, role: type) -> None:
    """Raise a clear error if `extractor` (built from `spec`) does not implement `role`."""
    if not isinstance(extractor, role):
        method = "features" if role is FeatureExtractor else "distance"
        raise TypeError(
            f"{spec!r} gives a {type(extractor).__name__}, which lacks a `name` attribute or a "
            f"`{method}` method, so it cannot serve as a {role.__name__}"
        )

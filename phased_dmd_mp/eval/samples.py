"""The sample file the evaluation reads: one `.npz` (numpy.savez) per trained model and seed.

Keys:
  samples          float [conditions, seeds, C, H, W] (images) or [conditions, seeds, D] (points);
                   seeds >= 2, since diversity is measured over pairs of seeds per condition
  model            optional str, the table row; files with the same model are one row, their
                   metrics averaged with a confidence interval (default: the file name's stem)
  labels           optional [conditions], what each condition is (a class, a prompt), for the
                   grid and the per-condition values in results.json
  value_range      optional [low, high] of image values (default [-1, 1]); images are mapped
                   to [-1, 1] and clipped to it, as saving them as pictures would
  mixture_means    point files only, optional [modes, D]: the Gaussian mixture the samples
  mixture_weights  should follow, with its weights [modes] and its shared std (a scalar).
  mixture_std      Give all three or none; without them the evaluation config must give them.

For example: numpy.savez("dmd_seed0.npz", samples=x, model="DMD", labels=np.arange(10)).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from phased_dmd_mp.eval.mixture import Mixture

MIXTURE_KEYS = ("mixture_means", "mixture_weights", "mixture_std")
KEYS = ("samples", "model", "labels", "value_range", *MIXTURE_KEYS)


class SampleFileError(ValueError):
    """A sample file that does not follow the format above."""


@dataclass(frozen=True, eq=False)
class SampleFile:
    path: Path
    model: str
    samples: Tensor  # [conditions, seeds, ...]: images float32 in [-1, 1], points float64
    labels: list[str] | None
    mixture: Mixture | None
    # What the columns of its mosaic are: seeds, or the frames of a video strip (their indices).
    column_label: str = "seed"
    column_names: list[str] | None = None

    @property
    def kind(self) -> str:
        return "images" if self.samples.ndim == 5 else "points"

    @property
    def conditions(self) -> int:
        return self.samples.shape[0]

    @property
    def seeds(self) -> int:
        return self.samples.shape[1]


def _string(array: np.ndarray, key: str) -> str:
    if array.ndim != 0 or array.dtype.kind != "U" or not str(array):
        raise SampleFileError(f"{key} must be a non-empty string")
    return str(array)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise SampleFileError("file does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise SampleFileError(f"not a readable .npz file ({error})") from error


def _samples(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind not in "fiu":
        raise SampleFileError(f"samples must be numbers, got dtype {array.dtype}")
    if array.ndim not in (3, 5):
        raise SampleFileError(
            "samples must be [conditions, seeds, C, H, W] (images) or [conditions, seeds, D] "
            f"(points), got shape {array.shape}"
        )
    if 0 in array.shape:
        raise SampleFileError(f"samples has an empty dimension: shape {array.shape}")
    if array.shape[1] < 2:
        raise SampleFileError(
            f"samples needs at least 2 seeds per condition for pairwise diversity, got shape "
            f"{array.shape}"
        )
    if not np.isfinite(array).all():
        raise SampleFileError("samples contains NaN or infinite values")
    return array


def _to_unit_range(images: np.ndarray, value_range: np.ndarray | None) -> Tensor:
    low, high = (-1.0, 1.0) if value_range is None else (float(v) for v in value_range)
    images = torch.from_numpy(images.astype(np.float32))
    return (2 * (images - low) / (high - low) - 1).clamp(-1, 1)


def _mixture(arrays: dict[str, np.ndarray], dims: int) -> Mixture | None:
    present = [key for key in MIXTURE_KEYS if key in arrays]
    if not present:
        return None
    if len(present) != len(MIXTURE_KEYS):
        raise SampleFileError(f"give all of {list(MIXTURE_KEYS)} or none, got only {present}")
    std = arrays["mixture_std"]
    if std.shape != ():
        raise SampleFileError(f"mixture_std must be a scalar, got shape {std.shape}")
    try:
        mixture = Mixture.from_values(arrays["mixture_means"], arrays["mixture_weights"], std)
    except (TypeError, ValueError) as error:
        raise SampleFileError(str(error)) from error
    if mixture.means.shape[1] != dims:
        raise SampleFileError(
            f"mixture_means has {mixture.means.shape[1]} dims but the points have {dims}"
        )
    return mixture


def load_sample_file(path: str | Path) -> SampleFile:
    """Read and check a sample file; every problem is a SampleFileError naming the file."""
    path = Path(path)
    try:
        return _parse(path, _read_arrays(path))
    except SampleFileError as error:
        raise SampleFileError(f"{path}: {error}") from error


def _parse(path: Path, arrays: dict[str, np.ndarray]) -> SampleFile:
    unknown = sorted(set(arrays) - set(KEYS))
    if unknown:
        raise SampleFileError(f"unknown keys {unknown}; known keys: {list(KEYS)}")
    if "samples" not in arrays:
        raise SampleFileError(f"missing the key 'samples'; it holds {sorted(arrays)}")
    samples = _samples(arrays["samples"])
    is_images = samples.ndim == 5
    if is_images and any(key in arrays for key in MIXTURE_KEYS):
        raise SampleFileError("mixture_* keys are for point samples, but samples are images")
    value_range = arrays.get("value_range")
    if value_range is not None:
        if not is_images:
            raise SampleFileError("value_range is for images, but samples are points")
        if value_range.shape != (2,) or not value_range[0] < value_range[1]:
            raise SampleFileError(
                f"value_range must be [low, high] with low < high, got {value_range}"
            )
    labels = arrays.get("labels")
    if labels is not None and labels.shape != (samples.shape[0],):
        raise SampleFileError(
            f"labels must be one per condition ({samples.shape[0]}), got shape {labels.shape}"
        )
    return SampleFile(
        path=path,
        model=_string(arrays["model"], "model") if "model" in arrays else path.stem,
        samples=_to_unit_range(samples, value_range)
        if is_images
        else torch.from_numpy(samples.astype(np.float64)),
        labels=None if labels is None else [str(label) for label in labels],
        mixture=None if is_images else _mixture(arrays, samples.shape[-1]),
    )

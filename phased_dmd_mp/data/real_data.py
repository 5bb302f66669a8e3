"""Real latents: the data the real-data critic and the adversarial head hold the generator to.

Data-free distillation needs only conditions; two levers (docs/method.md section 9) also
compare the generator with real samples, encoded once into the latent space. A latent set is a
directory, by default `real_data/` in the teacher directory next to `conditions/`:

    latents.json          {"format": "phased_dmd_mp.latents", "version": 1, "count": N,
                           "latent_shape": [C, F, H, W], "dtype": "float32",
                           "shards": [{"file": "latents-00000.safetensors", "count": n}, ...]}
    latents-*.safetensors `latents` [n, C, F, H, W] and `conditions` [n] (int64): each latent's
                          item in the teacher's condition set (the caption or prompt it shows)

`LatentSet(path)` reads a set lazily (a batch reads only its rows), `write_latent_set` writes one
whole (into a staging directory renamed into place); prepare writes one shard by shard
(data/real_encoding.py: `save_shard` each, `publish` when all are there). The runner draws its batches with a
`ConditionSampler` over the set's items, checkpointed like the condition sampler.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from phased_dmd_mp import atomic
from phased_dmd_mp.config import ConfigError

FORMAT = "phased_dmd_mp.latents"
VERSION = 1
MANIFEST = "latents.json"
REAL_DATA_DIR = "real_data"  # in a teacher directory, next to conditions/
DEFAULT_SHARD_ITEMS = 4096


def shard_name(index: int) -> str:
    return f"latents-{index:05d}.safetensors"


def read_manifest(path: Path) -> dict:
    """The checked manifest of the latent set at `path` (reads latents.json only): count,
    latent_shape, shards [(file, count)]. Raises ConfigError naming the file."""
    file = Path(path) / MANIFEST
    if not Path(path).is_dir():
        raise ConfigError(f"latent set {path} does not exist (expected a directory)")
    if not file.is_file():
        raise ConfigError(f"{path} is not a latent set: it has no {MANIFEST}")
    try:
        manifest = json.loads(file.read_text())
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ConfigError(f"{file} is not a {FORMAT} version {VERSION} manifest")
        shards = [(str(s["file"]), int(s["count"])) for s in manifest["shards"]]
        shape = tuple(int(d) for d in manifest["latent_shape"])
        count = int(manifest["count"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{file} is malformed ({error!r})") from error
    if count < 1 or sum(n for _, n in shards) != count or len(shape) != 4:
        raise ConfigError(f"{file}: count {count}, shards or latent_shape {list(shape)} malformed")
    return {"count": count, "latent_shape": shape, "shards": shards}


class LatentSet:
    """A latent set on disk (module docstring), its shard headers checked when opened."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = read_manifest(self.path)
        self.latent_shape: tuple[int, int, int, int] = manifest["latent_shape"]
        self._count = manifest["count"]
        self._files = [self.path / name for name, _ in manifest["shards"]]
        for file, (_, rows) in zip(self._files, manifest["shards"]):
            self._check(file, rows)
        self._starts = np.cumsum([0] + [rows for _, rows in manifest["shards"]])
        self.max_condition = max(  # checked against the condition set by the runner
            int(load_file(file)["conditions"].max()) for file in self._files
        )

    def _check(self, file: Path, rows: int) -> None:
        expected = {"latents": [rows, *self.latent_shape], "conditions": [rows]}
        try:
            with safe_open(file, framework="pt") as handle:
                shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
        except (SafetensorError, OSError) as error:
            message = f"latent set file {file} is missing or unreadable: {error}"
            raise ConfigError(message) from None
        if shapes != expected:
            raise ConfigError(f"{file} holds {shapes}, the manifest says {expected}")

    def __len__(self) -> int:
        return self._count

    def batch(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """(latents [n, C, F, H, W] float32, their condition items [n] int64) of `indices`."""
        indices = np.asarray(torch.as_tensor(indices).flatten(), dtype=np.int64)
        if len(indices) == 0 or indices.min() < 0 or indices.max() >= self._count:
            raise IndexError(f"indices must be in [0, {self._count}), got {indices.tolist()}")
        shards = np.searchsorted(self._starts, indices, side="right") - 1
        latents = torch.empty((len(indices), *self.latent_shape))
        conditions = torch.empty(len(indices), dtype=torch.int64)
        for shard in np.unique(shards):
            positions = torch.from_numpy(np.flatnonzero(shards == shard))
            rows = (indices[positions.numpy()] - self._starts[shard]).tolist()
            with safe_open(self._files[shard], framework="pt") as handle:
                latents[positions] = handle.get_slice("latents")[rows].float()
                conditions[positions] = handle.get_slice("conditions")[rows].long()
        return latents, conditions


def write_latent_set(
    path: str | Path, latents: Tensor, conditions: Tensor, shard_items: int = DEFAULT_SHARD_ITEMS
) -> LatentSet:
    """Write latents [N, C, F, H, W] with their condition items [N] as a latent set at `path`
    (assembled next to it, renamed into place). Raises ConfigError if `path` exists."""
    path = Path(path)
    if path.exists():
        raise ConfigError(f"{path} already exists; a latent set is written once")
    if latents.ndim != 5 or conditions.shape != latents.shape[:1] or not len(latents):
        raise ConfigError(
            f"latents must be [N, C, F, H, W] with one condition item each, got "
            f"{list(latents.shape)} and {list(conditions.shape)}"
        )
    with atomic.staged_directory(path) as staging:
        counts = []
        for index, start in enumerate(range(0, len(latents), shard_items)):
            rows = slice(start, start + shard_items)
            shard = {"latents": latents[rows].float(), "conditions": conditions[rows].long()}
            save_shard(shard, staging / shard_name(index))
            counts.append(len(latents[rows]))
        _write_manifest(staging, counts)
    return LatentSet(path)


def check_run_file(path: Path, run: dict) -> None:
    """Record `run` (what a partial set's shards are made of) at `path`, or, when a previous
    run recorded one, refuse a different one naming the first key that differs."""
    if not path.is_file():
        atomic.write_json(path, run)
        return
    before = json.loads(path.read_text())
    for key, value in run.items():
        if before.get(key) != value:
            raise ConfigError(
                f"{path.parent} was started with other {key} ({before.get(key)!r:.80}, now "
                f"{value!r:.80}): rerun with the same inputs or delete {path.parent}"
            )


def complete_shards(folder: Path, shards: int) -> int:
    """How many leading shards of `folder` are there (each renamed into place when whole)."""
    done = 0
    while done < shards and (folder / shard_name(done)).is_file():
        done += 1
    return done


def save_shard(tensors: dict[str, Tensor], path: Path) -> None:
    """Write one shard through the guarded write path (whole or absent; phased_dmd_mp.atomic)."""
    atomic.save_safetensors({name: t.contiguous() for name, t in tensors.items()}, path)


def _write_manifest(staging: Path, counts: list[int]) -> None:
    with safe_open(staging / shard_name(0), framework="pt") as handle:
        shape = handle.get_slice("latents").get_shape()[1:]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "count": sum(counts),
        "latent_shape": list(shape),
        "dtype": "float32",
        "shards": [{"file": shard_name(i), "count": n} for i, n in enumerate(counts)],
    }
    atomic.write_json(staging / MANIFEST, manifest)


def publish(staging: Path, counts: list[int], path: Path) -> LatentSet:
    """Finish a set whose shards shard_name(0..) (holding `counts` latents) are in `staging`:
    write its manifest and rename `staging` to `path`."""
    _write_manifest(staging, counts)
    atomic.publish_directory(staging, path)
    return LatentSet(path)


def real_data_dir(real_data: str | None, teacher: str | Path, latent_shape, key: str) -> Path:
    """The latent set a run's lever `key` uses: `real_data`, else the teacher directory's
    real_data/, checked against the teacher's latent shape (reads latents.json only). Raises
    ConfigError naming the key or file."""
    path = Path(real_data) if real_data is not None else Path(teacher) / REAL_DATA_DIR
    if real_data is None and not path.is_dir():
        raise ConfigError(
            f"{key} needs real latents: set real_data, or give the teacher directory {teacher} a "
            f"{REAL_DATA_DIR}/ (python -m phased_dmd_mp.prepare --videos or --images; "
            "pretrain_teacher writes one)"
        )
    try:
        shape = read_manifest(path)["latent_shape"]
    except ConfigError as error:
        raise ConfigError(f"real_data: {error}") from None
    if tuple(shape) != tuple(latent_shape):
        raise ConfigError(
            f"real_data {path} holds latents {list(shape)}, the teacher's are {list(latent_shape)}"
        )
    return path

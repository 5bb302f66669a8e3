"""Condition sets on disk: the only inputs of data-free distillation, one format for every model.

A condition set is a directory:

    conditions.json       {"format": "phased_dmd_mp.conditions", "version": 1, "count": N,
                           "tensors": {name: {"shape": [per-item shape], "dtype": "float32"}},
                           "shards": [{"file": "items-00000.safetensors", "count": n}, ...],
                           "uncond": "uncond.safetensors", "finite": true}
    items-*.safetensors   the items, each tensor stacked on a leading item dimension [n, ...]
    uncond.safetensors    the unconditional entry of classifier-free guidance (null condition or
                          negative prompt), its tensors [1, ...] with the items' shapes

Tensors are named like the fields of `conditioning.Conditions`: `text` [L, D] per item
(required: class embeddings, T5 or Qwen2.5-VL prompt embeddings padded to L tokens),
`text_mask` [L] (1 = real token), `image_latents` [C, F, H, W] and `image_embeds` [T, D'] (I2V
first-frame latents, Wan2.1 CLIP tokens), plus `labels` (an int per item, e.g. a digit class).
`finite` (optional) records that the writer found every value finite, so validation need not
read the items again; a set without it is scanned (data/readers.py `check_finite`).
The unconditional entry holds the text fields only: under CFG the negative branch sees the
batch's own image conditioning (as Wan's I2V pipeline does), so it is taken from that batch.

`ConditionSet(path)` reads a set lazily (safetensors memory maps; a batch reads only its items),
`ConditionSetWriter` streams one to disk, shard by shard, and `ConditionSampler` draws the
training batches of each data-parallel rank, deterministically and resumably.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from phased_dmd_mp.conditioning import Conditions
from phased_dmd_mp import atomic
from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.data.readers import describe_nonfinite, nonfinite_items

FORMAT = "phased_dmd_mp.conditions"
VERSION = 1
MANIFEST = "conditions.json"
UNCOND_FILE = "uncond.safetensors"
CONDITION_FIELDS = tuple(field.name for field in dataclasses.fields(Conditions))
UNCOND_FIELDS = ("text", "text_mask")
LABELS = "labels"
TENSOR_NAMES = (*CONDITION_FIELDS, LABELS)
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
SAFETENSORS_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "uint8": "U8",
    "bool": "BOOL",
}
SAFETENSORS_DTYPE_NAMES = {code: name for name, code in SAFETENSORS_DTYPES.items()}
DEFAULT_SHARD_BYTES = 1 << 30


def staging_dir(final: Path) -> Path:
    """A new empty directory next to `final`, to be renamed to it once complete (a rename within
    one file system is atomic). Made by mkdir, so it gets the usual permissions."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp")
    staging.mkdir()
    return staging


def shard_name(index: int) -> str:
    return f"items-{index:05d}.safetensors"


# --- reading -----------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict:
    """The checked manifest of the condition set at `path`: {count, specs (name: (per-item
    shape, dtype)), shards, uncond}; reads conditions.json only."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise ConfigError(f"condition set {path} does not exist (expected a directory)")
    if not manifest_path.is_file():
        raise ConfigError(f"{path} is not a condition set: it has no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{manifest_path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{manifest_path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ConfigError(
            f"{manifest_path} has format version {manifest.get('version')!r}; this code reads "
            f"version {VERSION}"
        )
    try:
        count, tensors, shards = manifest["count"], manifest["tensors"], manifest["shards"]
        uncond = manifest["uncond"]
        specs = {
            name: (tuple(int(d) for d in spec["shape"]), spec["dtype"])
            for name, spec in tensors.items()
        }
        shard_list = [(str(shard["file"]), int(shard["count"])) for shard in shards]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ConfigError(f"{manifest_path} is malformed ({error!r})") from error
    if not isinstance(count, int) or count < 1:
        raise ConfigError(f"{manifest_path}: count must be a positive integer, got {count!r}")
    _check_specs(specs, manifest_path)
    if sum(n for _, n in shard_list) != count:
        raise ConfigError(
            f"{manifest_path}: the shards hold {sum(n for _, n in shard_list)} items, "
            f"count says {count}"
        )
    return {
        "count": count,
        "specs": specs,
        "shards": shard_list,
        "uncond": str(uncond),
        "finite": manifest.get("finite") is True,
    }


def _check_specs(specs: dict[str, tuple[tuple[int, ...], str]], where: object) -> None:
    unknown = sorted(set(specs) - set(TENSOR_NAMES))
    if unknown:
        raise ConfigError(f"{where}: unknown tensors {unknown}; known: {list(TENSOR_NAMES)}")
    if "text" not in specs:
        raise ConfigError(f"{where}: a condition set needs a 'text' tensor")
    for name, (shape, dtype) in specs.items():
        if dtype not in DTYPES:
            raise ConfigError(f"{where}: {name} has dtype {dtype!r}, not one of {list(DTYPES)}")
        if any(d < 1 for d in shape):
            raise ConfigError(f"{where}: {name} has an empty per-item shape {list(shape)}")
    if LABELS in specs and (specs[LABELS][0] != () or specs[LABELS][1] not in ("int64", "int32")):
        raise ConfigError(f"{where}: labels must be one int64/int32 per item")
    if "text_mask" in specs and specs["text_mask"][0] != specs["text"][0][:1]:
        raise ConfigError(
            f"{where}: text_mask {list(specs['text_mask'][0])} must be [text tokens] of text "
            f"{list(specs['text'][0])}"
        )


def _check_file(file: Path, specs: dict[str, tuple[tuple[int, ...], str]], rows: int) -> None:
    """The safetensors header of `file` holds exactly `specs`, each with `rows` leading rows."""
    if not file.is_file():
        raise ConfigError(f"condition set file {file} is missing")
    try:
        with safe_open(file, framework="pt") as handle:
            names = set(handle.keys())
            if names != set(specs):
                raise ConfigError(
                    f"{file} holds tensors {sorted(names)}, the manifest lists {sorted(specs)}"
                )
            for name, (shape, dtype) in specs.items():
                view = handle.get_slice(name)
                expected = [rows, *shape]
                if view.get_shape() != expected or view.get_dtype() != SAFETENSORS_DTYPES[dtype]:
                    raise ConfigError(
                        f"{file}: {name} is {view.get_dtype()} {view.get_shape()}, the manifest "
                        f"says {SAFETENSORS_DTYPES[dtype]} {expected}"
                    )
    except SafetensorError as error:
        raise ConfigError(f"{file} is not a readable safetensors file ({error})") from error


class ConditionSet:
    """A condition set on disk (format in the module docstring), checked when opened."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = read_manifest(self.path)
        self.specs: dict[str, tuple[tuple[int, ...], str]] = manifest["specs"]
        self._count = manifest["count"]
        self._files = [self.path / name for name, _ in manifest["shards"]]
        for file, (_, rows) in zip(self._files, manifest["shards"]):
            _check_file(file, self.specs, rows)
        self._starts = np.cumsum([0] + [rows for _, rows in manifest["shards"]])
        uncond_specs = {k: v for k, v in self.specs.items() if k in UNCOND_FIELDS}
        _check_file(self.path / manifest["uncond"], uncond_specs, 1)
        with safe_open(self.path / manifest["uncond"], framework="pt") as handle:
            self._uncond = {name: handle.get_tensor(name) for name in uncond_specs}
        self.labels: Tensor | None = (
            self._read(LABELS, np.arange(self._count)).long() if LABELS in self.specs else None
        )

    def __len__(self) -> int:
        return self._count

    @property
    def fields(self) -> tuple[str, ...]:
        """The Conditions fields this set provides."""
        return tuple(name for name in CONDITION_FIELDS if name in self.specs)

    def shape(self, name: str) -> tuple[int, ...]:
        """Per-item shape of the tensor `name`."""
        return self.specs[name][0]

    def _read(self, name: str, indices: np.ndarray) -> Tensor:
        shards = np.searchsorted(self._starts, indices, side="right") - 1
        out = torch.empty((len(indices), *self.shape(name)), dtype=DTYPES[self.specs[name][1]])
        for shard in np.unique(shards):
            positions = np.flatnonzero(shards == shard)
            rows = indices[positions] - self._starts[shard]
            with safe_open(self._files[shard], framework="pt") as handle:
                out[torch.from_numpy(positions)] = handle.get_slice(name)[rows.tolist()]
        return out

    def batch(self, indices: Sequence[int] | Tensor) -> Conditions:
        """The conditions of the items `indices` (repeats allowed), in that order."""
        indices = np.asarray(torch.as_tensor(indices).flatten(), dtype=np.int64)
        if len(indices) == 0:
            raise ValueError("batch needs at least one index")
        if indices.min() < 0 or indices.max() >= self._count:
            raise IndexError(f"indices must be in [0, {self._count}), got {indices.tolist()}")
        return Conditions(**{name: self._read(name, indices) for name in self.fields})

    def uncond(self, batch_size: int, like: Conditions | None = None) -> Conditions:
        """The unconditional entry repeated `batch_size` times. A set with image conditioning
        needs `like`, the conditional batch whose image fields the negative branch shares."""
        image_fields = [name for name in self.fields if name not in UNCOND_FIELDS]
        if image_fields and like is None:
            raise ValueError(
                f"this condition set has {image_fields}: pass like=<the conditional batch>"
            )
        if like is not None and like.batch_size != batch_size:
            raise ValueError(f"like has batch size {like.batch_size}, not {batch_size}")
        # Views of one stored row: a batch of T5 embeddings would otherwise cost B x 4 MB.
        text = {name: row.expand(batch_size, *row.shape[1:]) for name, row in self._uncond.items()}
        return Conditions(**text, **{name: getattr(like, name) for name in image_fields})


# --- writing -----------------------------------------------------------------------------------


class ConditionSetWriter:
    """Writes a new condition set, streaming: `add` batches of items, `close` publishes it.

        with ConditionSetWriter(path, uncond={"text": null_text}) as writer:
            for chunk in prompts:
                writer.add(text=encode(chunk), labels=ids)

    The items' tensors and per-item shapes are fixed by the first `add`; `uncond` holds the
    text fields without the item dimension. Shards hold up to `shard_bytes` each. The set is
    assembled in a temporary directory next to `path` and renamed into place on close, so a
    reader never sees half a set; leaving the block with an exception discards it.
    """

    def __init__(
        self,
        path: str | Path,
        uncond: Mapping[str, Tensor],
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ):
        self.path = Path(path)
        if self.path.exists():
            raise ConfigError(f"{self.path} already exists; a condition set is written once")
        self._uncond = {name: tensor.detach().cpu().contiguous() for name, tensor in uncond.items()}
        bad = nonfinite_items({name: t[None] for name, t in self._uncond.items()})
        if bad:
            raise ConfigError(
                f"{self.path}: the unconditional entry has NaN/Inf in {', '.join(bad[0])}"
            )
        self._shard_bytes = shard_bytes
        self._specs: dict[str, tuple[tuple[int, ...], str]] | None = None
        self._pending: list[dict[str, Tensor]] = []
        self._pending_rows = 0
        self._shards: list[dict] = []
        self._written = 0  # items in the shards so far
        self._staging = staging_dir(self.path)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.discard()

    def _items_per_shard(self) -> int:
        item_bytes = sum(
            int(np.prod(shape)) * DTYPES[dtype].itemsize for shape, dtype in self._specs.values()
        )
        return max(1, self._shard_bytes // item_bytes)

    def add(self, **tensors: Tensor) -> None:
        """Append items: every tensor [n, per-item shape...], the same n for all."""
        specs = {
            name: (tuple(tensor.shape[1:]), DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)))
            for name, tensor in tensors.items()
        }
        rows = {tensor.shape[0] if tensor.ndim else 0 for tensor in tensors.values()}
        if len(rows) != 1 or 0 in rows:  # also no tensors at all
            raise ConfigError(f"add takes tensors with the same, non-zero leading dim; got {rows}")
        if self._specs is None:
            _check_specs(specs, "condition set")
            self._check_uncond(specs)
            self._specs = specs
        elif specs != self._specs:
            raise ConfigError(f"items {specs} do not match the earlier items {self._specs}")
        pending = {name: t.detach().cpu() for name, t in tensors.items()}
        bad = nonfinite_items(pending)
        if bad:
            first = self._written + self._pending_rows
            found = {first + row: names for row, names in bad.items()}
            raise ConfigError(f"{self.path}: {describe_nonfinite(found)}")
        self._pending.append(pending)
        self._pending_rows += rows.pop()
        while self._pending_rows >= self._items_per_shard():
            self._flush(self._items_per_shard())

    def _check_uncond(self, specs: dict) -> None:
        expected = {name: specs[name] for name in UNCOND_FIELDS if name in specs}
        given = {
            name: (tuple(t.shape), DTYPE_NAMES.get(t.dtype, str(t.dtype)))
            for name, t in self._uncond.items()
        }
        if given != expected:
            raise ConfigError(
                f"uncond must hold {expected} (per-item shapes and dtypes of the items' text "
                f"fields), got {given}"
            )

    def _flush(self, rows: int) -> None:
        joined = {name: torch.cat([p[name] for p in self._pending]) for name in self._specs}
        shard = {name: tensor[:rows].contiguous() for name, tensor in joined.items()}
        rest = {name: tensor[rows:] for name, tensor in joined.items()}
        name = shard_name(len(self._shards))
        atomic.save_safetensors(shard, self._staging / name)
        self._shards.append({"file": name, "count": rows})
        self._written += rows
        self._pending_rows -= rows
        self._pending = [rest] if self._pending_rows else []

    def close(self) -> ConditionSet:
        if self._specs is None:
            self.discard()
            raise ConfigError("a condition set needs at least one item")
        if self._pending_rows:
            self._flush(self._pending_rows)
        counts = [shard["count"] for shard in self._shards]
        return publish(self._staging, self._specs, counts, self._uncond, self.path, finite=True)

    def discard(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)


def publish(
    staging: Path,
    specs: dict[str, tuple[tuple[int, ...], str]],
    counts: list[int],
    uncond: Mapping[str, Tensor],
    path: Path,
    finite: bool = False,
) -> ConditionSet:
    """Finish a set whose shards `shard_name(0..)` (holding `counts` items) are in `staging`:
    write the unconditional entry and the manifest, then rename `staging` to `path`.
    `finite`: the caller checked every value (recorded, so validation skips the scan)."""
    atomic.save_safetensors({name: t[None] for name, t in uncond.items()}, staging / UNCOND_FILE)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "count": sum(counts),
        "tensors": {
            name: {"shape": list(shape), "dtype": dtype} for name, (shape, dtype) in specs.items()
        },
        "shards": [{"file": shard_name(i), "count": n} for i, n in enumerate(counts)],
        "uncond": UNCOND_FILE,
        **({"finite": True} if finite else {}),
    }
    atomic.write_json(staging / MANIFEST, manifest)
    os.rename(staging, path)
    return ConditionSet(path)


def write_condition_set(
    path: str | Path,
    items: Mapping[str, Tensor],
    uncond: Mapping[str, Tensor],
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> ConditionSet:
    """Write all items at once (each tensor [N, ...]); see ConditionSetWriter."""
    with ConditionSetWriter(path, uncond, shard_bytes) as writer:
        writer.add(**items)
    return ConditionSet(path)


# --- sampling ----------------------------------------------------------------------------------


class ConditionSampler:
    """Item indices for one data-parallel rank, batch after batch, forever.

    All ranks walk the same stream: shuffled epochs, each a permutation of the items seeded by
    (seed, epoch). A step consumes `batch_size x world` consecutive positions of the stream and
    rank r takes the r-th slice, so ranks never share a position and together see every item
    once per epoch. The state is the stream position (in items, counted over all ranks): a run
    resumed from `state_dict()` draws exactly the batches it would have drawn.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if num_items < 1 or batch_size < 1 or world < 1:
            raise ConfigError(
                f"num_items, batch_size and world must be >= 1, got {num_items}, {batch_size}, "
                f"{world}"
            )
        if not 0 <= rank < world:
            raise ConfigError(f"rank must be in [0, {world}), got {rank}")
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world = rank, world
        self.position = 0
        self._epoch: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self.num_items == 1:  # nothing to shuffle (a generator per one-item epoch is slow)
            return np.zeros(1, dtype=np.int64)
        if self._epoch is None or self._epoch[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            self._epoch = (epoch, order)
        return self._epoch[1]

    def _stream(self, start: int, count: int) -> np.ndarray:
        pieces = []
        while count:
            epoch, offset = divmod(start, self.num_items)
            take = min(count, self.num_items - offset)
            pieces.append(self._permutation(epoch)[offset : offset + take])
            start, count = start + take, count - take
        return np.concatenate(pieces)

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        start = self.position + self.rank * self.batch_size
        indices = self._stream(start, self.batch_size)
        self.position += self.batch_size * self.world
        return torch.from_numpy(indices.astype(np.int64))

    def state_dict(self) -> dict:
        return {"num_items": self.num_items, "seed": self.seed, "position": self.position}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from a saved position; the items and seed must be the ones it was saved with
        (the batch size and world may differ: the position counts items over all ranks)."""
        for key in ("num_items", "seed"):
            if state.get(key) != getattr(self, key):
                raise ConfigError(
                    f"sampler state was saved with {key} = {state.get(key)!r}, this run has "
                    f"{getattr(self, key)!r}"
                )
        position = state.get("position")
        if not isinstance(position, int) or position < 0:
            raise ConfigError(f"sampler state has an invalid position {position!r}")
        self.position = position

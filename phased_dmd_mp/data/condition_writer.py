"""Writing condition sets (format: data/conditions.py).

`ConditionSetWriter` streams a set of fixed-size items (the embedded teachers' class embeddings,
hand-made sets) to disk shard by shard; `python -m phased_dmd_mp.prepare` writes the shards of a
pipeline's prompts itself, in the real-token layout (`real_text_tensors`), and both finish with
`publish`. Every file goes through phased_dmd_mp/atomic.py (written under a temporary name,
renamed when complete; a full disk is one line), and a set appears under its name only once
complete (`staging_dir`).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from phased_dmd_mp import atomic
from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.data.conditions import (
    DTYPE_NAMES,
    DTYPES,
    FORMAT,
    MANIFEST,
    TEXT_OFFSETS,
    UNCOND_FIELDS,
    UNCOND_FILE,
    VERSION,
    ConditionSet,
    Specs,
    check_specs,
    shard_name,
)
from phased_dmd_mp.data.readers import describe_nonfinite, nonfinite_items

DEFAULT_SHARD_BYTES = 1 << 30


def staging_dir(final: Path) -> Path:
    """A new empty directory next to `final`, to be renamed to it once complete (a rename within
    one file system is atomic). Made by mkdir, so it gets the usual permissions."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp")
    staging.mkdir()
    return staging


def real_text_tensors(texts: Sequence[Tensor]) -> dict[str, Tensor]:
    """The real-token layout of `texts` (each [len_i, D]): {"text": [sum len_i, D],
    "text_offsets": [n + 1] int64}."""
    lengths = torch.tensor([len(text) for text in texts], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return {"text": torch.cat(list(texts)), TEXT_OFFSETS: offsets}


def publish(
    staging: Path,
    specs: Specs,
    shards: Sequence[tuple[str, int]],
    uncond: Mapping[str, Tensor],
    path: Path,
    text_tokens: str = "padded",
    finite: bool = False,
) -> ConditionSet:
    """Finish a set whose shards ((file, items), in item order) are in `staging`: write the
    unconditional entry (`uncond`: a one-item shard's tensors), the manifest (with each shard's
    size), then rename `staging` to `path`. `finite`: the caller checked every value (recorded,
    so validation skips the scan)."""
    atomic.save_safetensors(dict(uncond), staging / UNCOND_FILE)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "count": sum(count for _, count in shards),
        "text_tokens": text_tokens,
        "tensors": {
            name: {"shape": list(shape), "dtype": dtype} for name, (shape, dtype) in specs.items()
        },
        "shards": [
            {"file": file, "count": count, "bytes": (staging / file).stat().st_size}
            for file, count in shards
        ],
        "uncond": UNCOND_FILE,
        **({"finite": True} if finite else {}),
    }
    atomic.write_json(staging / MANIFEST, manifest)
    os.rename(staging, path)
    return ConditionSet(path)


class ConditionSetWriter:
    """Writes a new condition set of fixed-size items, streaming: `add` batches of items,
    `close` publishes it.

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
        self._specs: Specs | None = None
        self._pending: list[dict[str, Tensor]] = []
        self._pending_rows = 0
        self._written = 0
        self._shards: list[tuple[str, int]] = []
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
            check_specs(specs, "condition set")
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
        shard = {name: tensor[:rows] for name, tensor in joined.items()}
        rest = {name: tensor[rows:] for name, tensor in joined.items()}
        name = shard_name(self._written, self._written + rows)
        atomic.save_safetensors(shard, self._staging / name)
        self._shards.append((name, rows))
        self._written += rows
        self._pending_rows -= rows
        self._pending = [rest] if self._pending_rows else []

    def close(self) -> ConditionSet:
        if self._specs is None:
            self.discard()
            raise ConfigError("a condition set needs at least one item")
        if self._pending_rows:
            self._flush(self._pending_rows)
        uncond = {name: tensor[None] for name, tensor in self._uncond.items()}
        return publish(self._staging, self._specs, self._shards, uncond, self.path, finite=True)

    def discard(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)


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

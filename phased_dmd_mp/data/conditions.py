"""Condition sets on disk: the only inputs of data-free distillation, one format for every model.

A condition set is a directory:

    conditions.json       {"format": "phased_dmd_mp.conditions", "version": 2, "count": N,
                           "text_tokens": "real" | "padded" | "online",
                           "tensors": {name: {"shape": [per-item shape], "dtype": "bfloat16"}},
                           "shards": [{"file": "items-000000000-000001024.safetensors",
                                       "count": 1024, "bytes": 26214912}, ...],
                           "uncond": "uncond.safetensors", "finite": true}
    items-*.safetensors   the items of a range of prompts (named by that range), each tensor
                          stacked on a leading item dimension [n, ...]
    uncond.safetensors    the unconditional entry of classifier-free guidance (null condition or
                          negative prompt), laid out as a shard of one item

Tensors are named like the fields of `conditioning.Conditions`: `text` [L, D] per item
(required: class embeddings, umT5 or Qwen2.5-VL prompt embeddings), `text_mask` [L] (1 = real
token), `image_latents` [C, F, H, W] and `image_embeds` [T, D'] (I2V first-frame latents, Wan2.1
CLIP tokens), plus `labels` (an int per item, e.g. a digit class). The unconditional entry holds
the text fields only: under CFG the negative branch sees the batch's own image conditioning (as
Wan's I2V pipeline does), so it is taken from that batch.

How text is stored (`text_tokens`):
- "real" (`python -m phased_dmd_mp.prepare`): each prompt's real tokens only, in the dtype its
  text encoder ran in. A shard holds `text` [tokens of all its items, D] and `text_offsets`
  [n + 1] (int64, item i is rows offsets[i]:offsets[i+1]); `text_mask` is not stored. The reader
  pads as the pipeline's `encode_prompt` does: without `text_mask` (Wan) with zeros to L = 512
  tokens (WanPipeline pads to max_sequence_length); with it (Qwen-Image) to the longest prompt of
  the batch, the mask marking the real tokens (QwenImagePipeline); L is then the set's longest.
- "padded" (ConditionSetWriter, version 1 sets): every item stored at its full [L, D].
- "online" (`prepare --online`, data/online.py): no shards; the prompt list, encoded by the
  pipeline's text encoder when a batch is drawn.

`finite` (optional) records that the writer found every value finite, so validation need not
read the items again; a set without it is scanned (data/readers.py `check_finite`). Version 1
(every item padded, shards named items-00000.safetensors) still loads.

`open_conditions(path)` opens any set; `ConditionSet(path)` reads a stored one lazily: opening
reads the manifest (one entry per shard) and the unconditional entry, a batch reads only its
items (safetensors memory maps; a shard's size and header are checked when first read), so
start-up time and memory do not grow with the number of prompts; `check_files` stats every
shard (validate_run, before a run loads its models). `ConditionSampler` draws the training
batches of each data-parallel rank, deterministically and resumably. Writing:
data/condition_writer.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from phased_dmd_mp.conditioning import Conditions
from phased_dmd_mp.config import ConfigError

FORMAT = "phased_dmd_mp.conditions"
VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "conditions.json"
UNCOND_FILE = "uncond.safetensors"
TEXT_LAYOUTS = ("real", "padded", "online")
TEXT_OFFSETS = "text_offsets"  # real layout: item i is text rows offsets[i]:offsets[i+1]
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


def shard_name(start: int, stop: int) -> str:
    """The file of the items [start, stop): named by the range, so a set prepared by any number
    of processes has the same files."""
    return f"items-{start:09d}-{stop:09d}.safetensors"


@dataclass(frozen=True)
class Shard:
    file: str
    count: int
    bytes: int | None  # file size (None in version 1 manifests)


Specs = dict[str, tuple[tuple[int, ...], str]]  # name: (per-item shape, dtype name)


# --- the manifest ------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict:
    """The checked manifest of the condition set at `path`: {count, specs (name: (per-item
    shape, dtype)), text_tokens ("real" | "padded" | "online"), shards (list of Shard), uncond,
    online (data/online.py's settings or None), finite (its writer checked every value)};
    reads conditions.json only. Raises ConfigError
    naming the file."""
    path = Path(path)
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
    version = manifest.get("version")
    if version not in READABLE_VERSIONS:
        raise ConfigError(
            f"{manifest_path} has format version {version!r}; this code reads versions "
            f"{list(READABLE_VERSIONS)}"
        )
    layout = manifest.get("text_tokens", "padded") if version >= 2 else "padded"
    if layout not in TEXT_LAYOUTS:
        raise ConfigError(f"{manifest_path}: text_tokens {layout!r} is not one of {TEXT_LAYOUTS}")
    online = layout == "online"
    try:
        count, tensors = manifest["count"], manifest["tensors"]
        specs = {
            name: (tuple(int(d) for d in spec["shape"]), spec["dtype"])
            for name, spec in tensors.items()
        }
        shards = [
            Shard(str(s["file"]), int(s["count"]), int(s["bytes"]) if "bytes" in s else None)
            for s in ([] if online else manifest["shards"])
        ]
        uncond = None if online else str(manifest["uncond"])
        settings = dict(manifest["online"]) if online else None
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ConfigError(f"{manifest_path} is malformed ({error!r})") from error
    if not isinstance(count, int) or count < 1:
        raise ConfigError(f"{manifest_path}: count must be a positive integer, got {count!r}")
    check_specs(specs, manifest_path)
    if not online and sum(s.count for s in shards) != count:
        raise ConfigError(
            f"{manifest_path}: the shards hold {sum(s.count for s in shards)} items, "
            f"count says {count}"
        )
    return {
        "count": count,
        "specs": specs,
        "text_tokens": layout,
        "shards": shards,
        "uncond": uncond,
        "online": settings,
        "finite": manifest.get("finite") is True,
    }


def check_specs(specs: Specs, where: object) -> None:
    """The per-item tensors `specs` form a condition set (names, dtypes, shapes agree)."""
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
    if len(specs["text"][0]) != 2:
        raise ConfigError(f"{where}: text must be [tokens, width] per item, not {specs['text'][0]}")
    if "text_mask" in specs and specs["text_mask"][0] != specs["text"][0][:1]:
        raise ConfigError(
            f"{where}: text_mask {list(specs['text_mask'][0])} must be [text tokens] of text "
            f"{list(specs['text'][0])}"
        )


def check_size(path: Path, shard: Shard) -> None:
    """The shard file exists with the size the manifest records (a stat)."""
    file = path / shard.file
    if not file.is_file():
        raise ConfigError(f"condition set file {file} is missing")
    if shard.bytes is not None and file.stat().st_size != shard.bytes:
        raise ConfigError(
            f"{file} is {file.stat().st_size} bytes, {path / MANIFEST} says {shard.bytes} "
            "(truncated or replaced)"
        )


def check_files(path: Path, manifest: dict) -> None:
    """Every file the manifest names exists, shards with the sizes it records (one stat per
    shard, none read; validate_run calls it before any model loads)."""
    for shard in manifest["shards"]:
        check_size(path, shard)
    if manifest["uncond"] is not None and not (path / manifest["uncond"]).is_file():
        raise ConfigError(f"condition set file {path / manifest['uncond']} is missing")
    online = manifest["online"]
    if online is not None:
        try:
            files = [path / online["prompts"], path / online["prompt_offsets"]]
            pipeline = Path(online["pipeline"])
        except (KeyError, TypeError) as error:
            raise ConfigError(f"{path / MANIFEST}: online settings lack {error}") from None
        for file in files:
            if not file.is_file():
                raise ConfigError(f"condition set file {file} is missing")
        if not (pipeline / "model_index.json").is_file():
            raise ConfigError(
                f"{path / MANIFEST}: the online set's pipeline {pipeline} is not a diffusers "
                "pipeline folder (no model_index.json)"
            )


def file_tensors(specs: Specs, layout: str, rows: int) -> dict[str, tuple[list, str]]:
    """What a shard of `rows` items holds: name: ([shape, None = any size], dtype)."""
    expected = {name: ([rows, *shape], dtype) for name, (shape, dtype) in specs.items()}
    if layout == "real":
        expected.pop("text_mask", None)  # the lengths are the mask
        expected["text"] = ([None, specs["text"][0][1]], specs["text"][1])
        expected[TEXT_OFFSETS] = ([rows + 1], "int64")
    return expected


def _check_file(file: Path, expected: dict[str, tuple[list, str]]) -> None:
    """The safetensors header of `file` holds exactly the tensors `expected`."""
    try:
        with safe_open(file, framework="pt") as handle:
            names = set(handle.keys())
            if names != set(expected):
                raise ConfigError(
                    f"{file} holds tensors {sorted(names)}, the manifest implies {sorted(expected)}"
                )
            for name, (shape, dtype) in expected.items():
                view = handle.get_slice(name)
                got = view.get_shape()
                same = len(got) == len(shape) and all(e in (None, g) for e, g in zip(shape, got))
                if not same or view.get_dtype() != SAFETENSORS_DTYPES[dtype]:
                    want = ["*" if e is None else e for e in shape]
                    raise ConfigError(
                        f"{file}: {name} is {view.get_dtype()} {got}, the manifest says "
                        f"{SAFETENSORS_DTYPES[dtype]} {want}".replace("'*'", "*")
                    )
    except SafetensorError as error:
        raise ConfigError(f"{file} is not a readable safetensors file ({error})") from error


# --- padding -----------------------------------------------------------------------------------


def pad_real_text(texts: Sequence[Tensor], tokens: int, masked: bool) -> dict[str, Tensor]:
    """A batch of real-token embeddings (each [len_i, D]) padded as its pipeline pads it:
    {"text": [B, L, D]} with L = `tokens` zero-padded (WanPipeline.encode_prompt, unmasked), or
    {"text": [B, L, D], "text_mask": [B, L] int64} with L the longest of the batch
    (QwenImagePipeline.encode_prompt, `masked`). Raises ConfigError for a text longer than
    `tokens`."""
    longest = max(len(text) for text in texts)
    if longest > tokens:
        raise ConfigError(f"a text of {longest} tokens is longer than the set's {tokens}")
    length = longest if masked else tokens
    first = texts[0]
    out = first.new_zeros((len(texts), length, first.shape[-1]))
    mask = torch.zeros((len(texts), length), dtype=torch.int64)
    for row, text in enumerate(texts):
        out[row, : len(text)] = text
        mask[row, : len(text)] = 1
    return {"text": out, "text_mask": mask} if masked else {"text": out}


# --- reading -----------------------------------------------------------------------------------


def open_conditions(path: str | Path):
    """The condition set at `path`: a ConditionSet, or for an online set (prepare --online) an
    OnlineConditionSet, which loads the pipeline's text encoder (data/online.py)."""
    path = Path(path)
    if read_manifest(path)["text_tokens"] == "online":
        from phased_dmd_mp.data.online import OnlineConditionSet

        return OnlineConditionSet(path)
    return ConditionSet(path)


class ConditionSet:
    """A stored condition set (format in the module docstring). Opening reads the manifest and
    the unconditional entry only; each shard's size and header are checked when a batch first
    reads it (validate_run stats them all before a run loads its models)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest["text_tokens"] == "online":
            raise ConfigError(
                f"{self.path} is an online condition set (prepare --online): open it with "
                "open_conditions"
            )
        self.specs: Specs = manifest["specs"]
        self.text_tokens: str = manifest["text_tokens"]
        self._count = manifest["count"]
        self._shards: list[Shard] = manifest["shards"]
        self._starts = np.cumsum([0] + [shard.count for shard in self._shards])
        self._checked: set[int] = set()
        uncond_specs = {k: v for k, v in self.specs.items() if k in UNCOND_FIELDS}
        uncond_file = self.path / manifest["uncond"]
        if not uncond_file.is_file():
            raise ConfigError(f"condition set file {uncond_file} is missing")
        _check_file(uncond_file, file_tensors(uncond_specs, self.text_tokens, 1))
        with safe_open(uncond_file, framework="pt") as handle:
            self._uncond = self._conditions(
                self._read_rows(handle, uncond_file, np.zeros(1, np.int64), UNCOND_FIELDS)
            )

    def __len__(self) -> int:
        return self._count

    @property
    def fields(self) -> tuple[str, ...]:
        """The Conditions fields this set provides."""
        return tuple(name for name in CONDITION_FIELDS if name in self.specs)

    def shape(self, name: str) -> tuple[int, ...]:
        """Per-item shape of the tensor `name` (text: the most tokens a batch is padded to)."""
        return self.specs[name][0]

    @cached_property
    def labels(self) -> Tensor | None:
        """Every item's label (int64 [N]), or None for sets without labels."""
        if LABELS not in self.specs:
            return None
        return self._read(np.arange(self._count), (LABELS,))[LABELS].long()

    def _read_rows(self, handle, file: Path, rows: np.ndarray, names) -> dict:
        """`names` of the items `rows` of one open shard: tensors [n, ...], real text as a list
        of [len_i, D]."""
        out = {}
        for name in names:
            if name not in self.specs or (name == "text_mask" and self.text_tokens == "real"):
                continue
            if name == "text" and self.text_tokens == "real":
                offsets = handle.get_slice(TEXT_OFFSETS)
                starts, ends = offsets[rows.tolist()], offsets[(rows + 1).tolist()]
                view, tokens = handle.get_slice("text"), self.shape("text")[0]
                total = view.get_shape()[0]
                texts = []
                for start, end in zip(starts.tolist(), ends.tolist()):
                    if not 0 <= start < end <= total or end - start > tokens:
                        raise ConfigError(
                            f"{file}: text_offsets give rows [{start}, {end}) of {total}, not "
                            f"1 to {tokens} tokens"
                        )
                    texts.append(view[start:end])
                out[name] = texts
            else:
                out[name] = handle.get_slice(name)[rows.tolist()]
        return out

    def _conditions(self, parts: dict) -> Conditions:
        if self.text_tokens == "real":
            masked = "text_mask" in self.specs
            parts = {**parts, **pad_real_text(parts["text"], self.shape("text")[0], masked)}
        return Conditions(**{name: parts[name] for name in CONDITION_FIELDS if name in parts})

    def _read(self, indices: np.ndarray, names) -> dict:
        shards = np.searchsorted(self._starts, indices, side="right") - 1
        out = {}
        for shard in np.unique(shards):
            positions = np.flatnonzero(shards == shard)
            file = self.path / self._shards[shard].file
            if shard not in self._checked:
                check_size(self.path, self._shards[shard])
                expected = file_tensors(self.specs, self.text_tokens, self._shards[shard].count)
                _check_file(file, expected)
                self._checked.add(shard)
            with safe_open(file, framework="pt") as handle:
                rows = indices[positions] - self._starts[shard]
                for name, values in self._read_rows(handle, file, rows, names).items():
                    if name not in out:
                        out[name] = [None] * len(indices)
                    for position, value in zip(positions.tolist(), values):
                        out[name][position] = value
        return {
            name: values if name == "text" and self.text_tokens == "real" else torch.stack(values)
            for name, values in out.items()
        }

    def batch(self, indices: Sequence[int] | Tensor) -> Conditions:
        """The conditions of the items `indices` (repeats allowed), in that order, padded as
        the pipeline pads a batch (module docstring)."""
        indices = np.asarray(torch.as_tensor(indices).flatten(), dtype=np.int64)
        if len(indices) == 0:
            raise ValueError("batch needs at least one index")
        if indices.min() < 0 or indices.max() >= self._count:
            raise IndexError(f"indices must be in [0, {self._count}), got {indices.tolist()}")
        return self._conditions(self._read(indices, self.fields))

    def uncond(self, batch_size: int, like: Conditions | None = None) -> Conditions:
        """The unconditional entry repeated `batch_size` times. A set with image conditioning
        needs `like`, the conditional batch whose image fields the negative branch shares."""
        return repeat_uncond(self._uncond, self.fields, batch_size, like)


def repeat_uncond(
    uncond: Conditions, fields: Sequence[str], batch_size: int, like: Conditions | None
) -> Conditions:
    """`uncond` (one item, text fields) as a batch of `batch_size` sharing `like`'s image
    fields (ConditionSet.uncond)."""
    image_fields = [name for name in fields if name not in UNCOND_FIELDS]
    if image_fields and like is None:
        raise ValueError(
            f"this condition set has {image_fields}: pass like=<the conditional batch>"
        )
    if like is not None and like.batch_size != batch_size:
        raise ValueError(f"like has batch size {like.batch_size}, not {batch_size}")
    # Views of one stored row: a batch of T5 embeddings would otherwise cost B x 4 MB.
    text = {
        name: getattr(uncond, name).expand(batch_size, *getattr(uncond, name).shape[1:])
        for name in UNCOND_FIELDS
        if getattr(uncond, name) is not None
    }
    return Conditions(**text, **{name: getattr(like, name) for name in image_fields})


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

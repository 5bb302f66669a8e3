"""Online condition sets (`python -m phased_dmd_mp.prepare --online`): the prompt list only, each
training batch encoded by the pipeline's text encoder when the runner draws it.

For prompt sets too large to store (a cached Wan prompt of 100 real tokens is 0.8 MB in bf16):
the set holds

    conditions.json       the manifest (data/conditions.py) with "text_tokens": "online" and
                          "online": {"pipeline": folder, "prompts": "prompts.txt",
                          "prompt_offsets": "prompt_offsets.npy", "negative_prompt": "",
                          "dtype": "bfloat16", "device": "gpu"}
    prompts.txt           one prompt per line (UTF-8)
    prompt_offsets.npy    int64 [N + 1]: prompt i is bytes offsets[i]:offsets[i+1] - 1

and `OnlineConditionSet` loads the pipeline's text encoder (data/encoders.py, the code the
cached path stores) in that dtype on "gpu" (each rank's own GPU) or "cpu", encodes the negative
prompt once, and every drawn batch in one `encode_prompt` call, padded as the cached reader pads
(conditions.pad_real_text). Prompts are read by offset from a memory map: opening costs the same
for any number of prompts. Image-to-video sets are not online: their first frames would need the
VAE (and CLIP) on every rank.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from phased_dmd_mp.conditioning import Conditions
from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.data.condition_writer import staging_dir
from phased_dmd_mp.data.conditions import (
    CONDITION_FIELDS,
    FORMAT,
    MANIFEST,
    VERSION,
    check_files,
    pad_real_text,
    read_manifest,
    repeat_uncond,
)
from phased_dmd_mp.data.encoders import (
    ENCODER_DTYPES,
    ConditionEncoder,
    encoder_device,
    qwen_text_len,
)
from phased_dmd_mp.data.pipeline_folder import (
    WAN_TEXT_TOKENS,
    PipelineFolder,
    read_pipeline,
    text_width,
)

PROMPTS_FILE = "prompts.txt"
OFFSETS_FILE = "prompt_offsets.npy"
DEVICES = ("gpu", "cpu")


def write_online_set(
    path: Path,
    pipe: PipelineFolder,
    prompts: Sequence[str],
    negative_prompt: str,
    dtype: str,
    device: str,
) -> None:
    """Write the online set of `prompts` for `pipe` at `path` (assembled next to it, renamed
    when complete). Loads the tokenizer only (Qwen-Image: the longest prompt's tokens)."""
    if pipe.kind == "wan_i2v":
        raise ConfigError(
            "--online encodes text only: image-to-video first frames need the VAE and CLIP, "
            "prepare them without --online"
        )
    staging = staging_dir(path)
    lines = [prompt.encode("utf-8") + b"\n" for prompt in prompts]
    (staging / PROMPTS_FILE).write_bytes(b"".join(lines))
    np.save(staging / OFFSETS_FILE, np.cumsum([0] + [len(line) for line in lines]))
    if pipe.is_wan:
        tokens = WAN_TEXT_TOKENS
    else:
        tokens = qwen_text_len(pipe, [*prompts, negative_prompt])
    tensors = {"text": {"shape": [tokens, text_width(pipe)], "dtype": dtype}}
    if not pipe.is_wan:
        tensors["text_mask"] = {"shape": [tokens], "dtype": "int64"}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "count": len(prompts),
        "text_tokens": "online",
        "tensors": tensors,
        "online": {
            "pipeline": str(pipe.path.resolve()),
            "prompts": PROMPTS_FILE,
            "prompt_offsets": OFFSETS_FILE,
            "negative_prompt": negative_prompt,
            "dtype": dtype,
            "device": device,
        },
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    os.rename(staging, path)


class OnlineConditionSet:
    """An online condition set (module docstring), read like a ConditionSet: len, fields,
    shape, batch, uncond. `device` ("gpu" | "cpu") overrides the manifest's."""

    text_tokens = "online"
    labels = None

    def __init__(self, path: str | Path, device: str | None = None):
        self.path = Path(path)
        manifest = read_manifest(self.path)
        check_files(self.path, manifest)
        settings = manifest["online"]
        self.specs = manifest["specs"]
        self._count = manifest["count"]
        device = device or settings["device"]
        if device not in DEVICES or settings["dtype"] not in ENCODER_DTYPES:
            raise ConfigError(
                f"{self.path / MANIFEST}: online device {device!r} / dtype {settings['dtype']!r} "
                f"must be one of {DEVICES} / {sorted(ENCODER_DTYPES)}"
            )
        self._offsets = np.load(self.path / settings["prompt_offsets"], mmap_mode="r")
        if self._offsets.shape != (self._count + 1,):
            raise ConfigError(
                f"{self.path / settings['prompt_offsets']} holds {len(self._offsets) - 1} "
                f"prompts, the manifest counts {self._count}"
            )
        self._prompts_file = self.path / settings["prompts"]
        self.encoder = ConditionEncoder(
            read_pipeline(settings["pipeline"]),
            ENCODER_DTYPES[settings["dtype"]],
            encoder_device(device),
        )
        self._uncond = self._encode([settings["negative_prompt"]])

    def __len__(self) -> int:
        return self._count

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(name for name in CONDITION_FIELDS if name in self.specs)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.specs[name][0]

    def prompts(self, indices: Sequence[int]) -> list[str]:
        """The prompts of the items `indices`, read by offset (no other prompt is read)."""
        out = []
        with open(self._prompts_file, "rb") as handle:
            for index in indices:
                start, end = int(self._offsets[index]), int(self._offsets[index + 1])
                handle.seek(start)
                out.append(handle.read(end - start - 1).decode("utf-8"))
        return out

    def _encode(self, prompts: list[str]) -> Conditions:
        """Raises ConfigError naming a prompt the text encoder gives NaN/Inf for (prepare
        refuses those too)."""
        masked = "text_mask" in self.specs
        texts = self.encoder.text(prompts)
        for prompt, text in zip(prompts, texts):
            if not torch.isfinite(text).all():
                raise ConfigError(
                    f"{self.path}: the text encoder gave NaN/Inf for the prompt {prompt!r}"
                )
        return Conditions(**pad_real_text(texts, self.shape("text")[0], masked))

    def batch(self, indices) -> Conditions:
        """The conditions of the items `indices`, encoded now in one `encode_prompt` call."""
        indices = torch.as_tensor(indices).flatten().tolist()
        if not indices:
            raise ValueError("batch needs at least one index")
        if min(indices) < 0 or max(indices) >= self._count:
            raise IndexError(f"indices must be in [0, {self._count}), got {indices}")
        return self._encode(self.prompts(indices))

    def uncond(self, batch_size: int, like: Conditions | None = None) -> Conditions:
        return repeat_uncond(self._uncond, self.fields, batch_size, like)

"""Exact parameter counts of one rank's pipeline stage, from the model built on the meta device.

`stage_parameters(arch, tp, pp, pp_rank, lora_rank)` builds the stage of `arch` that rank
(any tensor-parallel rank: they hold equal shards) of a tp x pp layout holds, on the meta
device through emulated process groups (`emulate.rank_groups`), optionally with one LoRA
adapter of rank `lora_rank` on the default targets, and counts its elements. Nothing is
allocated, so the 20B Qwen-Image takes about a second; results are cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from phased_dmd_mp.models import ExecutionConfig, QwenImageConfig, WanConfig, build
from phased_dmd_mp.models.lora import add_lora, adapter_parameters
from phased_dmd_mp.memory.emulate import rank_groups
from phased_dmd_mp.parallel.state import ensure_initialized


@dataclass(frozen=True)
class StageParameters:
    weights: int  # elements of the stage's own weights (the base, without adapters)
    adapter: int  # elements of one LoRA adapter on this stage (0 without lora_rank)


@cache
def stage_parameters(
    arch: WanConfig | QwenImageConfig, tp: int, pp: int, pp_rank: int, lora_rank: int = 0
) -> StageParameters:
    """Elements held by pipeline stage `pp_rank` of a tp x pp layout (one tensor-parallel rank)."""
    ensure_initialized()  # megatron reads group sizes only once torch.distributed is up
    with torch.device("meta"):
        stage = build(arch, ExecutionConfig(), rank_groups(tp, 0, pp, pp_rank), init_weights=False)
        weights = sum(p.numel() for p in stage.parameters())
        adapter = 0
        if lora_rank:
            add_lora(stage, lora_rank, 1.0, 1)
            adapter = sum(p.numel() for p in adapter_parameters(stage, 0))
    return StageParameters(weights, adapter)


def distinct_stages(pp: int) -> list[int]:
    """Pipeline ranks whose stages differ: the first (embedders), a middle one, the last (head)."""
    return sorted({0, min(1, pp - 1), pp - 1})

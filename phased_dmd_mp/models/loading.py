"""Build our DiTs and fill them from diffusers modules or checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_pg_rank, get_pg_size
from torch import Tensor, nn

from phased_dmd_mp import atomic
from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.models import convert
from phased_dmd_mp.models.config import DTYPES, ExecutionConfig, QwenImageConfig, WanConfig
from phased_dmd_mp.models.dit import DiTStage
from phased_dmd_mp.models.qwen_image import QwenImageDiT
from phased_dmd_mp.models.wan import WanDiT
from phased_dmd_mp.parallel.state import ensure_initialized


def build(
    arch: WanConfig | QwenImageConfig,
    execution: ExecutionConfig | None = None,
    pg_collection: ProcessGroupCollection | None = None,
    *,
    init_weights: bool = True,
) -> DiTStage:
    """This rank's stage of the DiT `arch` on the current process groups."""
    cls = WanDiT if isinstance(arch, WanConfig) else QwenImageDiT
    return cls(arch, execution, pg_collection, init_weights=init_weights)


def _own_rank(model: DiTStage) -> tuple[tuple[int, int], tuple[int, int]]:
    """((tensor_parallel, pipeline_parallel), (tp_rank, pp_rank)) of the model's stage."""
    groups = model.pg_collection
    layout = (get_pg_size(groups.tp), get_pg_size(groups.pp))
    return layout, (get_pg_rank(groups.tp), get_pg_rank(groups.pp))


def load_whole_state_dict(model: DiTStage, whole: dict[str, Tensor]) -> None:
    """Load this rank's shard of a whole-model state dict (names of a TP = PP = 1 model)."""
    layout, rank = _own_rank(model)
    model.load_state_dict(convert.shard(whole, model.arch, *layout)[rank], strict=True)


def save_checkpoint(model: DiTStage, path: str | Path) -> None:
    """Write this rank's shard into the folder `path` (`convert` reads and exports it); the
    first data-parallel replica writes, global rank 0 also writes config.json."""
    (tp, pp), (tp_rank, pp_rank) = _own_rank(model)
    shard = {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if isinstance(v, Tensor) and not k.endswith("_extra_state")
    }

    def write():
        if get_pg_rank(model.pg_collection.dp_cp) == 0:  # one writer per shard, also CP
            folder = Path(path)
            folder.mkdir(parents=True, exist_ok=True)
            atomic.save_safetensors(shard, folder / convert.shard_file(tp_rank, pp_rank))
            if dist.get_rank() == 0:
                convert.write_layout(folder, model.arch, tp, pp)

    atomic.collective_write(write)  # a full disk on any rank fails every rank at once


def load_checkpoint(model: DiTStage, path: str | Path) -> None:
    """Load this rank's shard of a checkpoint written by `save_checkpoint` or `convert`. A
    checkpoint of another TP x PP layout is resharded on load (each rank then reads it whole)."""
    model.load_state_dict(read_stored_shard(model, path), strict=True)


def read_stored_shard(model: DiTStage, path: str | Path) -> dict[str, Tensor]:
    """This rank's shard of the weights stored in `path`, a diffusers transformer folder or our
    sharded checkpoint (of any TP x PP layout), keyed as `model.state_dict()` and in the dtypes
    stored there (an fp32 checkpoint stays fp32 whatever the model computes in). Raises
    ConfigError for a folder that holds another architecture."""
    layout, rank = _own_rank(model)
    config = json.loads((Path(path) / "config.json").read_text())
    if "_class_name" in config:  # diffusers
        _, arch, state = convert.read_diffusers_dir(path)
        whole, tp, pp = convert.diffusers_to_ours(state, arch), None, None
    else:
        arch, tp, pp = convert.read_layout(path)
    if arch != model.arch:
        raise ConfigError(f"{path} holds {arch}, not this model's {model.arch}")
    if layout == (tp, pp):
        return convert.read_shard(path, *rank)
    if tp is not None:
        whole = convert.unshard(convert.read_sharded_dir(path)[1], arch)
    return convert.shard(whole, arch, *layout)[rank]


def from_diffusers(
    module: nn.Module,
    execution: ExecutionConfig | None = None,
    pg_collection: ProcessGroupCollection | None = None,
) -> DiTStage:
    """Our model with the weights of a diffusers `WanTransformer3DModel` or
    `QwenImageTransformer2DModel`; under tensor/pipeline parallelism, this rank's shard.

    The execution config defaults to the module's dtype, no recompute, no FP8.
    """
    kinds = {v: k for k, v in convert.DIFFUSERS_CLASSES.items()}
    kind = kinds.get(type(module).__name__)
    if kind is None:
        raise ConfigError(
            f"from_diffusers takes one of {sorted(kinds)}, got {type(module).__name__}"
        )
    arch = convert.MODEL_KINDS[kind].from_diffusers(module.config)
    if execution is None:
        dtype = next(module.parameters()).dtype
        names = {v: k for k, v in DTYPES.items()}
        if dtype not in names:
            raise ConfigError(f"unsupported parameter dtype {dtype}")
        execution = ExecutionConfig(dtype=names[dtype])
    model = build(arch, execution, pg_collection or ensure_initialized(), init_weights=False)
    whole = convert.diffusers_to_ours(module.state_dict(), arch)
    with torch.no_grad():
        load_whole_state_dict(model, whole)
    return model

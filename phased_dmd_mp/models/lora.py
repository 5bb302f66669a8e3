"""LoRA generator experts on the tensor-parallel DiTs: one frozen base, several adapters.

Phased DMD trains each generator expert as a LoRA (rank 64, alpha 8 in the paper) on the
teacher's weights, so the experts of an MoE generator share one backbone and differ by their
adapters only; `set_active_adapter` switches between them, and `None` runs the base (the
teacher). Each adapter adds (alpha / rank) B A x to a linear's output, with A [rank, in]
initialised like PEFT (kaiming-uniform) and B [out, rank] at zero, so a fresh adapter is the base.

    config = add_lora(model, rank=64, alpha=8, num_adapters=2)     # freezes the base
    set_active_adapter(model, 0)                                   # expert 1
    optimizer = torch.optim.AdamW(adapter_parameters(model, 0), lr=5e-5, betas=(0, 0.999))
    save_lora(model, 0, "expert_1_lora")       # all ranks; diffusers' load_lora_weights reads it
    merged = merged_state_dict(model, 0)       # this rank's base + adapter, our naming

Targets are the tensor-parallel linears of every layer, named as in our modules (the rules of
`convert.py` give their diffusers names). `default_targets`: attention (self, cross, joint:
q/k/v and output projections, Wan2.1 I2V's image k/v) and MLP in/out, the linears that act on
every token. Qwen-Image's per-layer modulation linears (`img_modulation`, `txt_modulation`) can
be added through `targets` but are not adapted by default: they see the timestep embedding only
(one row per sample), their B's (6 x hidden rows each) would add 44% to a Qwen-Image adapter, and
Wan's counterpart (`time_projection`, in the embedder) is no layer linear, so by default both
models adapt the same token paths.

Tensor parallelism is exact. A column-parallel linear (output split over the TP group) gets a
replicated A and a B split along the output: the rank-r activation A x goes through megatron's
copy-to-TP-region, so in backward its gradient, to which every rank's B shard contributes, is
summed over the group (A's gradient is then whole and equal on all ranks). A row-parallel linear
(input split) gets an A split along the input and a replicated B: the partial products A_t x_t
are summed by reduce-from-TP-region before B. Split parameters carry megatron's
`tensor_model_parallel` / `partition_dim` attributes, so gradient norms count them once per
shard. Pipeline parallelism needs nothing: adapters live in the layers of each stage.
Sequence parallelism (parallel/sequence.py) moves the adapter's rank-r rows as the linear moves
its own: a column linear's A x of this rank's rows is all-gathered before B (its gradient
reduce-scattered, which also sums the B shards' contributions), a row linear's partial products
are reduce-scattered to this rank's rows before B; the replicated factor that then sees local
rows only (column A, row B) is tagged `sequence_parallel`, so its gradient is summed over TP.
Context parallelism needs nothing either: an adapter acts on each rank's rows like its linear.

The adapter path is a forward hook on megatron's linears, so the FP8 "torch" backend's linears
(subclasses of megatron's) take adapters too; the adapter matmuls stay in the model dtype.
Transformer Engine's linears (fp8="te") are refused.

Under activation recompute a layer's forward runs again in backward with the adapter active
then: switch adapters between forward-backward calls (megatron schedule calls), never between a
forward and its backward.

On disk an adapter is a diffusers LoRA file (`pytorch_lora_weights.safetensors`, keys such as
`transformer.blocks.0.attn1.to_q.lora_A.weight`, the adapter config in the safetensors metadata
where diffusers' `load_lora_weights` looks for it), with alpha / rank folded into lora_B and
lora_alpha = r, so a loader that ignores the metadata applies it at the same strength. Our
fused q/k/v linears export as separate to_q/to_k/to_v adapters that share lora_A and split
lora_B by rows, which is exact.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.utils import get_pg_rank, get_pg_size
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from phased_dmd_mp import atomic
from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.models import convert
from phased_dmd_mp.models.config import QwenImageConfig, WanConfig
from phased_dmd_mp.models.convert import LAYER_PREFIX, Rule
from phased_dmd_mp.models.dit import DiTStage

Parallel = Literal["column", "row"]
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
DIFFUSERS_PREFIX = "transformer."  # diffusers pipelines key a transformer's LoRA with it
METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the LoraConfig arguments
NOT_DEFAULT = ("img_modulation", "txt_modulation")
_KEY = re.compile(rf"^{re.escape(LAYER_PREFIX)}(\d+)\.(.+)\.lora_([AB])$")


@dataclass(frozen=True)
class LoRAConfig:
    """The adapters of a model: rank, alpha (scale alpha / rank), count and target linears."""

    rank: int
    alpha: float
    num_adapters: int
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# --- targets ---------------------------------------------------------------------------------


def _target_rules(arch: WanConfig | QwenImageConfig) -> dict[str, Rule]:
    """The layer linears an adapter can target, by our name within a layer, with the convert
    rule that names them in diffusers and tells how tensor parallelism splits them."""
    _, layer_rules = convert.rules(arch)
    return {
        rule.ours.removeprefix("{}."): rule
        for rule in layer_rules
        if rule.split in ("column", "row")
    }


def default_targets(arch: WanConfig | QwenImageConfig) -> tuple[str, ...]:
    """Attention and MLP linears of every layer (the module docstring says why)."""
    return tuple(t for t in _target_rules(arch) if t not in NOT_DEFAULT)


# --- adapters on the linears -----------------------------------------------------------------


class LinearAdapters(nn.Module):
    """The adapters of one tensor-parallel linear: A[i] [rank, in], B[i] [out, rank] (this
    rank's shards) and which one is active. `sequence_parallel`: the linear's (megatron's
    attribute), whose rows the adapter moves alike."""

    def __init__(
        self,
        parallel: Parallel,
        A: list[Tensor],
        B: list[Tensor],
        scale: float,
        group,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        self.parallel, self.scale, self.tp_group = parallel, scale, group
        self.sequence_parallel = sequence_parallel
        self.A = nn.ParameterList([nn.Parameter(a) for a in A])
        self.B = nn.ParameterList([nn.Parameter(b) for b in B])
        split, local_rows = (self.B, self.A) if parallel == "column" else (self.A, self.B)
        for param in split:
            set_tensor_model_parallel_attributes(param, True, 0 if parallel == "column" else 1, 1)
        if sequence_parallel:
            for param in local_rows:
                param.sequence_parallel = True
        self.active: int | None = None

    def delta(self, x: Tensor) -> Tensor:
        """scale * B A x for the active adapter, in this rank's share of the output."""
        A, B = self.A[self.active], self.B[self.active]
        group = self.tp_group
        if self.parallel == "column" and self.sequence_parallel:
            h = gather_from_sequence_parallel_region(F.linear(x, A), group=group)
        elif self.parallel == "column":
            h = copy_to_tensor_model_parallel_region(F.linear(x, A), group=group)
        elif self.sequence_parallel:
            h = reduce_scatter_to_sequence_parallel_region(F.linear(x, A), group=group)
        else:
            h = reduce_from_tensor_model_parallel_region(F.linear(x, A), group=group)
        return F.linear(h * self.scale, B)

    def merged_weight(self, weight: Tensor, index: int) -> Tensor:
        delta = self.B[index].detach().float() @ self.A[index].detach().float()
        return (weight.detach().float() + self.scale * delta).to(weight.dtype)


def _add_adapter_output(linear, args, kwargs, output):
    """Forward hook of an adapted linear: megatron's linears return (output, bias)."""
    adapters = linear.lora
    if adapters.active is None:
        return None
    x = args[0] if args else kwargs["input_"]
    out, bias = output
    return out + adapters.delta(x), bias


def _linears(model: DiTStage, targets: tuple[str, ...]):
    """(local layer index, global layer index, target, linear) over this stage's layers."""
    for local, layer in enumerate(model.decoder.layers):
        for target in targets:
            yield local, layer.layer_number - 1, target, layer.get_submodule(target)


def _stage(model: nn.Module) -> DiTStage:
    """The DiT stage, also inside wrappers such as megatron's DDP."""
    while not isinstance(model, DiTStage):
        if not isinstance(getattr(model, "module", None), nn.Module):
            raise ConfigError(f"expected a DiT stage (models.build), got {type(model).__name__}")
        model = model.module
    return model


def _config(model: DiTStage) -> LoRAConfig:
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ConfigError("this model has no LoRA adapters: call add_lora first")
    return config


def _adapted(model: DiTStage):
    """(local layer index, target, linear) of every adapted linear of this stage."""
    for local, _, target, linear in _linears(model, _config(model).targets):
        yield local, target, linear


def _check_index(config: LoRAConfig, index: int | None, allow_none: bool) -> None:
    if index is None and allow_none:
        return
    if not isinstance(index, int) or not 0 <= index < config.num_adapters:
        allowed = "None or " if allow_none else ""
        raise ValueError(
            f"adapter index must be {allowed}an int in [0, {config.num_adapters}), got {index!r}"
        )


def _initial_A(name: str, index: int, rank: int, in_features: int, seed: int) -> Tensor:
    """PEFT's init of A (kaiming-uniform, a = sqrt(5)) for the whole linear, from a generator
    seeded by the linear's whole-model name: the same on every rank and any TP x PP layout."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}/{index}".encode()))
    A = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    return A


def add_lora(
    model: DiTStage,
    rank: int,
    alpha: float,
    num_adapters: int,
    targets: tuple[str, ...] | list[str] | None = None,
    *,
    seed: int = 0,
) -> LoRAConfig:
    """Freeze every parameter of the stage `model` and give each target linear of its layers
    `num_adapters` adapters (none active: the model is the base until `set_active_adapter`).

    Call it before `pipeline.data_parallel` wraps the stage, so that DDP holds the adapters.
    `targets`: our names of layer linears (default `default_targets(model.arch)`). `seed` picks
    the random A's; they do not depend on the parallel layout.
    """
    if not isinstance(model, DiTStage):
        raise ConfigError(
            f"add_lora takes a DiT stage (built by models.build), got {type(model).__name__}; "
            "add adapters before wrapping the stage in pipeline.data_parallel"
        )
    if getattr(model, "lora_config", None) is not None:
        raise ConfigError("this model already has LoRA adapters")
    if rank < 1 or num_adapters < 1 or not alpha > 0:
        raise ConfigError(
            f"rank and num_adapters must be >= 1 and alpha > 0, got rank={rank}, "
            f"num_adapters={num_adapters}, alpha={alpha}"
        )
    rules = _target_rules(model.arch)
    targets = default_targets(model.arch) if targets is None else tuple(targets)
    unknown = [t for t in targets if t not in rules]
    if unknown or not targets or len(set(targets)) != len(targets):
        raise ConfigError(
            f"LoRA targets must be distinct names among {sorted(rules)}, got {list(targets)}"
        )
    config = LoRAConfig(rank, alpha, num_adapters, targets)
    for _, _, target, linear in _linears(model, targets):
        parallel = rules[target].split
        expected = ColumnParallelLinear if parallel == "column" else RowParallelLinear
        if not isinstance(linear, expected):
            raise ConfigError(
                f"LoRA needs megatron's {expected.__name__} (fp8 'off' or 'torch') at {target}, "
                f"found {type(linear).__name__}; Transformer Engine linears (fp8='te') are not "
                "supported"
            )
    tp_group = model.pg_collection.tp
    tp, tp_rank = get_pg_size(tp_group), get_pg_rank(tp_group)
    model.requires_grad_(False)
    for _, index, target, linear in _linears(model, targets):
        parallel = rules[target].split
        weight = linear.weight
        out_local, in_local = weight.shape
        in_features = in_local * (tp if parallel == "row" else 1)
        name = f"{LAYER_PREFIX}{index}.{target}"
        As, Bs = [], []
        for adapter in range(num_adapters):
            A = _initial_A(name, adapter, rank, in_features, seed)
            if parallel == "row":
                A = A.chunk(tp, dim=1)[tp_rank]
            As.append(A.to(weight.device, weight.dtype).contiguous())
            Bs.append(torch.zeros(out_local, rank, device=weight.device, dtype=weight.dtype))
        sequence_parallel = getattr(linear, "sequence_parallel", False)
        linear.lora = LinearAdapters(parallel, As, Bs, config.scale, tp_group, sequence_parallel)
        linear.register_forward_hook(_add_adapter_output, with_kwargs=True)
    model.lora_config, model.lora_active = config, None
    return config


def set_active_adapter(model: nn.Module, index: int | None) -> int | None:
    """Run adapter `index` from now on (None: the base, i.e. the teacher); returns the index
    that was active. Every rank of the model must switch alike."""
    stage = _stage(model)
    config = _config(stage)
    _check_index(config, index, allow_none=True)
    previous = stage.lora_active
    for _, _, linear in _adapted(stage):
        linear.lora.active = index
    stage.lora_active = index
    return previous


def adapter_parameters(model: nn.Module, index: int) -> list[nn.Parameter]:
    """The trainable tensors of adapter `index` on this rank (A and B of every target)."""
    stage = _stage(model)
    _check_index(_config(stage), index, allow_none=False)
    params = []
    for _, _, linear in _adapted(stage):
        params += [linear.lora.A[index], linear.lora.B[index]]
    return params


def merged_state_dict(model: nn.Module, adapter: int | None) -> dict[str, Tensor]:
    """This rank's state dict of the base model (our names, no adapters) with adapter
    `adapter` merged into the target weights (None: the base alone). Whole models or shards
    export with `convert` like any checkpoint of ours."""
    stage = _stage(model)
    _check_index(_config(stage), adapter, allow_none=True)
    adapter_keys = {
        f"{prefix}.{name}"
        for prefix, module in stage.named_modules()
        if isinstance(module, LinearAdapters)
        for name, _ in module.named_parameters()
    }
    merged = {
        key: value.detach()
        for key, value in stage.state_dict().items()
        if isinstance(value, Tensor) and key not in adapter_keys
    }
    if adapter is not None:
        for local, target, linear in _adapted(stage):
            key = f"{LAYER_PREFIX}{local}.{target}.weight"
            merged[key] = linear.lora.merged_weight(linear.weight, adapter)
    return merged


def adapter_deltas(model: nn.Module, adapter: int) -> dict[str, Tensor]:
    """scale * B A of adapter `adapter` for every adapted weight of this rank's stage, in
    float32 and our naming (`decoder.layers.N.TARGET.weight`): what merging adds to the base.
    Computed from the adapter parameters' current values, in whatever dtype they hold."""
    stage = _stage(model)
    _check_index(_config(stage), adapter, allow_none=False)
    deltas = {}
    for local, target, linear in _adapted(stage):
        A, B = linear.lora.A[adapter].detach().float(), linear.lora.B[adapter].detach().float()
        deltas[f"{LAYER_PREFIX}{local}.{target}.weight"] = linear.lora.scale * (B @ A)
    return deltas


# --- adapter state dicts: this rank's, whole, sharded ----------------------------------------
# Keyed `decoder.layers.{layer}.{target}.lora_A` / `.lora_B` (layer: within the stage for a
# rank's state dict, within the whole model for a whole one), without the adapter index, so
# that any adapter can be saved and loaded into any slot.


def lora_state_dict(model: nn.Module, adapter: int) -> dict[str, Tensor]:
    """This rank's shard of adapter `adapter`."""
    stage = _stage(model)
    _check_index(_config(stage), adapter, allow_none=False)
    state = {}
    for local, target, linear in _adapted(stage):
        name = f"{LAYER_PREFIX}{local}.{target}"
        state[f"{name}.lora_A"] = linear.lora.A[adapter].detach()
        state[f"{name}.lora_B"] = linear.lora.B[adapter].detach()
    return state


def load_lora_state_dict(model: nn.Module, adapter: int, state: dict[str, Tensor]) -> None:
    """Copy this rank's shard `state` (as `lora_state_dict` gives it) into adapter `adapter`."""
    stage = _stage(model)
    _check_index(_config(stage), adapter, allow_none=False)
    expected = lora_state_dict(stage, adapter)
    if state.keys() != expected.keys():
        missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
        raise ConfigError(
            f"the LoRA state does not fit this model's adapters: missing "
            f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ConfigError(
                f"{key}: shape {tuple(tensor.shape)} where this model's adapter has "
                f"{tuple(expected[key].shape)} (another rank or layout?)"
            )
    with torch.no_grad():
        for key, tensor in state.items():
            expected[key].copy_(tensor)


def _parse(key: str) -> tuple[int, str, str]:
    match = _KEY.match(key)
    if match is None:
        raise ConfigError(f"{key!r} is not a LoRA key of ours (decoder.layers.N.TARGET.lora_A/B)")
    return int(match[1]), match[2], match[3]


def _tp_dim(parallel: Parallel, which: str) -> int | None:
    """The dimension tensor parallelism splits: B's output rows (column), A's inputs (row)."""
    if parallel == "column" and which == "B":
        return 0
    if parallel == "row" and which == "A":
        return 1
    return None


def _rule(rules: dict[str, Rule], target: str) -> Rule:
    if target not in rules:
        raise ConfigError(f"{target!r} is not a LoRA target of this model ({sorted(rules)})")
    return rules[target]


def shard_lora(
    whole: dict[str, Tensor], arch, tensor_parallel: int, pipeline_parallel: int
) -> dict[tuple[int, int], dict[str, Tensor]]:
    """Whole adapter -> {(tp_rank, pp_rank): that rank's `lora_state_dict`}."""
    rules = _target_rules(arch)
    per_stage = arch.num_layers // pipeline_parallel
    shards = {(t, p): {} for t in range(tensor_parallel) for p in range(pipeline_parallel)}
    for key, tensor in whole.items():
        layer, target, which = _parse(key)
        stage = layer // per_stage
        local = f"{LAYER_PREFIX}{layer % per_stage}.{target}.lora_{which}"
        dim = _tp_dim(_rule(rules, target).split, which)
        pieces = [tensor] * tensor_parallel if dim is None else tensor.chunk(tensor_parallel, dim)
        for t in range(tensor_parallel):
            shards[(t, stage)][local] = pieces[t].contiguous()
    return shards


def unshard_lora(shards: dict[tuple[int, int], dict[str, Tensor]], arch) -> dict[str, Tensor]:
    """Inverse of `shard_lora`: the whole adapter from every rank's shard."""
    rules = _target_rules(arch)
    tensor_parallel = 1 + max(t for t, _ in shards)
    pipeline_parallel = 1 + max(p for _, p in shards)
    per_stage = arch.num_layers // pipeline_parallel
    whole = {}
    for p in range(pipeline_parallel):
        for key in shards[(0, p)]:
            local, target, which = _parse(key)
            pieces = [shards[(t, p)][key] for t in range(tensor_parallel)]
            dim = _tp_dim(_rule(rules, target).split, which)
            whole[f"{LAYER_PREFIX}{p * per_stage + local}.{target}.lora_{which}"] = (
                pieces[0] if dim is None else torch.cat(pieces, dim=dim)
            )
    return whole


# --- diffusers / PEFT naming -----------------------------------------------------------------


def lora_to_diffusers(whole: dict[str, Tensor], arch) -> dict[str, Tensor]:
    """Whole adapter -> PEFT keys of the diffusers transformer (`blocks.0.attn1.to_q.lora_A.
    weight`, ...). A fused linear's parts share its lora_A and take their rows of lora_B."""
    rules = _target_rules(arch)
    theirs = {}
    for key, tensor in whole.items():
        layer, target, which = _parse(key)
        rule = _rule(rules, target)
        modules = [their.format(layer) for their in rule.theirs]
        if which == "A" or len(modules) == 1:
            parts = [tensor] * len(modules)
        else:
            parts = convert._deinterleave_heads(tensor, len(modules), arch.num_attention_heads)
        for module, part in zip(modules, parts):
            theirs[f"{module}.lora_{which}.weight"] = part.clone().contiguous()
    return theirs


def lora_from_diffusers(theirs: dict[str, Tensor], arch) -> dict[str, Tensor]:
    """Inverse of `lora_to_diffusers`. The q/k/v (k/v) adapters of a fused linear must share
    lora_A, otherwise they have no exact fused form and are refused."""
    remaining = dict(theirs)
    whole = {}
    for layer in range(arch.num_layers):
        for target, rule in _target_rules(arch).items():
            modules = [their.format(layer) for their in rule.theirs]
            keys = {w: [f"{m}.lora_{w}.weight" for m in modules] for w in "AB"}
            present = [k for k in keys["A"] + keys["B"] if k in remaining]
            if not present:
                continue
            if len(present) != 2 * len(modules):
                raise ConfigError(
                    f"the LoRA has {present} but not all of {keys['A'] + keys['B']}: our fused "
                    f"{target} needs an adapter on each of {modules}"
                )
            As = [remaining.pop(k) for k in keys["A"]]
            Bs = [remaining.pop(k) for k in keys["B"]]
            if any(not torch.equal(A, As[0]) for A in As[1:]):
                raise ConfigError(
                    f"the adapters of {modules} have different lora_A, which our fused {target} "
                    "cannot represent exactly"
                )
            name = f"{LAYER_PREFIX}{layer}.{target}"
            whole[f"{name}.lora_A"] = As[0]
            whole[f"{name}.lora_B"] = (
                Bs[0] if len(Bs) == 1 else convert._interleave_heads(Bs, arch.num_attention_heads)
            )
    if remaining:
        raise ConfigError(
            f"the LoRA has tensors this model's adapters cannot hold: {sorted(remaining)[:6]}"
        )
    return whole


def _targets_of(whole: dict[str, Tensor]) -> set[str]:
    return {_parse(key)[1] for key in whole}


def _their_target_modules(arch, targets) -> list[str]:
    """PEFT `target_modules` for our targets: diffusers module names within a block."""
    rules = _target_rules(arch)
    return sorted(their.split("{}.", 1)[1] for t in targets for their in rules[t].theirs)


def _rescale_B(whole: dict[str, Tensor], factor: float) -> dict[str, Tensor]:
    """The adapter with every lora_B multiplied by `factor` (in float32, cast back)."""
    if factor == 1:
        return dict(whole)
    return {
        k: (v.float() * factor).to(v.dtype) if k.endswith(".lora_B") else v
        for k, v in whole.items()
    }


def write_diffusers_lora(path: str | Path, arch, whole: dict[str, Tensor], rank: int, alpha):
    """Write a whole adapter as `path/pytorch_lora_weights.safetensors` for diffusers' pipeline
    `load_lora_weights(path)` (or the transformer's `load_lora_adapter(path, prefix=
    "transformer")`), with the LoraConfig arguments (r, lora_alpha, target_modules) in the
    metadata, as diffusers' `save_lora_weights` writes them.

    The scale alpha / rank is folded into lora_B and the file says lora_alpha = r (scale 1):
    a loader that ignores the metadata (diffusers without it, get_peft_kwargs in
    diffusers/utils/peft_utils.py, and PEFT default alpha to r; ComfyUI's default is scale 1)
    merges the same weights as one that reads it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    whole = _rescale_B(whole, alpha / rank)
    adapter_config = {
        "r": rank,
        "lora_alpha": rank,
        "target_modules": _their_target_modules(arch, _targets_of(whole)),
    }
    metadata = {
        "format": "pt",
        METADATA_KEY: json.dumps({DIFFUSERS_PREFIX + k: v for k, v in adapter_config.items()}),
    }
    theirs = lora_to_diffusers(whole, arch)
    tensors = {DIFFUSERS_PREFIX + k: v for k, v in theirs.items()}
    atomic.save_safetensors(tensors, path / LORA_FILE, metadata)


def read_diffusers_lora(path: str | Path, arch) -> tuple[dict[str, Tensor], int, float]:
    """(whole adapter, rank, alpha) of a diffusers LoRA file, or of a folder holding
    `pytorch_lora_weights.safetensors`, as stored (the adapter adds alpha / rank B A x). Keys
    may carry the pipeline's "transformer." prefix. Without an adapter config in the metadata,
    rank is lora_A's and alpha = rank, as diffusers and PEFT take such a file."""
    path = Path(path)
    file = path / LORA_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"no LoRA file at {file}")
    with safe_open(file, framework="pt") as handle:
        metadata = handle.metadata() or {}
        names = handle.keys()
        theirs = {k.removeprefix(DIFFUSERS_PREFIX): handle.get_tensor(k) for k in names}
    whole = lora_from_diffusers(theirs, arch)
    if METADATA_KEY not in metadata:
        ranks = {v.shape[0] for k, v in whole.items() if k.endswith(".lora_A")}
        if len(ranks) != 1:
            raise ConfigError(f"{file} has no adapter config and adapters of ranks {ranks}")
        rank = ranks.pop()
        return whole, rank, float(rank)
    adapter_config = {
        k.removeprefix(DIFFUSERS_PREFIX): v for k, v in json.loads(metadata[METADATA_KEY]).items()
    }
    if not {"r", "lora_alpha"} <= adapter_config.keys():
        raise ConfigError(f"{file}: the adapter config lacks r or lora_alpha: {adapter_config}")
    return whole, adapter_config["r"], adapter_config["lora_alpha"]


# --- in a running job ------------------------------------------------------------------------


def _layout(stage: DiTStage) -> tuple[tuple[int, int], tuple[int, int]]:
    groups = stage.pg_collection
    sizes = (get_pg_size(groups.tp), get_pg_size(groups.pp))
    return sizes, (get_pg_rank(groups.tp), get_pg_rank(groups.pp))


def save_lora(model: nn.Module, adapter: int, path: str | Path) -> None:
    """Write adapter `adapter`, gathered from every tensor/pipeline-parallel rank, as a diffusers
    LoRA folder `path` (see `write_diffusers_lora`). Called by every rank; the first
    data-parallel replica writes its shards to `path/shards` (a filesystem every rank shares,
    as for `save_checkpoint`), global rank 0 gathers them and removes the shards."""
    stage = _stage(model)
    config = _config(stage)
    (tp, pp), (tp_rank, pp_rank) = _layout(stage)
    shards = Path(path) / "shards"

    def write_shard():
        if get_pg_rank(stage.pg_collection.dp_cp) == 0:  # one writer per shard, also CP
            shards.mkdir(parents=True, exist_ok=True)
            state = lora_state_dict(stage, adapter)
            atomic.save_safetensors(state, shards / f"lora_tp{tp_rank}_pp{pp_rank}.safetensors")

    def write_whole():
        if dist.get_rank() == 0:
            pieces = {
                (t, p): load_file(shards / f"lora_tp{t}_pp{p}.safetensors")
                for t in range(tp)
                for p in range(pp)
            }
            whole = unshard_lora(pieces, stage.arch)
            write_diffusers_lora(path, stage.arch, whole, config.rank, config.alpha)
            shutil.rmtree(shards)

    atomic.collective_write(write_shard)  # a full disk on any rank fails every rank at once
    atomic.collective_write(write_whole)


def load_lora(model: nn.Module, adapter: int, path: str | Path) -> None:
    """Load a diffusers LoRA folder or file (as `save_lora` writes) into adapter `adapter`:
    every rank reads it and keeps its shard. Rank and targets must be the model's; lora_B is
    rescaled from the file's alpha / rank to the model's."""
    stage = _stage(model)
    config = _config(stage)
    whole, rank, alpha = read_diffusers_lora(path, stage.arch)
    if rank != config.rank:
        raise ConfigError(
            f"{path} holds a rank {rank} LoRA; this model's adapters have rank {config.rank}"
        )
    whole = _rescale_B(whole, (alpha / rank) / config.scale)
    if _targets_of(whole) != set(config.targets):
        raise ConfigError(
            f"{path} adapts {sorted(_targets_of(whole))}, this model's adapters "
            f"{sorted(config.targets)}"
        )
    sizes, ranks = _layout(stage)
    load_lora_state_dict(stage, adapter, shard_lora(whole, stage.arch, *sizes)[ranks])

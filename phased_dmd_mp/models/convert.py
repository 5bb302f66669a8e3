"""diffusers checkpoints <-> ours, whole or sharded for a tensor/pipeline-parallel layout.

    python -m phased_dmd_mp.models.convert to-ours DIFFUSERS_DIR OUT_DIR --tp 2 --pp 2
    python -m phased_dmd_mp.models.convert to-diffusers OURS_DIR OUT_DIR

A diffusers directory holds `config.json` and `diffusion_pytorch_model.safetensors` (or shards
listed in `diffusion_pytorch_model.safetensors.index.json`), as `from_pretrained` reads it. Ours
holds `config.json` ({"model", "arch", "tensor_parallel", "pipeline_parallel"}) and one
`model_tp{t}_pp{p}.safetensors` per rank, keyed as that rank's module's state_dict.

Every diffusers tensor maps to one of ours, except q/k/v (and k/v) projections, which are fused
into one column-parallel linear with rows ordered [q_h, k_h, v_h] per head, so that any TP shard
is a set of whole heads. The conversion is exact and fails on any unmapped tensor.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from torch import Tensor

from phased_dmd_mp import atomic
from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.models.config import QwenImageConfig, WanConfig
from phased_dmd_mp.parallel.layout import check_model

Split = Literal["column", "row", "norm"] | None
MODEL_KINDS = {"wan": WanConfig, "qwen_image": QwenImageConfig}
DIFFUSERS_CLASSES = {"wan": "WanTransformer3DModel", "qwen_image": "QwenImageTransformer2DModel"}
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
LAYER_PREFIX = "decoder.layers."


@dataclass(frozen=True)
class Rule:
    """Our module `ours` holds the diffusers modules `theirs` (head-interleaved when several).

    params: the tensors under each name ("" for a bare parameter).
    split: how tensor parallelism shards it: "column" (weight and bias on dim 0), "row"
    (weight on dim 1; the bias is added after the all-reduce, so replicated), "norm" (a q/k
    norm weight across heads, dim 0), None (replicated).
    stage: "first"/"last" pipeline stage for the embedders and the head; None for layers.
    """

    ours: str
    theirs: tuple[str, ...]
    params: tuple[str, ...] = ("weight", "bias")
    split: Split = None
    stage: Literal["first", "last"] | None = None


def _linear(ours: str, *theirs: str, split: Split = None, stage=None) -> Rule:
    return Rule(ours, theirs, ("weight", "bias"), split, stage)


def _weight(ours: str, theirs: str, split: Split = None, stage=None) -> Rule:
    return Rule(ours, (theirs,), ("weight",), split, stage)


def _param(ours: str, theirs: str, stage=None) -> Rule:
    return Rule(ours, (theirs,), ("",), None, stage)


def wan_rules(arch: WanConfig) -> tuple[list[Rule], list[Rule]]:
    """(model-level rules, per-layer rules with '{}' for the layer index)."""
    model = [
        _linear("patch_embedding", "patch_embedding", stage="first"),
        _linear(
            "time_embedding.linear_1", "condition_embedder.time_embedder.linear_1", stage="first"
        ),
        _linear(
            "time_embedding.linear_2", "condition_embedder.time_embedder.linear_2", stage="first"
        ),
        _linear("time_projection", "condition_embedder.time_proj", stage="first"),
        _linear(
            "text_embedding.linear_1", "condition_embedder.text_embedder.linear_1", stage="first"
        ),
        _linear(
            "text_embedding.linear_2", "condition_embedder.text_embedder.linear_2", stage="first"
        ),
        _param("head.modulation", "scale_shift_table", stage="last"),
        _linear("head.linear", "proj_out", stage="last"),
    ]
    if arch.image_dim is not None:
        image = "condition_embedder.image_embedder"
        model += [
            _linear("image_embedding.norm_in", f"{image}.norm1", stage="first"),
            _linear("image_embedding.linear_1", f"{image}.ff.net.0.proj", stage="first"),
            _linear("image_embedding.linear_2", f"{image}.ff.net.2", stage="first"),
            _linear("image_embedding.norm_out", f"{image}.norm2", stage="first"),
        ]
        if arch.pos_embed_seq_len is not None:
            model.append(_param("image_embedding.pos_embed", f"{image}.pos_embed", stage="first"))
    layer = [
        _param("modulation", "scale_shift_table"),
        _linear(
            "self_attention.linear_qkv", "attn1.to_q", "attn1.to_k", "attn1.to_v", split="column"
        ),
        _weight("self_attention.q_norm", "attn1.norm_q", split="norm"),
        _weight("self_attention.k_norm", "attn1.norm_k", split="norm"),
        _linear("self_attention.linear_proj", "attn1.to_out.0", split="row"),
        _linear("cross_attention.linear_q", "attn2.to_q", split="column"),
        _linear("cross_attention.linear_kv", "attn2.to_k", "attn2.to_v", split="column"),
        _weight("cross_attention.q_norm", "attn2.norm_q", split="norm"),
        _weight("cross_attention.k_norm", "attn2.norm_k", split="norm"),
        _linear("cross_attention.linear_proj", "attn2.to_out.0", split="row"),
        _linear("mlp.linear_fc1", "ffn.net.0.proj", split="column"),
        _linear("mlp.linear_fc2", "ffn.net.2", split="row"),
    ]
    if arch.cross_attn_norm:
        layer.append(_linear("cross_attention_norm", "norm2"))
    if arch.added_kv_proj_dim is not None:
        layer += [
            _linear(
                "cross_attention.linear_kv_image",
                "attn2.add_k_proj",
                "attn2.add_v_proj",
                split="column",
            ),
            _weight("cross_attention.k_norm_image", "attn2.norm_added_k", split="norm"),
        ]
    return model, [_prefixed(rule, "{}.", "blocks.{}.") for rule in layer]


def qwen_image_rules(arch: QwenImageConfig) -> tuple[list[Rule], list[Rule]]:
    model = [
        _linear("img_in", "img_in", stage="first"),
        _weight("txt_norm", "txt_norm", stage="first"),
        _linear("txt_in", "txt_in", stage="first"),
        _linear(
            "time_embedding.linear_1", "time_text_embed.timestep_embedder.linear_1", stage="first"
        ),
        _linear(
            "time_embedding.linear_2", "time_text_embed.timestep_embedder.linear_2", stage="first"
        ),
        _linear("head.linear_modulation", "norm_out.linear", stage="last"),
        _linear("head.linear", "proj_out", stage="last"),
    ]
    layer = [
        _linear("img_modulation", "img_mod.1", split="column"),
        _linear("txt_modulation", "txt_mod.1", split="column"),
        _linear("attention.linear_qkv", "attn.to_q", "attn.to_k", "attn.to_v", split="column"),
        _linear(
            "attention.linear_added_qkv",
            "attn.add_q_proj",
            "attn.add_k_proj",
            "attn.add_v_proj",
            split="column",
        ),
        _weight("attention.q_norm", "attn.norm_q"),
        _weight("attention.k_norm", "attn.norm_k"),
        _weight("attention.added_q_norm", "attn.norm_added_q"),
        _weight("attention.added_k_norm", "attn.norm_added_k"),
        _linear("attention.linear_proj", "attn.to_out.0", split="row"),
        _linear("attention.linear_added_proj", "attn.to_add_out", split="row"),
        _linear("img_mlp.linear_fc1", "img_mlp.net.0.proj", split="column"),
        _linear("img_mlp.linear_fc2", "img_mlp.net.2", split="row"),
        _linear("txt_mlp.linear_fc1", "txt_mlp.net.0.proj", split="column"),
        _linear("txt_mlp.linear_fc2", "txt_mlp.net.2", split="row"),
    ]
    return model, [_prefixed(rule, "{}.", "transformer_blocks.{}.") for rule in layer]


def _prefixed(rule: Rule, ours: str, theirs: str) -> Rule:
    return Rule(ours + rule.ours, tuple(theirs + t for t in rule.theirs), rule.params, rule.split)


def model_kind(arch) -> str:
    return "wan" if isinstance(arch, WanConfig) else "qwen_image"


def rules(arch) -> tuple[list[Rule], list[Rule]]:
    return wan_rules(arch) if isinstance(arch, WanConfig) else qwen_image_rules(arch)


def _key(name: str, param: str) -> str:
    return f"{name}.{param}" if param else name


def _interleave_heads(tensors: list[Tensor], heads: int) -> Tensor:
    """[n x (heads * d, ...)] -> (heads * n * d, ...) ordered [t0_h, t1_h, ...] per head."""
    stacked = torch.stack([t.unflatten(0, (heads, -1)) for t in tensors], dim=1)
    return stacked.flatten(0, 2)


def _deinterleave_heads(tensor: Tensor, parts: int, heads: int) -> list[Tensor]:
    return [t.flatten(0, 1) for t in tensor.unflatten(0, (heads, parts, -1)).unbind(1)]


def _expanded(arch) -> list[tuple[Rule, int | None]]:
    model, layer = rules(arch)
    expanded = [(rule, None) for rule in model]
    for index in range(arch.num_layers):
        expanded += [(rule, index) for rule in layer]
    return expanded


def diffusers_to_ours(state_dict: dict[str, Tensor], arch) -> dict[str, Tensor]:
    """A diffusers state dict -> our whole-model (TP = PP = 1) state dict."""
    remaining = dict(state_dict)
    ours = {}
    for rule, index in _expanded(arch):
        name = LAYER_PREFIX + rule.ours.format(index) if index is not None else rule.ours
        theirs = [t.format(index) for t in rule.theirs]
        for param in rule.params:
            keys = [_key(t, param) for t in theirs]
            missing = [k for k in keys if k not in remaining]
            if missing:
                raise ConfigError(f"the diffusers checkpoint lacks {missing} (for {name})")
            tensors = [remaining.pop(k) for k in keys]
            ours[_key(name, param)] = (
                tensors[0]
                if len(tensors) == 1
                else _interleave_heads(tensors, arch.num_attention_heads)
            )
    if remaining:
        raise ConfigError(
            f"the diffusers checkpoint has tensors this architecture does not use: "
            f"{sorted(remaining)[:8]}{' ...' if len(remaining) > 8 else ''}"
        )
    return ours


def ours_to_diffusers(state_dict: dict[str, Tensor], arch) -> dict[str, Tensor]:
    """Our whole-model state dict -> the diffusers one."""
    remaining = {k: v for k, v in state_dict.items() if not k.endswith("_extra_state")}
    theirs = {}
    for rule, index in _expanded(arch):
        name = LAYER_PREFIX + rule.ours.format(index) if index is not None else rule.ours
        for param in rule.params:
            key = _key(name, param)
            if key not in remaining:
                raise ConfigError(f"the checkpoint lacks {key}")
            tensor = remaining.pop(key)
            parts = (
                [tensor]
                if len(rule.theirs) == 1
                else _deinterleave_heads(tensor, len(rule.theirs), arch.num_attention_heads)
            )
            for their, part in zip(rule.theirs, parts):
                theirs[_key(their.format(index), param)] = part.contiguous()
    if remaining:
        raise ConfigError(f"unexpected tensors in the checkpoint: {sorted(remaining)[:8]}")
    return theirs


def _tp_dim(rule: Rule, param: str) -> int | None:
    if rule.split in ("column", "norm"):
        return 0
    if rule.split == "row" and param == "weight":
        return 1
    return None


def shard(
    state_dict: dict[str, Tensor], arch, tensor_parallel: int, pipeline_parallel: int
) -> dict[tuple[int, int], dict[str, Tensor]]:
    """Whole-model state dict -> {(tp_rank, pp_rank): that rank's module state dict}."""
    check_model(arch, tensor_parallel, pipeline_parallel)
    per_stage = arch.num_layers // pipeline_parallel
    shards = {(t, p): {} for t in range(tensor_parallel) for p in range(pipeline_parallel)}
    for rule, index in _expanded(arch):
        if index is None:
            stages = {"first": [0], "last": [pipeline_parallel - 1]}[rule.stage]
            name = rule.ours
        else:
            stages = [index // per_stage]
            name = LAYER_PREFIX + rule.ours.format(index % per_stage)
        source = LAYER_PREFIX + rule.ours.format(index) if index is not None else rule.ours
        for param in rule.params:
            tensor = state_dict[_key(source, param)]
            dim = _tp_dim(rule, param)
            pieces = (
                [tensor] * tensor_parallel
                if dim is None
                else list(tensor.chunk(tensor_parallel, dim=dim))
            )
            for stage in stages:
                for t in range(tensor_parallel):
                    shards[(t, stage)][_key(name, param)] = pieces[t].contiguous()
    return shards


def unshard(shards: dict[tuple[int, int], dict[str, Tensor]], arch) -> dict[str, Tensor]:
    """Inverse of `shard`: the whole-model state dict."""
    tensor_parallel = 1 + max(t for t, _ in shards)
    pipeline_parallel = 1 + max(p for _, p in shards)
    check_model(arch, tensor_parallel, pipeline_parallel)
    per_stage = arch.num_layers // pipeline_parallel
    whole = {}
    for rule, index in _expanded(arch):
        if index is None:
            stage = {"first": 0, "last": pipeline_parallel - 1}[rule.stage]
            name = target = rule.ours
        else:
            stage = index // per_stage
            name = LAYER_PREFIX + rule.ours.format(index % per_stage)
            target = LAYER_PREFIX + rule.ours.format(index)
        for param in rule.params:
            pieces = [shards[(t, stage)][_key(name, param)] for t in range(tensor_parallel)]
            dim = _tp_dim(rule, param)
            whole[_key(target, param)] = pieces[0] if dim is None else torch.cat(pieces, dim=dim)
    return whole


# --- files -----------------------------------------------------------------------------------


def read_diffusers_config(path: str | Path) -> tuple[str, object]:
    """(model kind, arch config) of a diffusers transformer directory, from its config.json."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{path} has no config.json (expected a diffusers transformer folder)")
    config = json.loads(config_path.read_text())
    class_name = config.get("_class_name")
    kinds = {v: k for k, v in DIFFUSERS_CLASSES.items()}
    if class_name not in kinds:
        raise ConfigError(
            f"{config_path}: _class_name {class_name!r} is not one of {sorted(kinds)}"
        )
    kind = kinds[class_name]
    return kind, MODEL_KINDS[kind].from_diffusers(config)


def read_diffusers_dir(path: str | Path) -> tuple[str, object, dict[str, Tensor]]:
    """(model kind, arch config, state dict) of a diffusers transformer directory."""
    path = Path(path)
    kind, arch = read_diffusers_config(path)
    index_path = path / f"{DIFFUSERS_WEIGHTS}.index.json"
    if index_path.is_file():
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    elif (path / DIFFUSERS_WEIGHTS).is_file():
        files = [DIFFUSERS_WEIGHTS]
    else:
        raise ConfigError(f"{path} has neither {DIFFUSERS_WEIGHTS} nor its .index.json")
    state_dict = {}
    for name in files:
        state_dict.update(load_file(path / name))
    return kind, arch, state_dict


def write_diffusers_dir(path: str | Path, arch, state_dict: dict[str, Tensor]) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": DIFFUSERS_CLASSES[model_kind(arch)], **arch.to_diffusers()}
    atomic.write_json(path / "config.json", config)
    atomic.save_safetensors(state_dict, path / DIFFUSERS_WEIGHTS)


def shard_file(tp_rank: int, pp_rank: int) -> str:
    return f"model_tp{tp_rank}_pp{pp_rank}.safetensors"


def write_layout(path: str | Path, arch, tensor_parallel: int, pipeline_parallel: int) -> None:
    layout = {
        "model": model_kind(arch),
        "arch": arch.to_diffusers(),
        "tensor_parallel": tensor_parallel,
        "pipeline_parallel": pipeline_parallel,
    }
    atomic.write_json(Path(path) / "config.json", layout)


def write_sharded_dir(path: str | Path, arch, shards: dict[tuple[int, int], dict[str, Tensor]]):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_layout(path, arch, 1 + max(t for t, _ in shards), 1 + max(p for _, p in shards))
    for (t, p), state_dict in shards.items():
        atomic.save_safetensors(state_dict, path / shard_file(t, p))


def read_layout(path: str | Path) -> tuple[object, int, int]:
    """(arch, tensor_parallel, pipeline_parallel) of one of our sharded checkpoints."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{path} has no config.json (expected a sharded checkpoint of ours)")
    layout = json.loads(config_path.read_text())
    if layout.get("model") not in MODEL_KINDS:
        raise ConfigError(f"{config_path}: 'model' must be one of {sorted(MODEL_KINDS)}")
    arch = MODEL_KINDS[layout["model"]].from_diffusers(layout["arch"])
    return arch, layout["tensor_parallel"], layout["pipeline_parallel"]


def read_shard(path: str | Path, tp_rank: int, pp_rank: int) -> dict[str, Tensor]:
    return load_file(Path(path) / shard_file(tp_rank, pp_rank))


def read_sharded_dir(path: str | Path) -> tuple[object, dict[tuple[int, int], dict[str, Tensor]]]:
    arch, tensor_parallel, pipeline_parallel = read_layout(path)
    shards = {
        (t, p): read_shard(path, t, p)
        for t in range(tensor_parallel)
        for p in range(pipeline_parallel)
    }
    return arch, shards


def to_ours(source: str | Path, target: str | Path, tensor_parallel: int, pipeline_parallel: int):
    _, arch = read_diffusers_config(source)
    check_model(arch, tensor_parallel, pipeline_parallel)  # before reading any weights
    _, _, state_dict = read_diffusers_dir(source)
    whole = diffusers_to_ours(state_dict, arch)
    write_sharded_dir(target, arch, shard(whole, arch, tensor_parallel, pipeline_parallel))


def to_diffusers(source: str | Path, target: str | Path):
    arch, shards = read_sharded_dir(source)
    write_diffusers_dir(target, arch, ours_to_diffusers(unshard(shards, arch), arch))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ours = commands.add_parser("to-ours", help="diffusers folder -> sharded checkpoint of ours")
    ours.add_argument("source")
    ours.add_argument("target")
    ours.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    ours.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    theirs = commands.add_parser("to-diffusers", help="sharded checkpoint of ours -> diffusers")
    theirs.add_argument("source")
    theirs.add_argument("target")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-ours":
            to_ours(args.source, args.target, args.tp, args.pp)
        else:
            to_diffusers(args.source, args.target)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except atomic.DiskFullError as error:
        print(f"error: {error.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

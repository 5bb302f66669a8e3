"""Will a distillation run fit? Memory per rank and phase, before any GPU time.

    python -m phased_dmd_mp.preflight --config CONFIG [--set key=value ...] \\
        --world-size N --gpu-memory 80GiB [--model configs/models/X.yaml --latent-shape C F H W]

Checks the parallel layout (world divisible by TP x PP, heads / hidden / FFN by TP, layers by
PP, batch by DP x micro batch) and the teacher's shapes, then prints for each phase and each
distinct pipeline stage what one GPU holds (`phased_dmd_mp/memory/estimate.py`: parameters,
gradients, main parameters, optimizer states, EMA, activations, buffers) against the budget.
It exits 1 naming the first phase and stage that does not fit and lists layouts that do
(tensor parallel among the divisors of the heads, pipeline parallel among those of the layers,
micro batch, recompute); 2 for a config mistake.

The architecture comes from the teacher directory (`teacher` key: transformer/config.json,
teacher.yaml's latent shape and second expert, the condition set's text length), or, before the
teacher is on disk, from `--model` (a configs/models/*.yaml architecture) with `--latent-shape`,
`--text-tokens` and, for a two-expert teacher (Wan2.2), `--moe-boundary`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from phased_dmd_mp.config import ConfigError, add_config_arguments, load_config
from phased_dmd_mp.data.conditions import read_manifest
from phased_dmd_mp.data.teacher import CONDITIONS_DIR, read_spec, teacher_experts
from phased_dmd_mp.distill.config import DistillConfig
from phased_dmd_mp.distill.validate import (
    check_latents,
    check_run_layout,
    read_transformer_arch,
    validate_run,
)
from phased_dmd_mp.memory.estimate import PARTS, Plan, RankMemory, estimate
from phased_dmd_mp.models.config import QwenImageConfig, WanConfig

GIB = 2**30
UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
         "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}  # fmt: skip
DEFAULT_TEXT_TOKENS = {"wan": 512, "qwen_image": 256}  # umT5 pads to 512; Qwen2.5-VL varies


def parse_bytes(text: str) -> int:
    """'80GiB', '80 GB', '81920MiB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise ConfigError(f"--gpu-memory {text!r} is not a size such as 80GiB or 80GB")
    size = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if size <= 0:
        raise ConfigError(f"--gpu-memory {text!r} must be more than 0")
    return size


def read_model(path: Path) -> WanConfig | QwenImageConfig:
    """A configs/models/*.yaml architecture (Qwen-Image's have joint_attention_dim)."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"--model {path} does not exist")
    keys = yaml.safe_load(path.read_text()) or {}
    return load_config(QwenImageConfig if "joint_attention_dim" in keys else WanConfig, path)


def make_plan(args, config: DistillConfig) -> tuple[Plan, str]:
    """The Plan of this run and a line saying where the teacher's facts came from."""
    boundary = args.moe_boundary
    if args.model is not None:
        arch = read_model(args.model)
        if args.latent_shape is None:
            raise ConfigError("--model needs --latent-shape C F H W (the teacher's latents)")
        latent, text, shift = tuple(args.latent_shape), args.text_tokens, config.shift or 5.0
        # A Wan I2V model takes image-latent channels too, which only the conditions know:
        # check out_channels, frames and patch divisibility; a wrong C would skew every number.
        image_channels = max(arch.in_channels - latent[0], 0) if isinstance(arch, WanConfig) else 0
        check_latents(arch, latent, image_channels, "--latent-shape", args.model)
        source = f"{args.model}"
    else:
        if not Path(config.teacher).is_dir():
            raise ConfigError(
                f"teacher directory {config.teacher} does not exist; before it is on disk, give "
                "--model configs/models/X.yaml --latent-shape C F H W instead"
            )
        validate_run(config, args.world_size)  # teacher files, shapes, conditions, layout
        teacher = Path(config.teacher)
        spec = read_spec(teacher)
        high, low, boundary = teacher_experts(teacher, spec, config.teacher_low_noise,
                                              config.moe_boundary)  # fmt: skip
        arch = read_transformer_arch(high, "teacher")
        latent, shift = tuple(args.latent_shape or spec.latent_shape), config.shift or spec.shift
        text = args.text_tokens
        if text is None:
            conditions = Path(config.conditions) if config.conditions else teacher / CONDITIONS_DIR
            text = read_manifest(conditions)["specs"]["text"][0][0]
        source = f"{high}" + (f" + {low}" if low is not None else "")
    kind = "wan" if isinstance(arch, WanConfig) else "qwen_image"
    plan = Plan(
        config=config, arch=arch, latent_shape=latent,
        text_tokens=text or DEFAULT_TEXT_TOKENS[kind], world_size=args.world_size, shift=shift,
        two_expert_teacher=boundary is not None, moe_boundary=boundary,
    )  # fmt: skip
    return plan, source


def fits(plan: Plan, budget: int) -> tuple[bool, list[RankMemory]]:
    memory = estimate(plan)
    return all(m.total <= budget for m in memory), memory


def suggest(plan: Plan, budget: int, limit: int = 3) -> list[tuple[dict, int]]:
    """Layouts that fit: (config overrides, peak bytes), fewest model-parallel ranks first, then
    the largest micro batch, then without recompute."""
    config, arch, world = plan.config, plan.arch, plan.world_size
    found = []
    tps = [d for d in range(1, world + 1) if arch.num_attention_heads % d == 0]
    pps = [d for d in range(1, world + 1) if arch.num_layers % d == 0]
    for tp in tps:
        for pp in pps:
            if world % (tp * pp):
                continue
            dp = world // (tp * pp)
            if config.batch_size % dp:
                continue
            rank_batch = config.batch_size // dp
            micros = [m for m in range(rank_batch, 0, -1) if rank_batch % m == 0]
            for recompute in sorted({config.recompute, True}):
                for micro in micros:
                    values = dict(tensor_parallel=tp, pipeline_parallel=pp,
                                  micro_batch_size=micro, recompute=recompute)  # fmt: skip
                    try:
                        candidate = dataclasses.replace(config, **values)
                        check_run_layout(arch, candidate, world)
                    except (ConfigError, ValueError):
                        continue
                    ok, memory = fits(dataclasses.replace(plan, config=candidate), budget)
                    if ok:
                        found.append((values, max(m.total for m in memory)))
                        break  # the largest micro batch that fits
    found.sort(key=lambda item: (item[0]["tensor_parallel"] * item[0]["pipeline_parallel"],
                                 -item[0]["micro_batch_size"], item[0]["recompute"]))  # fmt: skip
    return found[:limit]


def _gib(value: int) -> str:
    return f"{value / GIB:8.2f} GiB"


def _ranks(plan: Plan, pp_rank: int) -> str:
    """Global ranks of pipeline stage pp_rank (megatron's order: TP fastest, then DP, then PP)."""
    per_stage = plan.tensor_parallel * plan.data_parallel
    first = pp_rank * per_stage
    return f"ranks {first}-{first + per_stage - 1}" if per_stage > 1 else f"rank {first}"


def report(plan: Plan, memory: list[RankMemory], budget: int, source: str) -> str:
    config = plan.config
    lines = [
        f"teacher: {type(plan.arch).__name__} ({source}), "
        f"{'two experts' if plan.two_expert_teacher else 'one expert'}; latents "
        f"{list(plan.latent_shape)} = {plan.tokens} tokens, {plan.text_tokens} text tokens",
        f"layout: {plan.world_size} GPUs = TP {plan.tensor_parallel} x PP "
        f"{plan.pipeline_parallel} x DP {plan.data_parallel}; batch {config.batch_size} = "
        f"{plan.rank_batch} per DP rank in micro batches of {plan.micro_batch}; {config.dtype}, "
        f"recompute {'on' if config.recompute else 'off'}, generator {config.generator_adapter}",
    ]
    for m in memory:
        stage = (
            f"stage {m.pp_rank}/{plan.pipeline_parallel}"
            if plan.pipeline_parallel > 1
            else "every rank"
        )
        lines.append(f"phase {m.phase}, {stage} ({_ranks(plan, m.pp_rank)}):")
        for part in PARTS:
            note = m.notes.get(part, "")
            lines.append(f"  {part:<17} {_gib(m.parts[part])}  {note}".rstrip())
        verdict = "fits" if m.total <= budget else "DOES NOT FIT"
        lines.append(f"  {'total':<17} {_gib(m.total)}  of {budget / GIB:.2f} GiB: {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_arguments(parser, DistillConfig, "tensor_parallel=4")
    parser.add_argument("--world-size", type=int, required=True, help="number of GPUs")
    parser.add_argument("--gpu-memory", default="80GiB", help="memory per GPU (80GiB, 80GB)")
    parser.add_argument("--model", type=Path, help="architecture YAML (configs/models/)")
    parser.add_argument("--latent-shape", type=int, nargs=4, metavar=("C", "F", "H", "W"))
    parser.add_argument("--text-tokens", type=int, help="text tokens per sample")
    parser.add_argument("--moe-boundary", type=float,
                        help="with --model: a two-expert teacher switching at this t")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        if args.world_size < 1:
            raise ConfigError(f"--world-size must be >= 1, got {args.world_size}")
        budget = parse_bytes(args.gpu_memory)
        config = load_config(DistillConfig, args.config, args.overrides)
        plan, source = make_plan(args, config)
        check_run_layout(plan.arch, config, args.world_size)
    except ConfigError as error:
        print(f"preflight: {error}", file=sys.stderr)
        return 2
    ok, memory = fits(plan, budget)
    print(report(plan, memory, budget, source))
    if ok:
        print(f"fits: peak {max(m.total for m in memory) / GIB:.2f} GiB per GPU")
        return 0
    first = next(m for m in memory if m.total > budget)
    largest = max(first.parts, key=first.parts.get)
    where = f"pipeline stage {first.pp_rank}" if plan.pipeline_parallel > 1 else "every rank"
    # a later phase may need far more (Wan2.2's two-expert fake): say so, or 81 GiB reads as "close"
    peak = max(memory, key=lambda m: m.total)
    peak_note = (
        f"; peak: phase {peak.phase}, {peak.total / GIB:.2f} GiB" if peak is not first else ""
    )
    print(
        f"does not fit: phase {first.phase}, {where} needs "
        f"{first.total / GIB:.2f} GiB of {budget / GIB:.2f} GiB (largest part: {largest}, "
        f"{first.parts[largest] / GIB:.2f} GiB){peak_note}"
    )
    suggestions = suggest(plan, budget)
    if not suggestions:
        print(f"no layout of {args.world_size} GPUs fits; more GPUs or a smaller batch_size")
    for values, peak in suggestions:
        sets = " ".join(
            f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()
        )
        print(f"  fits at {peak / GIB:.2f} GiB: {sets}")
    return 1


if __name__ == "__main__":
    sys.exit(main())

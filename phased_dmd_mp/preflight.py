"""Will a distillation run fit? Memory per rank and phase, before any GPU time.

    python -m phased_dmd_mp.preflight --config CONFIG [--set key=value ...] \\
        --world-size N --gpu-memory 80GiB [--host-memory 2TiB --gpus-per-node 8] \\
        [--model configs/models/X.yaml --latent-shape C F H W]

Checks the parallel layout (world divisible by TP x PP x CP, heads / hidden / FFN by TP, layers
by PP, batch by DP x micro batch) and the teacher's shapes, then prints for each phase and each
distinct pipeline stage what one GPU holds (`phased_dmd_mp/memory/estimate.py`: parameters,
gradients, main parameters, optimizer states, EMA, activations, buffers) against the budget,
what optimizer and activation offload keep in host memory per GPU and per node (checked against
--host-memory where given), and the bytes offload moves per iteration. It exits 1 naming the
first phase and stage that does not fit, or the host memory per node that does not, and lists
layouts that fit (tensor parallel with sequence parallelism, context parallel, pipeline
parallel, micro batch, recompute, activation and optimizer offload), or where none of these
GPUs does, the layout needing the least memory and the fewest GPUs (2x, 4x, ...) that fit; 2
for a config mistake.

The architecture comes from the teacher directory (`teacher` key: transformer/config.json,
teacher.yaml's latent shape and second expert, the condition set's text length); before the
teacher is on disk, from the config's `architecture` and `latent_shape` (every shipped recipe
names them; `moe_boundary` marks a two-expert teacher), or from `--model` (a
configs/models/*.yaml architecture) with `--latent-shape`, `--text-tokens` and, for a
two-expert teacher (Wan2.2), `--moe-boundary`. A `student` (generator experts, and the fake
with `fake_init: student`, of another size) comes from its folder, or before it is on disk from
`student_architecture`. With `latent_shapes`, the largest is planned for.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import re
import sys
from pathlib import Path

from phased_dmd_mp.config import ConfigError, add_config_arguments, load_config
from phased_dmd_mp.data.conditions import read_manifest
from phased_dmd_mp.data.teacher import (
    CONDITIONS_DIR,
    read_spec,
    student_transformer,
    teacher_experts,
)
from phased_dmd_mp.distill.config import DistillConfig
from phased_dmd_mp.distill.validate import (
    check_latents,
    check_run_layout,
    check_student,
    read_transformer_arch,
    validate_run,
)
from phased_dmd_mp.memory.estimate import (
    HOST_PARTS,
    PARTS,
    Plan,
    RankMemory,
    estimate,
    offload_traffic,
)
from phased_dmd_mp.models.config import (
    QwenImageConfig,
    WanConfig,
    architecture_file,
    read_architecture,
)

GIB = 2**30
UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
         "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}  # fmt: skip
DEFAULT_TEXT_TOKENS = {"wan": 512, "qwen_image": 256}  # umT5 pads to 512; Qwen2.5-VL varies


LINK_BYTES_PER_SECOND = 50e9  # host <-> GPU per GPU: PCIe 5.0 x16 (64 GB/s) as achieved


def parse_bytes(text: str, flag: str = "--gpu-memory") -> int:
    """'80GiB', '80 GB', '81920MiB' -> bytes (KiB/MiB/GiB/TiB binary, kB/MB/GB/TB decimal)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise ConfigError(f"{flag} {text!r} is not a size such as 80GiB or 80GB")
    size = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if size <= 0:
        raise ConfigError(f"{flag} {text!r} must be more than 0")
    return size


def read_model(path: Path) -> WanConfig | QwenImageConfig:
    """A configs/models/*.yaml architecture (Qwen-Image's have joint_attention_dim)."""
    if not path.is_file():
        raise ConfigError(f"--model {path} does not exist")
    return read_architecture(str(path) if str(path).endswith((".yaml", ".yml")) else f"{path}.yaml")


def make_plan(args, config: DistillConfig) -> tuple[Plan, str]:
    """The Plan of this run and a line saying where the teacher's facts came from."""
    boundary = args.moe_boundary if args.moe_boundary is not None else config.moe_boundary
    teacher_on_disk = Path(config.teacher).is_dir()
    named = config.architecture is not None and not teacher_on_disk
    if args.model is not None or named:
        arch = read_model(args.model) if args.model is not None else read_architecture(
            config.architecture)  # fmt: skip
        latent = args.latent_shape or (None if args.model is not None else config.latent_shape)
        if latent is None:
            what = "--model" if args.model is not None else f"architecture {config.architecture}"
            raise ConfigError(f"{what} needs --latent-shape C F H W (or the latent_shape key)")
        latent, text, shift = tuple(latent), args.text_tokens, config.shift or 5.0
        arch_file = args.model if args.model is not None else architecture_file(config.architecture)
        # A Wan I2V model takes image-latent channels too, which only the conditions know:
        # check out_channels, frames and patch divisibility; a wrong C would skew every number.
        image_channels = max(arch.in_channels - latent[0], 0) if isinstance(arch, WanConfig) else 0
        shape_from = "--latent-shape" if args.latent_shape else "latent_shape"
        check_latents(arch, latent, image_channels, shape_from, arch_file)
        source = f"{arch_file}" if args.model is not None else f"architecture {config.architecture}"
    else:
        if not teacher_on_disk:
            raise ConfigError(
                f"teacher directory {config.teacher} does not exist; before it is on disk, set "
                "the architecture and latent_shape keys (or give --model "
                "configs/models/X.yaml --latent-shape C F H W)"
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
    if config.latent_shapes and not args.latent_shape:
        # several shapes per run: memory follows the most tokens (F x H x W, channels alike)
        latent = max((tuple(s) for s in config.latent_shapes), key=lambda s: s[1] * s[2] * s[3])
        if args.model is not None or named:
            check_latents(arch, latent, image_channels, "latent_shapes", arch_file)
    student_arch = read_student(config, arch, source)
    kind = "wan" if isinstance(arch, WanConfig) else "qwen_image"
    plan = Plan(
        config=config, arch=arch, latent_shape=latent,
        text_tokens=text or DEFAULT_TEXT_TOKENS[kind], world_size=args.world_size, shift=shift,
        two_expert_teacher=boundary is not None, moe_boundary=boundary,
        gpus_per_node=args.gpus_per_node, student_arch=student_arch,
    )  # fmt: skip
    return plan, source


def student_source(config: DistillConfig) -> str:
    """Where the student's architecture comes from: its folder when on disk, else the
    `student_architecture` key."""
    folder = student_transformer(config.student)
    return str(folder) if folder.is_dir() else f"student_architecture {config.student_architecture}"


def read_student(config: DistillConfig, teacher_arch, teacher_source: str):
    """The `student`'s architecture (None without one): from its folder when on disk, else
    from `student_architecture`; checked against the teacher's (ConfigError)."""
    if config.student is None:
        return None
    folder = student_transformer(config.student)
    if folder.is_dir():
        arch = read_transformer_arch(folder, "student")
        check_student(teacher_arch, arch, Path(teacher_source), folder / "config.json")
        return arch
    if config.student_architecture is None:
        raise ConfigError(
            f"student: {config.student} does not exist; before it is on disk, set the "
            "student_architecture key (a configs/models/ name such as wan2.1_t2v_1.3b)"
        )
    arch = read_architecture(config.student_architecture)
    check_student(teacher_arch, arch, Path(teacher_source),
                  architecture_file(config.student_architecture))  # fmt: skip
    return arch


def gpus_on_a_node(plan: Plan) -> int:
    return min(plan.gpus_per_node, plan.world_size)


def host_per_node(plan: Plan, memory: list[RankMemory]) -> int:
    """Host memory a node's GPUs need for offload (the largest GPU's, times GPUs per node)."""
    return gpus_on_a_node(plan) * max(m.host_total for m in memory)


def fits(plan: Plan, budget: int, host_budget: int | None = None) -> tuple[bool, list[RankMemory]]:
    memory = estimate(plan)
    on_gpu = all(m.total <= budget for m in memory)
    on_host = host_budget is None or host_per_node(plan, memory) <= host_budget
    return on_gpu and on_host, memory


def _layouts(plan: Plan):
    """Every layout of the plan's world that the layout rules allow, as lists of candidate
    config overrides that differ only in micro batch, largest first. Tensor parallelism runs
    with sequence parallelism (on by default where TP > 1) within a node."""
    config, arch, world = plan.config, plan.arch, plan.world_size
    heads = arch.num_attention_heads
    if plan.student_arch is not None:  # TP x CP must divide the student's heads too
        heads = math.gcd(heads, plan.student_arch.num_attention_heads)
    has_cp = hasattr(config, "context_parallel")
    tps = [d for d in range(1, min(world, plan.gpus_per_node) + 1) if heads % d == 0]
    pps = [d for d in range(1, world + 1) if arch.num_layers % d == 0]
    offloads = [(False, False), (True, False), (False, True), (True, True)]  # (act, optimizer)
    if config.main_params_dtype == "bfloat16":  # no fp32 main params to offload
        offloads = [(False, False), (True, False)]
    for tp in tps:
        cps = [d for d in range(1, world // tp + 1) if heads % (tp * d) == 0] if has_cp else [1]
        for cp, pp in itertools.product(cps, pps):
            if world % (tp * pp * cp) or config.batch_size % (world // (tp * pp * cp)):
                continue
            rank_batch = config.batch_size // (world // (tp * pp * cp))
            micros = [m for m in range(rank_batch, 0, -1) if rank_batch % m == 0]
            for recompute, (act, opt) in itertools.product(sorted({config.recompute, True}), offloads):
                if act and not recompute:
                    continue
                candidates = []
                for micro in micros:
                    values = dict(tensor_parallel=tp, context_parallel=cp, pipeline_parallel=pp,
                                  micro_batch_size=micro, recompute=recompute,
                                  activation_offload=act, optimizer_offload=opt)  # fmt: skip
                    if not has_cp:
                        del values["context_parallel"]
                    else:  # sequence parallelism where TP > 1 (its default)
                        values["sequence_parallel"] = None
                    try:
                        candidate = dataclasses.replace(config, **values)
                        check_run_layout(arch, candidate, world)
                        if plan.student_arch is not None:
                            check_run_layout(plan.student_arch, candidate, world)
                    except (ConfigError, ValueError):
                        continue
                    candidates.append((values, dataclasses.replace(plan, config=candidate)))
                if candidates:
                    yield candidates


TIGHT = 0.9  # a suggested peak above this share of the budget is ranked last and marked


def suggest(
    plan: Plan, budget: int, host_budget: int | None = None, limit: int = 3
) -> list[tuple[dict, int, int]]:
    """Layouts that fit GPU (and host) memory: (config overrides, peak bytes per GPU, host bytes
    per node); preferred: a peak below TIGHT of the budget (what preflight does not count, the
    CUDA context, NCCL's buffers and fragmentation, needs room), then fewest offloads, fewest
    model-parallel ranks, fewest pipeline stages, the largest micro batch, without recompute."""
    found = []
    for candidates in _layouts(plan):
        fitting = None  # the largest micro batch that fits, below TIGHT if one does
        for values, candidate_plan in candidates:
            ok, memory = fits(candidate_plan, budget, host_budget)
            if ok:
                peak = max(m.total for m in memory)
                fitting = fitting or (values, peak, host_per_node(candidate_plan, memory))
                if peak <= TIGHT * budget:
                    fitting = values, peak, host_per_node(candidate_plan, memory)
                    break
        if fitting:
            found.append(fitting)

    def preference(item):
        values = item[0]
        ranks = values["tensor_parallel"] * values["pipeline_parallel"]
        ranks *= values.get("context_parallel", 1)
        offloaded = values["activation_offload"] + values["optimizer_offload"]
        stages = values["pipeline_parallel"]  # of equal ranks, fewer pipeline bubbles
        tight = item[1] > TIGHT * budget
        return tight, offloaded, ranks, stages, -values["micro_batch_size"], values["recompute"]

    found.sort(key=preference)
    return found[:limit]


def least_memory(plan: Plan) -> tuple[dict, int] | None:
    """The layout of the plan's world needing the least GPU memory (smallest micro batch, every
    offload the config allows): (config overrides, peak bytes per GPU); None if none divides."""
    best = None
    for candidates in _layouts(plan):
        values, candidate_plan = candidates[-1]
        peak = max(m.total for m in estimate(candidate_plan))
        if best is None or peak < best[1]:
            best = values, peak
    return best


MAX_WORLD = 1024  # how far `more_gpus` looks


def more_gpus(plan: Plan, budget: int, host_budget: int | None) -> tuple[int, list] | None:
    """The smallest world of 2x, 4x, ... the plan's GPUs (up to MAX_WORLD) with a layout that
    fits, and its suggestions; None if none does (batch_size limits data parallel)."""
    world = 2 * plan.world_size
    while world <= MAX_WORLD:
        found = suggest(dataclasses.replace(plan, world_size=world), budget, host_budget, limit=1)
        if found:
            return world, found
        world *= 2
    return None


def _gib(value: int) -> str:
    return f"{value / GIB:8.2f} GiB"


def _ranks(plan: Plan, pp_rank: int) -> str:
    """Global ranks of pipeline stage pp_rank (megatron's order: TP fastest, then CP, DP, PP)."""
    per_stage = plan.tensor_parallel * plan.context_parallel * plan.data_parallel
    first = pp_rank * per_stage
    return f"ranks {first}-{first + per_stage - 1}" if per_stage > 1 else f"rank {first}"


def _on(value: bool) -> str:
    return "on" if value else "off"


def report(
    plan: Plan, memory: list[RankMemory], budget: int, source: str, host_budget: int | None
) -> str:
    config = plan.config
    lines = [
        f"teacher: {type(plan.arch).__name__} ({source}), "
        f"{'two experts' if plan.two_expert_teacher else 'one expert'}; latents "
        f"{list(plan.latent_shape)} = {plan.tokens} tokens, {plan.text_tokens} text tokens",
    ]
    if plan.student_arch is not None:
        fake = "and the fake model " if config.fake_init == "student" else ""
        lines.append(
            f"student: {type(plan.student_arch).__name__} ({student_source(config)}), "
            f"{plan.student_arch.num_layers} layers x hidden {plan.student_arch.hidden_size}: "
            f"the generator experts {fake}start from it"
        )
    lines += [
        f"layout: {plan.world_size} GPUs = TP {plan.tensor_parallel} x CP "
        f"{plan.context_parallel} x PP {plan.pipeline_parallel} x DP {plan.data_parallel}, "
        f"sequence parallel {_on(plan.sequence_parallel)}; batch {config.batch_size} = "
        f"{plan.rank_batch} per DP rank in micro batches of {plan.micro_batch}; {config.dtype}, "
        f"recompute {_on(config.recompute)}, generator {config.generator_adapter}; offload: "
        f"optimizer {_on(config.optimizer_offload)}, activations {_on(config.activation_offload)}",
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
        if m.host_total:
            held = ", ".join(f"{p} {m.host[p] / GIB:.2f}" for p in HOST_PARTS if m.host[p])
            lines.append(f"  {'host':<17} {_gib(m.host_total)}  ({held} GiB)")
    if any(m.host_total for m in memory):
        node = host_per_node(plan, memory)
        verdict = "not checked (give --host-memory)"
        if host_budget is not None:
            verdict = f"of {host_budget / GIB:.2f} GiB (--host-memory): " + (
                "fits" if node <= host_budget else "DOES NOT FIT")  # fmt: skip
        lines.append(
            f"host memory per node: {gpus_on_a_node(plan)} GPUs x "
            f"{max(m.host_total for m in memory) / GIB:.2f} GiB = {node / GIB:.2f} GiB {verdict}"
        )
    traffic = offload_traffic(plan)
    if sum(traffic.values()):
        moved = sum(traffic.values())
        lines.append(
            f"offload traffic per GPU and iteration: {moved / GIB:.2f} GiB (optimizer "
            f"{traffic['optimizer'] / GIB:.2f}, activations {traffic['activations'] / GIB:.2f}), "
            f"{moved / LINK_BYTES_PER_SECOND:.1f} s at {LINK_BYTES_PER_SECOND / 1e9:.0f} GB/s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_arguments(parser, DistillConfig, "tensor_parallel=4")
    parser.add_argument("--world-size", type=int, required=True, help="number of GPUs")
    parser.add_argument(
        "--gpu-memory", default="80GiB",
        help="memory per GPU, best nvidia-smi's memory.total in MiB: 81559MiB for an H100 80GB "
        "(79.65 GiB), 81920MiB = 80GiB (the default) for an A100 80GB, 143771MiB for an H200; "
        "GB and TB are decimal: 80GB is 74.51 GiB",
    )  # fmt: skip
    parser.add_argument("--model", type=Path, help="architecture YAML (configs/models/)")
    parser.add_argument("--latent-shape", type=int, nargs=4, metavar=("C", "F", "H", "W"))
    parser.add_argument("--text-tokens", type=int, help="text tokens per sample")
    parser.add_argument("--moe-boundary", type=float,
                        help="a two-expert teacher switching at this t (default: moe_boundary)")  # fmt: skip
    parser.add_argument("--host-memory", help="host memory per node for offload (2TiB, 2TB); "
                        "default: not checked")  # fmt: skip
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    args = parser.parse_args(argv)
    try:
        if args.world_size < 1:
            raise ConfigError(f"--world-size must be >= 1, got {args.world_size}")
        if args.gpus_per_node < 1:
            raise ConfigError(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
        budget = parse_bytes(args.gpu_memory)
        host_budget = None if args.host_memory is None else parse_bytes(
            args.host_memory, "--host-memory")  # fmt: skip
        config = load_config(DistillConfig, args.config, args.overrides)
        plan, source = make_plan(args, config)
        check_run_layout(plan.arch, config, args.world_size)
        if plan.student_arch is not None:
            check_run_layout(plan.student_arch, config, args.world_size)
    except ConfigError as error:
        print(f"preflight: {error}", file=sys.stderr)
        return 2
    ok, memory = fits(plan, budget, host_budget)
    print(report(plan, memory, budget, source, host_budget))
    if ok:
        host = host_per_node(plan, memory)
        on_host = f"; host {host / GIB:.2f} GiB per node" if host else ""
        print(f"fits: peak {max(m.total for m in memory) / GIB:.2f} GiB per GPU{on_host}")
        return 0
    if all(m.total <= budget for m in memory):  # the GPUs fit; the host memory does not
        offloaded = [k for k in ("optimizer_offload", "activation_offload") if getattr(config, k)]
        print(
            f"does not fit: host memory per node needs {host_per_node(plan, memory) / GIB:.2f} "
            f"GiB for {' and '.join(offloaded)} ({gpus_on_a_node(plan)} GPUs x "
            f"{max(m.host_total for m in memory) / GIB:.2f} GiB), more than --host-memory "
            f"{host_budget / GIB:.2f} GiB"
        )
        return _print_suggestions(plan, budget, host_budget)
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
    return _print_suggestions(plan, budget, host_budget)


def _yaml(value) -> str:
    """A --set value as YAML reads it back (true, null, 8)."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _sets(plan: Plan, values: dict) -> str:
    """The --set items that change the plan's config into `values`."""
    changed = {k: v for k, v in values.items() if getattr(plan.config, k) != v}
    return " ".join(f"--set {k}={_yaml(v)}" for k, v in changed.items()) or "(as configured)"


def _print_suggestions(plan: Plan, budget: int, host_budget: int | None) -> int:
    suggestions = suggest(plan, budget, host_budget)
    for values, peak, host in suggestions:
        on_host = f", host {host / GIB:.0f} GiB per node" if host else ""
        tight = f" (tight: above {TIGHT:.0%} of the budget)" if peak > TIGHT * budget else ""
        print(f"  fits at {peak / GIB:.2f} GiB{on_host}{tight}: {_sets(plan, values)}")
    if not suggestions:
        print(no_layout_advice(plan, budget, host_budget))
    return 1


def no_layout_advice(plan: Plan, budget: int, host_budget: int | None) -> str:
    """What to do when no layout of the plan's GPUs fits: what was tried, the layout closest to
    fitting, and what does fit (more host memory, more GPUs)."""
    offloads = "optimizer and activation offload" if plan.config.main_params_dtype == "float32" \
        else "activation offload"  # fmt: skip
    tried = ["micro batches down to 1", "recompute", offloads]
    if plan.world_size > 1:
        tried[:0] = [f"tensor parallel up to {gpus_on_a_node(plan)} with sequence parallelism",
                     "context parallel", "pipeline stages"]  # fmt: skip
    lines = [
        f"no layout of {plan.world_size} GPU{'s' * (plan.world_size > 1)} fits in "
        f"{budget / GIB:.2f} GiB: tried {', '.join(tried)}"
    ]
    closest = least_memory(plan)
    if closest is not None:
        values, peak = closest
        lines.append(f"  least memory: {peak / GIB:.2f} GiB per GPU with {_sets(plan, values)}")
    if host_budget is not None:  # would more host memory do?
        found = suggest(plan, budget, None, limit=1)
        if found:
            values, _, host = found[0]
            lines.append(f"  with {host / GIB:.0f} GiB of host memory per node (--host-memory): "
                         f"{_sets(plan, values)}")  # fmt: skip
    larger = more_gpus(plan, budget, host_budget)
    if larger is None:
        lines.append(
            f"  no world of up to {MAX_WORLD} GPUs fits either (data parallel must divide "
            f"batch_size {plan.config.batch_size}): a smaller model or larger GPUs"
        )
    else:
        world, [(values, peak, host)] = larger
        on_host = f", host {host / GIB:.0f} GiB per node" if host else ""
        tight = f" (tight: above {TIGHT:.0%} of the budget)" if peak > TIGHT * budget else ""
        lines.append(f"  more GPUs: {world} fit at {peak / GIB:.2f} GiB{on_host}{tight}: "
                     f"--world-size {world} {_sets(plan, values)}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

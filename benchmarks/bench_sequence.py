"""Sequence and context parallelism: forward + backward time and saved activations per rank,
every layout against one process, in one run.

    torchrun --nproc_per_node=2 benchmarks/bench_sequence.py [--model configs/models/X.yaml]
        [--layers N] [--latent F H W] [--text-len 32] [--dtype float32] [--recompute off on]
        [--layouts tp2 tp2-sp cp2] [--rounds 5] [--steps 3] [--json FILE]

Layouts are named by their sizes and switches: tpN, cpN, sp (sequence parallelism), e.g.
tp2-cp2-sp on 4 ranks; each must use every rank. The baseline, "one process", runs the whole
model on every rank at once (no communication; the ranks share the machine as the parallel
layouts do). Each layout's model holds the same weights; rounds interleave the layouts and
every ratio is taken within a round, as median [min-max] over rounds, by two clocks: `wall`
(the slowest rank's elapsed time) and `cpu` (the busiest rank's CPU time: the fairer clock
where other jobs share the cores, but blind to time spent waiting for another rank).

Per layout and recompute setting: the step time (forward + backward of a weighted sum of the
output, the slowest rank's), its ratio to one process, the activations saved for backward on
one rank (the bytes of live tensor storages after the forward minus before, the loss's graph
included: memory/measure.py's LiveTensorBytes on CPU, the allocator's count on a GPU) and their
ratio to tensor_parallel = 2 without sequence parallelism where that layout is run, and the
largest relative difference of the output from one process's.

Defaults: on a GPU (NCCL, one GPU per rank) the Wan2.1 1.3B architecture at a 480p, 81-frame
latent (21 x 60 x 104: 32,760 tokens) with 512 text tokens in bfloat16; on a CPU (gloo) a small
Wan (hidden 256, FFN 2.7x as in Wan2.1-14B, 4 layers) at 1 x 32 x 32 latents (256 tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_model import load_arch, make_inputs  # noqa: E402

from phased_dmd_mp.config import load_config  # noqa: E402
from phased_dmd_mp.memory.measure import LiveTensorBytes  # noqa: E402
from phased_dmd_mp.models import ExecutionConfig, WanConfig, build  # noqa: E402
from phased_dmd_mp.models.loading import load_whole_state_dict  # noqa: E402
from phased_dmd_mp.parallel import pipeline  # noqa: E402
from phased_dmd_mp.parallel.state import destroy, initialize  # noqa: E402

DEFAULT_GPU_MODEL = ROOT / "configs" / "models" / "wan2.1_t2v_1.3b.yaml"
CPU_WAN = WanConfig(
    num_attention_heads=4,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    text_dim=64,
    freq_dim=64,
    ffn_dim=692,  # 2.7 x hidden, as Wan2.1-14B's 13824 / 5120
    num_layers=4,
)
ONE = "one process"


def parse_layout(name: str) -> dict:
    sizes = dict(re.findall(r"(tp|cp)(\d+)", name))
    return {
        "tp": int(sizes.get("tp", 1)),
        "cp": int(sizes.get("cp", 1)),
        "sp": "sp" in name.split("-"),
    }


def groups_of(layout: dict):
    """megatron-style process groups of a layout over the whole world (TP fastest, then CP),
    as a ProcessGroupCollection; every rank must call it in the same order."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    world, rank = dist.get_world_size(), dist.get_rank()
    tp, cp = layout["tp"], layout["cp"]
    if tp * cp != world:
        raise SystemExit(f"layout {layout} needs {tp * cp} ranks, this run has {world}")
    mine = {}
    for start in range(0, world, tp):  # TP groups: consecutive ranks
        ranks = list(range(start, start + tp))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["tp"] = group
    for offset in range(tp):  # CP groups: stride TP
        ranks = list(range(offset, world, tp))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["cp"] = group
    for r in range(world):  # one-rank pipeline groups
        group = dist.new_group([r])
        if r == rank:
            mine["pp"] = group
    return ProcessGroupCollection(tp=mine["tp"], cp=mine["cp"], pp=mine["pp"])


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def saved_bytes(device: str, result: dict):
    """Bytes of tensor storages alive at the end of the block minus at its start."""
    if device == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated()
        yield
        synchronize(device)
        result["bytes"] = torch.cuda.memory_allocated() - before
        return
    with LiveTensorBytes(device) as tracker:
        before = tracker.live
        yield
        result["bytes"] = tracker.live - before


def forward_backward(model, inputs, weight, device: str, measure: bool = False) -> dict:
    """One step; returns {'seconds': (wall, cpu), 'output', and with `measure` 'saved'}."""
    model.zero_grad(set_to_none=True)
    synchronize(device)
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    result, saved = {}, {}
    with pipeline.outside_schedules():
        with saved_bytes(device, saved) if measure else contextlib.nullcontext():
            output = model(**inputs)
            loss = (output.float() * weight).sum()
        pipeline.backward(loss, model)
    synchronize(device)
    result["seconds"] = (time.perf_counter() - start, time.process_time() - cpu)
    result["output"] = output.detach()
    if measure:
        result["saved"] = saved["bytes"]
    return result


def slowest(seconds: list[float], device: str) -> list[float]:
    """Each clock's largest value over the ranks."""
    value = torch.tensor(seconds, device=device, dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.tolist()


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="an architecture YAML (configs/models/)")
    parser.add_argument("--layers", type=int, help="the model with this many layers")
    parser.add_argument("--latent", type=int, nargs=3, metavar=("F", "H", "W"))
    parser.add_argument("--text-len", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--recompute", nargs="+", choices=["off", "on"], default=["off"])
    parser.add_argument("--layouts", nargs="+", default=["tp2", "tp2-sp", "cp2"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per layout and round")
    parser.add_argument("--json", type=Path, help="write the rows here (rank 0)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    initialize(1, 1)  # world of data-parallel ranks: megatron's buffers; layouts bring groups
    rank = dist.get_rank()
    if args.model:
        arch = load_arch(args.model)
    else:
        arch = load_config(WanConfig, DEFAULT_GPU_MODEL) if cuda else CPU_WAN
    if args.layers:
        arch = dataclasses.replace(arch, num_layers=args.layers)
    latent = tuple(args.latent or ((21, 60, 104) if cuda else (1, 32, 32)))
    text_len = args.text_len or (512 if cuda else 32)
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    torch_dtype = getattr(torch, dtype)
    inputs, tokens = make_inputs(arch, latent, text_len, 1, torch_dtype, device)

    torch.manual_seed(0)
    whole = {k: v for k, v in build(arch, init_weights=True).state_dict().items()
             if isinstance(v, torch.Tensor)}  # fmt: skip
    layouts = {ONE: {"tp": 1, "cp": 1, "sp": False}}
    layouts.update({name: parse_layout(name) for name in args.layouts})
    models = {}
    for recompute in args.recompute:
        for name, layout in layouts.items():
            groups = groups_of(layout) if name != ONE else groups_of_one()
            execution = ExecutionConfig(
                dtype=dtype, recompute=recompute == "on", sequence_parallel=layout["sp"]
            )
            model = build(arch, execution, groups, init_weights=False).to(device)
            load_whole_state_dict(model, whole)
            model.train()
            models[(name, recompute)] = model
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        reference_output = models[(ONE, args.recompute[0])](**inputs)
    weight = torch.randn(reference_output.shape, generator=generator).to(device)

    rows = []
    for recompute in args.recompute:
        measured = {}
        for name in layouts:  # warm-up, memory and output check
            model = models[(name, recompute)]
            forward_backward(model, inputs, weight, device)
            step = forward_backward(model, inputs, weight, device, measure=True)
            error = (step["output"].float() - reference_output.float()).norm()
            measured[name] = {
                "saved_bytes": step["saved"],
                "output_error": (error / reference_output.float().norm()).item(),
                "seconds": {"wall": [], "cpu": []},
            }
        for _ in range(args.rounds):
            for name in layouts:
                steps = [
                    forward_backward(models[(name, recompute)], inputs, weight, device)["seconds"]
                    for _ in range(args.steps)
                ]
                medians = [statistics.median(step[i] for step in steps) for i in range(2)]
                wall, cpu = slowest(medians, device)
                measured[name]["seconds"]["wall"].append(wall)
                measured[name]["seconds"]["cpu"].append(cpu)
        tp_reference = measured.get("tp2", {}).get("saved_bytes")
        for clock in ("wall", "cpu") if device == "cpu" else ("wall",):
            baseline = measured[ONE]["seconds"][clock]
            for name, values in measured.items():
                seconds = values["seconds"][clock]
                rows.append({
                    "layout": name,
                    "recompute": recompute,
                    "clock": clock,
                    "ranks": dist.get_world_size(),
                    "tokens": tokens,
                    "step_ms": summary([1e3 * t for t in seconds]),
                    "vs_one_process": summary([t / b for t, b in zip(seconds, baseline)]),
                    "saved_mib": values["saved_bytes"] / 2**20,
                    "saved_vs_tp2": None if tp_reference is None
                    else values["saved_bytes"] / tp_reference,
                    "output_error": values["output_error"],
                })  # fmt: skip
    if rank == 0:
        print_rows(rows, arch, latent, text_len, dtype, device)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
    destroy()
    return 0


def groups_of_one():
    """The baseline's groups: every rank alone."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    rank = dist.get_rank()
    mine = None
    for r in range(dist.get_world_size()):
        group = dist.new_group([r])
        if r == rank:
            mine = group
    return ProcessGroupCollection(tp=mine, cp=mine, pp=mine)


def print_rows(rows, arch, latent, text_len, dtype, device) -> None:
    print(
        f"{type(arch).__name__} hidden {arch.hidden_size}, {arch.num_layers} layers, latent "
        f"{'x'.join(map(str, latent))} ({rows[0]['tokens']} tokens), {text_len} text tokens, "
        f"{dtype}, {device}, {rows[0]['ranks']} ranks"
    )
    print(
        "| layout | recompute | clock | step ms | vs one process | saved MiB / rank | vs tp2 | "
        "output rel. error |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        step, ratio = row["step_ms"], row["vs_one_process"]
        versus = "" if row["saved_vs_tp2"] is None else f"{row['saved_vs_tp2']:.2f}"
        print(
            f"| {row['layout']} | {row['recompute']} | {row['clock']} | {step['median']:.1f} "
            f"[{step['min']:.1f}-{step['max']:.1f}] | {ratio['median']:.2f} "
            f"[{ratio['min']:.2f}-{ratio['max']:.2f}] | {row['saved_mib']:.2f} | {versus} | "
            f"{row['output_error']:.1e} |"
        )


if __name__ == "__main__":
    sys.exit(main())

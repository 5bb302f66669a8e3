"""Fused kernels vs eager PyTorch vs torch.compile, forward + backward, in one run.

    python benchmarks/bench_kernels.py [--device cpu|cuda] [--sizes 16M 64M]
                                      [--dtypes float32 bfloat16] [--rounds 5] [--json FILE]

Ops (semantics: phased_dmd_mp/losses.py; B = 8 samples of N / 8 elements each):
  subinterval_loss  clamped Eq. 13 loss and its gradient w.r.t. the fake velocity
  dmd_loss          guided DMD generator loss (CFG teacher) and its gradient w.r.t. x_s
  noising           x_t = alpha_{t|s} x_s + sigma_{t|s} eps (forward only)
and `copy`, a plain copy of N elements into a preallocated tensor: the bandwidth reference.

Repetitions are interleaved: each round times copy, fused, eager and compile once each, one
after the other, so load from other processes hits all of them alike; every ratio is taken
within a round and reported as the median [min-max] over rounds, by the wall clock and by the
process's CPU time (with --threads 1 the fairer clock on a machine other jobs share). Bandwidth = bytes the op must
move (each input read once, each full-size output written once) / time; "of copy" divides it
by the same round's copy bandwidth (2 N elements moved).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import time

import torch

from phased_dmd_mp import losses, ops

BATCH = 8


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"size {text!r} is not like 16M")
    return int(match[1]) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match[2]]


def make_cases(n: int, dtype: torch.dtype, device: str):
    """{op: (function of backend, tensor elements moved per call)}."""
    generator = torch.Generator(device=device).manual_seed(0)

    def randn():
        return torch.randn(BATCH, n // BATCH, generator=generator, device=device, dtype=dtype)

    pred, x_s, eps, cond, uncond, fake = (randn() for _ in range(6))
    s = torch.full((BATCH,), 0.625, device=device)
    t = s + (1 - s) * torch.rand(BATCH, generator=generator, device=device)

    def subinterval_loss(backend):
        p = pred.detach().requires_grad_(True)
        losses.subinterval_flow_loss(p, x_s, eps, t, s, backend=backend).backward()
        return p.grad

    def dmd_loss(backend):
        x = x_s.detach().requires_grad_(True)
        loss = losses.dmd_generator_loss(
            x, cond, fake, t, s, v_teacher_uncond=uncond, guidance_scale=4.0, backend=backend
        )
        loss.backward()
        return x.grad

    def noising(backend):
        return ops.add_noise_from(x_s, eps, t, s, backend=backend)

    # The least any implementation must move: read pred, x_s, eps and write the gradient |
    # read cond, uncond, fake and write the gradient | read x_s, eps and write x_t.
    return {
        "subinterval_loss": (subinterval_loss, 4),
        "dmd_loss": (dmd_loss, 4),
        "noising": (noising, 3),
    }


def measure(fn, min_run_time: float) -> tuple[float, float]:
    """(median wall seconds, mean CPU seconds of this process) per call, over at least
    min_run_time and 3 calls. CPU time is the fairer clock while other jobs share the cores:
    run with --threads 1 for it, as idle threads of a parallel region spin on a CPU."""
    walls, cpu, start = [], time.process_time(), time.perf_counter()
    while len(walls) < 3 or time.perf_counter() - start < min_run_time:
        begin = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - begin)
    return statistics.median(walls), (time.process_time() - cpu) / len(walls)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def show(stat: dict, unit: str = "x") -> str:
    if unit == "%":
        return f"{100 * stat['median']:.0f}% [{100 * stat['min']:.0f}-{100 * stat['max']:.0f}]"
    return f"{stat['median']:.2f}{unit} [{stat['min']:.2f}-{stat['max']:.2f}]"


def bench_group(n, dtype, device, variants_wanted, rounds, min_run_time) -> list[dict]:
    """All ops at one size and dtype: per-round times, then per-round ratios."""
    bytes_per_element = torch.finfo(dtype).bits // 8
    source = torch.randn(n, device=device).to(dtype)
    target = torch.empty_like(source)

    def copy():
        target.copy_(source)

    cases = make_cases(n, dtype, device)
    variants = {}
    for op, (fn, _) in cases.items():
        for name in variants_wanted:
            backend = "fused" if name == "fused" else "reference"
            variants[op, name] = functools.partial(fn, backend)
            if name == "compile":
                variants[op, name] = torch.compile(variants[op, name])
    for variant in variants.values():
        variant()  # warm-up (and compilation)
    times = {key: [] for key in [("copy", "copy"), *variants]}
    for _ in range(rounds):
        times["copy", "copy"].append(measure(copy, min_run_time))
        for key, variant in variants.items():
            times[key].append(measure(variant, min_run_time))
    dtype_name = str(dtype).split(".")[1]
    rows = []
    for index, clock in enumerate(("wall", "cpu")):
        copy_times = [t[index] for t in times["copy", "copy"]]
        copy_gbps = [2 * n * bytes_per_element / t / 1e9 for t in copy_times]
        rows.append(
            {
                "op": "copy",
                "dtype": dtype_name,
                "elements": n,
                "clock": clock,
                "ms": spread([1e3 * t for t in copy_times]),
                "gbps": spread(copy_gbps),
            }
        )
        for op, (_, tensors_moved) in cases.items():
            fused = [t[index] for t in times[op, "fused"]]
            gbps = [tensors_moved * n * bytes_per_element / t / 1e9 for t in fused]
            row = {
                "op": op,
                "dtype": dtype_name,
                "elements": n,
                "clock": clock,
                "ms": spread([1e3 * t for t in fused]),
                "gbps": spread(gbps),
                "of_copy": spread([g / c for g, c in zip(gbps, copy_gbps)]),
            }
            for name in variants_wanted:
                if name != "fused":
                    other = [t[index] for t in times[op, name]]
                    row[f"vs_{name}"] = spread([o / f for o, f in zip(other, fused)])
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--sizes", nargs="+", type=parse_size, default=None,
        help="elements per tensor (default 16M 64M; on CUDA also 256M)",
    )  # fmt: skip
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timing")
    parser.add_argument("--threads", type=int, help="torch and kernel threads (default: torch's)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes or [parse_size(s) for s in ("16M", "64M")] + (
        [parse_size("256M")] if args.device == "cuda" else []
    )
    device_name = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(
        f"{device_name}, torch {torch.__version__}; loss ops timed forward + backward; "
        f"load average at start {load}; {args.rounds} interleaved rounds, median [min-max]"
    )
    variants = ["fused", "eager"] + ([] if args.no_compile else ["compile"])
    print("| op | dtype | elements | clock | fused ms | GB/s | of copy | vs eager | vs compile |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for dtype_name in args.dtypes:
        for n in args.sizes or sizes:
            group = bench_group(n, getattr(torch, dtype_name), args.device, variants,
                                args.rounds, args.min_run_time)  # fmt: skip
            for r in group:
                cells = [show(r["ms"], ""), show(r["gbps"], "")]
                cells += [show(r[k], "%" if k == "of_copy" else "x") if k in r else ""
                          for k in ("of_copy", "vs_eager", "vs_compile")]  # fmt: skip
                print(
                    f"| {r['op']} | {dtype_name} | {n / 2**20:g}M | {r['clock']} | "
                    + " | ".join(cells)
                    + " |",
                    flush=True,
                )
            rows += group
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": device_name, "torch": torch.__version__, "load_at_start": load,
                 "rows": rows}, f, indent=1,
            )  # fmt: skip


if __name__ == "__main__":
    main()

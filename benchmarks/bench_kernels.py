"""Fused kernels vs eager PyTorch vs torch.compile, forward + backward, in one run.

    python benchmarks/bench_kernels.py [--device cpu|cuda] [--sizes 1M 16M 64M]
                                      [--dtypes float32 bfloat16] [--json results.json]

Ops (semantics: phased_dmd_mp/losses.py; B = 8 samples of N / 8 elements each):
  subinterval_loss  clamped Eq. 13 loss and its gradient w.r.t. the fake velocity
  dmd_loss          guided DMD generator loss (CFG teacher) and its gradient w.r.t. x_s
  noising           x_t = alpha_{t|s} x_s + sigma_{t|s} eps (forward only)
For each it prints the median time, the effective bandwidth (bytes that must move / time: the
inputs read and outputs written once) and the speed-up over eager, all from the same process;
`copy` rows time a plain tensor copy of N elements as a bandwidth reference.
"""

from __future__ import annotations

import argparse
import json
import re

import torch
from torch.utils.benchmark import Timer

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

    # forward reads 3, backward reads 3 and writes 1 | forward reads 3, writes g; backward
    # reads g, writes the gradient | reads 2, writes 1
    return {
        "subinterval_loss": (subinterval_loss, 7),
        "dmd_loss": (dmd_loss, 6),
        "noising": (noising, 3),
    }


def measure(fn, min_run_time: float) -> float:
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def row(op, dtype, elements, variant, seconds, bytes_moved, eager_seconds=None) -> dict:
    return {
        "op": op,
        "dtype": dtype,
        "elements": elements,
        "variant": variant,
        "ms": seconds * 1e3,
        "gbps": bytes_moved / seconds / 1e9,
        "speedup": None if eager_seconds is None else eager_seconds / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        default=None,
        help="elements per tensor (default 1M 4M 16M 64M; on CUDA also 256M)",
    )
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    sizes = args.sizes or [parse_size(s) for s in ("1M", "4M", "16M", "64M")] + (
        [parse_size("256M")] if args.device == "cuda" else []
    )
    device_name = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"{device_name}, torch {torch.__version__}; loss ops timed forward + backward")
    print("| op | dtype | elements | variant | median ms | GB/s | vs eager |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for n in sizes:
            cases = make_cases(n, dtype, args.device)
            bytes_per_element = torch.finfo(dtype).bits // 8
            source = torch.empty(n, device=args.device, dtype=dtype)
            target = torch.empty_like(source)
            copy_time = measure(lambda a=source, b=target: b.copy_(a), args.min_run_time)
            group = [row("copy", dtype_name, n, "copy", copy_time, 2 * n * bytes_per_element)]
            for op, (fn, tensors_moved) in cases.items():
                variants = {"eager": lambda f=fn: f("reference"), "fused": lambda f=fn: f("fused")}
                if not args.no_compile:
                    variants["compile"] = torch.compile(lambda f=fn: f("reference"))
                times = {}
                for name, variant in variants.items():
                    variant()  # warm-up (and compilation)
                    times[name] = measure(variant, args.min_run_time)
                for name, seconds in times.items():
                    moved = tensors_moved * n * bytes_per_element
                    group.append(row(op, dtype_name, n, name, seconds, moved, times["eager"]))
            for r in group:
                speedup = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
                print(
                    f"| {r['op']} | {dtype_name} | {n / 2**20:g}M | {r['variant']} | "
                    f"{r['ms']:.3f} | {r['gbps']:.1f} | {speedup} |",
                    flush=True,
                )
            rows += group
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": device_name, "torch": torch.__version__, "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()

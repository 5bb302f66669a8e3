"""Clamped subinterval loss: fused C++ kernel vs the eager reference vs torch.compile(reference).

    python benchmarks/bench_subinterval_loss.py [--sizes 8x65536 8x1048576] [--no-compile]

Times forward+backward (gradient w.r.t. the prediction) in one process and prints each
variant's median and its speed relative to eager, so the ratios come from the same run.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.benchmark import Timer

from phased_dmd_mp.losses import subinterval_flow_loss
from phased_dmd_mp.ops import fused_subinterval_loss


def _inputs(batch: int, elements: int, device: str):
    generator = torch.Generator().manual_seed(0)
    pred, x_s, eps = (torch.randn(batch, elements, generator=generator) for _ in range(3))
    s = torch.full((batch,), 0.625)
    t = s + (1 - s) * torch.rand(batch, generator=generator)
    return [x.to(device) for x in (pred, x_s, eps, t, s)]


def _step(loss_fn):
    def run(pred, x_s, eps, t, s):
        pred = pred.detach().requires_grad_(True)
        loss_fn(pred, x_s, eps, t, s).backward()
        return pred.grad

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes", nargs="+", default=["8x65536", "8x1048576"], help="BxD per sample"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    args = parser.parse_args()

    variants = {"eager": _step(subinterval_flow_loss), "fused": _step(fused_subinterval_loss)}
    if not args.no_compile:
        variants["compile"] = _step(torch.compile(subinterval_flow_loss, dynamic=False))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32, forward+backward"
    )
    print("| B x D | variant | median (ms) | speed vs eager |")
    print("|---|---|---|---|")
    for size in args.sizes:
        batch, elements = (int(v) for v in size.split("x"))
        inputs = _inputs(batch, elements, "cpu")
        reference = variants["eager"](*inputs)
        medians = {}
        for name, fn in variants.items():
            torch.testing.assert_close(
                fn(*inputs), reference, rtol=1e-4, atol=1e-6
            )  # also warms up
            timer = Timer(
                "fn(*inputs)",
                globals={"fn": fn, "inputs": inputs},
                num_threads=torch.get_num_threads(),
            )
            medians[name] = timer.blocked_autorange(min_run_time=args.min_run_time).median
        for name, median in medians.items():
            print(f"| {size} | {name} | {median * 1e3:.3f} | {medians['eager'] / median:.2f}x |")


if __name__ == "__main__":
    main()

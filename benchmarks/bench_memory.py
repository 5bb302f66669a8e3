"""Memory of one generator update: one-step DMD, N-step DMD with backpropagation through every
step, DMD with stochastic gradient truncation (SGTS) and Phased DMD, for N = 2, 4, 8; with
--precision, memory per rank and step time of one fake and one generator update in each
precision (distill/optim.py).

    python benchmarks/bench_memory.py [--width 128] [--layers 4] [--size 16] [--batch 8]
    python benchmarks/bench_memory.py --precision [--width 256] [--repeats 5]

All runs use the same random Wan-architecture DiT as teacher, fake and generator. Measured per
update: the bytes autograd saves for backward (activations, the part the algorithms differ in;
exact on any device) and, on a GPU, the peak allocated memory. Ratios are to one-step DMD in the
same run. The paper's claim: Phased DMD stays near one-step DMD while full backpropagation grows
with N.

--precision: one-step DMD with a full-copy generator in fp32, bf16 with fp32 main params, bf16
with fp32 main params sharded over DP = 2 ranks (the script relaunches itself under torchrun,
gloo) and pure bf16. Per rank: the bytes held by every model and optimizer (distinct storages:
weights, gradient buffers, main params, Adam moments; exact on any device), the most bytes
autograd saves for one update's backward, their sum (the peak on a device with no other use), the
peak CUDA memory on a GPU, and the median time of one fake + one generator update relative to
fp32, measured alternately in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from phased_dmd_mp.config import load_config
from phased_dmd_mp.data.digits import write_digits_condition_set
from phased_dmd_mp.data.teacher import TeacherSpec, write_spec
from phased_dmd_mp.distill.config import DistillConfig
from phased_dmd_mp.distill.trainer import Distiller
from phased_dmd_mp.models import WanConfig, build
from phased_dmd_mp.models.convert import ours_to_diffusers, write_diffusers_dir


def write_teacher(path: Path, width: int, layers: int, size: int) -> Path:
    heads = max(1, width // 32)
    arch = WanConfig(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=width // heads,
        in_channels=4, out_channels=4, text_dim=32, freq_dim=64, ffn_dim=4 * width,
        num_layers=layers,
    )  # fmt: skip
    torch.manual_seed(0)
    write_diffusers_dir(
        path / "transformer", arch, ours_to_diffusers(build(arch).state_dict(), arch)
    )
    write_digits_condition_set(path / "conditions", text_dim=32, seed=0)
    write_spec(path, TeacherSpec(latent_shape=(4, 1, size, size), shift=3.0, guidance_scale=3.0))
    return path


def saved_bytes(step) -> int:
    """Bytes of the distinct storages autograd saves for backward while `step()` runs."""
    saved, seen = 0, set()

    def pack(tensor: torch.Tensor):
        nonlocal saved
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            saved += key[1]
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return saved


def measure(distiller: Distiller) -> tuple[int, int | None]:
    """(bytes saved for backward, peak CUDA bytes or None) of one generator update."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # the last phase: deepest rollout
    saved = saved_bytes(lambda: distiller.generator_update(distiller.config.num_phases))
    return saved, (torch.cuda.max_memory_allocated() if cuda else None)


PRECISIONS = {
    "fp32": ["dtype=float32"],
    "bf16 mixed (fp32 main params)": ["dtype=bfloat16", "distributed_optimizer=false"],
    "bf16 mixed, sharded over DP = 2": ["dtype=bfloat16", "distributed_optimizer=true"],
    "bf16 pure": ["dtype=bfloat16", "main_params_dtype=bfloat16", "distributed_optimizer=false"],
}
SHARDED = "bf16 mixed, sharded over DP = 2"


def held_bytes(d: Distiller) -> int:
    """Bytes of every model's weights and every trained role's buffers and optimizer state."""
    from phased_dmd_mp.distill.models import RoutedVelocity
    from phased_dmd_mp.distill.optim import storage_bytes

    models = [d.teacher, *d.generator, *d.fakes.values()]
    modules = [
        m for model in models for m in ((model.high, model.low) if isinstance(model, RoutedVelocity) else (model,))
    ]  # fmt: skip
    tensors = [t for m in modules for t in (*m.module.parameters(), *m.module.buffers())]
    tensors += [t for trained in d.trained.values() for t in trained.tensors()]
    return storage_bytes(tensors)


def one_update_pair(d: Distiller) -> tuple[int, float]:
    """(most bytes saved for one backward, seconds) of one fake and one generator update."""
    peaks = []
    start = time.perf_counter()
    for update in (d.fake_update, d.generator_update):
        peaks.append(saved_bytes(lambda update=update: update(1)))
    return max(peaks), time.perf_counter() - start


def precision_distiller(teacher: Path, run_dir: Path, batch: int, name: str) -> Distiller:
    overrides = [f"teacher={teacher}", f"batch_size={batch}", "iterations_per_phase=1",
                 "algorithm=dmd", "num_steps=1", "num_phases=1", "fake_updates=1",
                 "generator_lr=2e-6", "fake_lr=2e-6", *PRECISIONS[name]]  # fmt: skip
    return Distiller(load_config(DistillConfig, None, overrides), run_dir, progress=False)


def precision_row(d: Distiller, repeats: int) -> dict:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    activations, _ = one_update_pair(d)  # the first update pair builds buffers and moments
    times = [one_update_pair(d)[1] for _ in range(repeats)]
    held = held_bytes(d)
    return {
        "held": held, "activations": activations, "seconds": statistics.median(times) if times else None,
        "peak_cuda": torch.cuda.max_memory_allocated() if cuda else None,
    }  # fmt: skip


def precision_worker(teacher: Path, run_dir: Path, batch: int, repeats: int) -> None:
    """Under torchrun: the sharded variant; rank 0 prints its row as JSON."""
    import torch.distributed as dist

    row = precision_row(precision_distiller(teacher, run_dir, batch, SHARDED), repeats)
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        print("ROW " + json.dumps(max(rows, key=lambda r: r["held"])))


def precision_main(args, tmp: Path) -> None:
    teacher = write_teacher(tmp / "teacher", args.width, args.layers, args.size)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               __file__, "--precision-worker", str(teacher), "--width", str(args.width),
               "--batch", str(args.batch), "--repeats", str(args.repeats)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    sharded = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    rows = {SHARDED: json.loads(sharded.stdout.split("ROW ", 1)[1])}
    single = {
        n: precision_distiller(teacher, tmp / n, args.batch, n) for n in PRECISIONS if n != SHARDED
    }
    for name, d in single.items():
        rows[name] = precision_row(d, 0)
    times = {name: [] for name in single}
    for _ in range(args.repeats):  # alternate the variants so machine load hits them alike
        for name, d in single.items():
            times[name].append(one_update_pair(d)[1])
    for name in single:
        rows[name]["seconds"] = statistics.median(times[name])
    parameters = sum(p.numel() for p in single["fp32"].generator[0].parameters())
    print(f"Wan DiT width {args.width}, {args.layers} layers ({parameters / 1e6:.2f} M parameters "
          f"per model: teacher, generator, fake), latent 4x{args.size}x{args.size}, batch "
          f"{args.batch}; one fake + one generator update of one-step DMD; per rank (the "
          "sharded row: the rank holding most)")  # fmt: skip
    print("| precision | models + optimizer (MiB) | saved activations (MiB) | sum (MiB) | "
          "vs fp32 | peak CUDA (MiB) | update time vs fp32 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    fp32 = rows["fp32"]
    for name in PRECISIONS:
        r = rows[name]
        total = r["held"] + r["activations"]
        cuda = "-" if r["peak_cuda"] is None else f"{r['peak_cuda'] / 2**20:.1f}"
        speed = "(other process)" if name == SHARDED else f"{r['seconds'] / fp32['seconds']:.2f}x"
        print(f"| {name} | {r['held'] / 2**20:.2f} | {r['activations'] / 2**20:.2f} | "
              f"{total / 2**20:.2f} | {total / (fp32['held'] + fp32['activations']):.2f}x | "
              f"{cuda} | {speed} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=None, help="128; 256 with --precision")
    parser.add_argument("--layers", type=int, default=4, help="default 4")
    parser.add_argument("--size", type=int, default=16, help="latent height = width (default 16)")
    parser.add_argument("--batch", type=int, default=8, help="default 8")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8], help="default 2 4 8")
    parser.add_argument("--precision", action="store_true", help="the precision table")
    parser.add_argument("--repeats", type=int, default=5, help="timed update pairs (--precision)")
    parser.add_argument("--precision-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.width = args.width or (256 if args.precision or args.precision_worker else 128)
    if args.precision_worker:
        return precision_worker(
            args.precision_worker, args.precision_worker.parent / "dp2", args.batch, args.repeats
        )
    if args.precision:
        with tempfile.TemporaryDirectory() as tmp:
            return precision_main(args, Path(tmp))
    with tempfile.TemporaryDirectory() as tmp:
        teacher = write_teacher(Path(tmp) / "teacher", args.width, args.layers, args.size)
        variants = [("one-step DMD", 1, ["algorithm=dmd", "num_steps=1", "num_phases=1"])]
        for n in args.steps:
            variants += [
                (f"{n}-step DMD, full backprop", n, ["algorithm=few_step_dmd", f"num_steps={n}", "num_phases=1"]),
                (f"{n}-step DMD + SGTS", n, ["algorithm=dmd_sgts", f"num_steps={n}", "num_phases=1"]),
                (f"{n}-step Phased DMD, {n} phases", n, [f"num_steps={n}", f"num_phases={n}"]),
                (f"{n}-step Phased DMD, 2 phases, backprop in phase", n,
                 [f"num_steps={n}", "num_phases=2", "phase_gradient=all"]),
            ]  # fmt: skip
        print(f"Wan DiT width {args.width}, {args.layers} layers, latent 4x{args.size}x{args.size}, "
              f"batch {args.batch}; one generator update (of the last phase)")  # fmt: skip
        print("| algorithm | steps | saved activations (MiB) | vs one-step | peak CUDA (MiB) |")
        print("|---|---|---|---|---|")
        baseline = None
        for name, steps, overrides in variants:
            config = load_config(
                DistillConfig,
                None,
                [
                    f"teacher={teacher}",
                    f"batch_size={args.batch}",
                    "iterations_per_phase=1",
                    *overrides,
                ],
            )
            saved, peak = measure(Distiller(config, Path(tmp) / "run", progress=False))
            baseline = baseline or saved
            peak_text = "-" if peak is None else f"{peak / 2**20:.1f}"
            print(
                f"| {name} | {steps} | {saved / 2**20:.2f} | {saved / baseline:.2f}x | {peak_text} |"
            )


if __name__ == "__main__":
    main()

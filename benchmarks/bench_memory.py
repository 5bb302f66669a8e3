"""Memory of one generator update: one-step DMD, N-step DMD with backpropagation through every
step, DMD with stochastic gradient truncation (SGTS) and Phased DMD, for N = 2, 4, 8.

    python benchmarks/bench_memory.py [--width 128] [--layers 4] [--size 16] [--batch 8]

All runs use the same random Wan-architecture DiT as teacher, fake and generator. Measured per
update: the bytes autograd saves for backward (activations, the part the algorithms differ in;
exact on any device) and, on a GPU, the peak allocated memory. Ratios are to one-step DMD in the
same run. The paper's claim: Phased DMD stays near one-step DMD while full backpropagation grows
with N.
"""

from __future__ import annotations

import argparse
import tempfile
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


def measure(distiller: Distiller) -> tuple[int, int | None]:
    """(bytes saved for backward, peak CUDA bytes or None) of one generator update."""
    saved, seen = 0, set()

    def pack(tensor: torch.Tensor):
        nonlocal saved
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            saved += key[1]
        return tensor

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        distiller.generator_update(distiller.config.num_phases)  # the last phase: deepest rollout
    return saved, (torch.cuda.max_memory_allocated() if cuda else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--size", type=int, default=16, help="latent height = width")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
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

"""What a bf16 run's export keeps of what training learned, against an fp32 run of the same
teacher (issue 23, item 5).

    python benchmarks/export_precision.py [--updates 200] [--lr 2e-6] [--out DIR]

A tiny random fp32 Wan teacher (2 heads x 8, 2 layers, megatron's initialisation, digits-shaped [1, 1, 8, 8] latents and
class conditions) is distilled twice with one-step DMD and a full-copy generator at a real
learning rate, once in fp32 and once in bf16 with fp32 main parameters (`--fake-lr 1e-3
--fake-updates 3 --batch-size 8`: the fake model learns fast, so the generator's DMD gradient is
signal rather than bf16 rounding of the forward passes, as in tests/test_distill_precision.py). Printed, for each run's
export/expert_1 against the teacher's stored weights: its dtype, the share of its values equal
to the teacher's values rounded to bf16 (what an export of the bf16 compute copy holds where an
update rounded away), its change from the teacher in norm relative to the fp32 run's change,
and the cosine between the two changes. Measured in one invocation; one CPU core, ~1 minute.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")

from phased_dmd_mp.models.convert import read_diffusers_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny teacher, so the numbers match theirs
from distill_helpers import write_tiny_teacher  # noqa: E402

RUN = ["algorithm=dmd", "num_steps=1", "num_phases=1", "log_every=50", "sample_every=100000",
       "checkpoint_every=100000"]  # fmt: skip


def flat(state: dict[str, torch.Tensor], keys) -> torch.Tensor:
    return torch.cat([state[k].double().flatten() for k in keys])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=200, help="generator updates per run")
    parser.add_argument("--lr", type=float, default=2e-6, help="generator learning rate")
    parser.add_argument("--fake-lr", type=float, default=2e-6, help="fake model's learning rate")
    parser.add_argument("--fake-updates", type=int, default=1, help="per generator update")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args(argv)
    from phased_dmd_mp import pretrain_distill

    root = args.out or Path(tempfile.mkdtemp(prefix="export_precision_"))
    teacher = write_tiny_teacher(root / "teacher")
    _, _, stored = read_diffusers_dir(teacher / "transformer")
    keys = sorted(stored)
    base = flat(stored, keys)
    rounded = flat({k: v.bfloat16() for k, v in stored.items()}, keys)
    changes = {}
    for dtype in ("float32", "bfloat16"):
        run = root / dtype
        overrides = [*RUN, f"teacher={teacher}", f"dtype={dtype}", f"generator_lr={args.lr}",
                     f"iterations_per_phase={args.updates}", f"fake_lr={args.fake_lr}",
                     f"fake_updates={args.fake_updates}", f"batch_size={args.batch_size}"]  # fmt: skip
        argv = ["--out", str(run), "--no-progress", "--overwrite"]
        for item in overrides:
            argv += ["--set", item]
        if pretrain_distill.main(argv) != 0:
            return 1
        _, _, exported = read_diffusers_dir(run / "export" / "expert_1")
        values = flat(exported, keys)
        changes[dtype] = (values - base, exported[keys[0]].dtype, values)
    reference = changes["float32"][0]
    print(f"\n{args.updates} updates at lr {args.lr:g} (fake: lr {args.fake_lr:g}, "
          f"{args.fake_updates} per update), batch {args.batch_size}; teacher stored in float32 "
          f"({base.numel()} values)")  # fmt: skip
    print("run       export dtype   equal to bf16(teacher)   |change| / fp32's   cosine to fp32's")
    for dtype, (change, stored_dtype, values) in changes.items():
        equal = float((values == rounded).double().mean())
        ratio = float(change.norm() / reference.norm())
        cosine = float(torch.nn.functional.cosine_similarity(change, reference, dim=0))
        print(f"{dtype:<9} {str(stored_dtype):<14} {equal:>20.1%}   {ratio:>17.2f}   {cosine:>16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""torchrun worker: the distillation runner on several algorithms in one process group.

    torchrun --nproc_per_node=2 tests/parallel/distill_worker.py TEACHER OUT LAYOUT NAME...

LAYOUT is config overrides separated by spaces, such as "tensor_parallel=2"; each NAME (tests/distill_helpers.py's
ALGORITHMS) trains into OUT/NAME with the settings of the single-process test runs. Afterwards
every rank checks that the data-parallel replicas hold identical generator weights (their
gradients were averaged) and trained at the same latent shape each iteration. With data parallelism the first NAME also runs again, stopped after
one iteration with a checkpoint and resumed into a fresh runner: it must end bit-identical.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

sys.path.insert(0, str(Path(__file__).parents[1]))
from distill_helpers import ALGORITHMS, QUICK

from phased_dmd_mp.config import load_config
from phased_dmd_mp.distill.config import DistillConfig
from phased_dmd_mp.distill.trainer import Distiller


def main() -> None:
    teacher, out, layout, *names = sys.argv[1:]
    for name in names:
        overrides = [f"teacher={teacher}", *QUICK, *ALGORITHMS[name], *layout.split()]
        distiller = Distiller(
            load_config(DistillConfig, None, overrides), Path(out) / name, progress=False
        )
        distiller.train()
        group = parallel_state.get_data_parallel_group()
        if dist.get_world_size(group) > 1:
            mine = torch.cat(
                [p.detach().flatten() for e in distiller.generator for p in e.parameters()]
            )
            replicas = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
            dist.all_gather(replicas, mine, group=group)
            assert all(torch.equal(replicas[0], r) for r in replicas), f"{name}: replicas differ"
            shapes = [entry["shape"] for entry in distiller.state.history if "shape" in entry]
            every = [None] * dist.get_world_size(group)
            dist.all_gather_object(every, shapes, group=group)
            assert all(s == every[0] for s in every), f"{name}: ranks drew shapes {every}"
            if name == names[0]:
                check_resume(distiller, Path(out) / f"{name}-resumed")


def check_resume(straight: Distiller, run_dir: Path) -> None:
    interrupted = Distiller(straight.config, run_dir, progress=False)
    interrupted._iteration()
    path = interrupted.save_checkpoint()
    resumed = Distiller(straight.config, run_dir, progress=False)
    resumed.load_checkpoint(path)
    resumed.train()
    for ours, theirs in zip(resumed.generator, straight.generator, strict=True):
        same = all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
        assert same, f"rank {dist.get_rank()}: the resumed run differs from the straight one"


if __name__ == "__main__":
    main()

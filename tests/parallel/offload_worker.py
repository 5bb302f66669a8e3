"""torchrun worker: optimizer offload under a tensor- or data-parallel layout changes nothing.

    torchrun --nproc_per_node=2 tests/parallel/offload_worker.py TEACHER OUT NAME KEY=VALUE...

Runs tests/distill_helpers.py's algorithm NAME with the overrides twice: straight without
offload, and stopped after one iteration with a checkpoint, then resumed with
`optimizer_offload` (and, given recompute=true, `activation_offload`) on for the rest. Every rank checks that its generator weights and every
trained role's state (whole fp32 main params, Adam moments, EMA: a collective when sharded) are
bit-identical, and that the resumed run's main params and moments live in host memory.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1]))
from distill_helpers import ALGORITHMS, QUICK

from phased_dmd_mp.config import load_config
from phased_dmd_mp.distill.config import DistillConfig
from phased_dmd_mp.distill.trainer import Distiller
from phased_dmd_mp.parallel.offload import HOST


def states(distiller: Distiller) -> dict:
    return {key: trained.state_dict() for key, trained in distiller.trained.items()}


def main() -> None:
    teacher, out, name, *overrides = sys.argv[1:]
    base = [f"teacher={teacher}", *QUICK, *ALGORITHMS[name], *overrides]

    recompute = "recompute=true" in overrides  # then activation offload switches too

    def config(offload: bool) -> DistillConfig:
        switched = [f"optimizer_offload={offload}", f"activation_offload={offload and recompute}"]
        return load_config(DistillConfig, None, [*base, *switched])

    straight = Distiller(config(False), Path(out) / "straight", progress=False)
    straight.train()
    interrupted = Distiller(config(False), Path(out) / "toggled", progress=False)
    interrupted._iteration()
    path = interrupted.save_checkpoint()
    resumed = Distiller(config(True), Path(out) / "toggled", progress=False)
    resumed.load_checkpoint(path)
    resumed.train()

    rank = dist.get_rank()
    for ours, theirs in zip(resumed.generator, straight.generator, strict=True):
        same = all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
        assert same, f"rank {rank}: generator weights differ"
    ours, theirs = states(resumed), states(straight)
    assert ours.keys() == theirs.keys(), (ours.keys(), theirs.keys())
    for key in ours:
        for part in ("main_params", "exp_avg", "exp_avg_sq", "ema"):
            a, b = ours[key][part], theirs[key][part]
            assert (a is None) == (b is None), (key, part)
            same = a is None or all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
            assert same, f"rank {rank}: {key} {part} differs"
    for trained in resumed.trained.values():
        held = [m[0] for m in trained.main if m is not None]
        held += [trained.host.state(m)[k] for m in held for k in ("exp_avg", "exp_avg_sq")]
        assert held and all(HOST.holds(t) for t in held), f"rank {rank}: state not on the host"
    if rank == 0:
        print(f"{name} {' '.join(overrides)}: bit-identical with offload")


if __name__ == "__main__":
    main()

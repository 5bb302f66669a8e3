"""Measured vs estimated memory of one distillation iteration (python or torchrun worker).

    [torchrun --nproc_per_node=N] tests/parallel/preflight_worker.py TEACHER RUN KEY=VALUE...

Builds the runner with the overrides, runs one iteration (so the phase's fake model,
optimizer states and gradient buffers exist), then measures the peak of the next one
(`phased_dmd_mp.memory.measure.peak_memory`: live tensor bytes on CPU,
torch.cuda.max_memory_allocated on a GPU) and compares it with `preflight`'s estimate of
phase 1 for the same config and world; likewise the peak of the host arena (what offload keeps
in host memory, `parallel.offload.HOST`) against the estimate's host memory per GPU. Rank 0
prints one JSON line {"measured", "estimated", "host_measured", "host_estimated", ...} (bytes,
the largest over ranks and pipeline stages).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from phased_dmd_mp.config import load_config
from phased_dmd_mp.distill.config import DistillConfig
from phased_dmd_mp.distill.trainer import Distiller
from phased_dmd_mp.memory.estimate import estimate
from phased_dmd_mp.memory.measure import peak_memory
from phased_dmd_mp.parallel.offload import HOST
from phased_dmd_mp.preflight import make_plan


def main() -> None:
    teacher, run, *overrides = sys.argv[1:]
    config = load_config(DistillConfig, None, [f"teacher={teacher}", *overrides])
    distiller = Distiller(config, Path(run), progress=False)
    distiller._iteration()
    HOST.reset_peak()
    with peak_memory(distiller.device) as peak:
        distiller._iteration()
    measured = torch.tensor([peak.bytes, HOST.peak], dtype=torch.float64)
    dist.all_reduce(measured, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        args = argparse.Namespace(
            model=None, latent_shape=None, text_tokens=None, moe_boundary=None,
            world_size=dist.get_world_size(), gpus_per_node=8,
        )  # fmt: skip
        plan, _ = make_plan(args, config)
        memory = [m for m in estimate(plan) if m.phase == 1]
        worst = max(memory, key=lambda m: m.total)
        print(json.dumps({"measured": int(measured[0]), "estimated": worst.total,
                          "host_measured": int(measured[1]), "host_estimated": worst.host_total,
                          "parts": worst.parts, "host": worst.host, "notes": worst.notes}))  # fmt: skip


if __name__ == "__main__":
    main()

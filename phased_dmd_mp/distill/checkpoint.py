"""Atomic, resumable checkpoints of a distillation run.

RUN/checkpoints/step-00000100/ holds one file per model-parallel rank (rank-tp{t}-pp{p}.pt,
written by data-parallel rank 0 of that model-parallel rank: data-parallel ranks hold the same
weights) plus the shared RNG-independent bookkeeping. Ranks write into step-N.partial/; after a
barrier global rank 0 renames it to step-N/, so a directory without the suffix is always
complete and an interrupted save leaves only a .partial directory, which is ignored and later
removed. Per-data-parallel-rank state (random generators, condition sampler) goes into
dp{d}-tp{t}-pp{p}.pt so that a resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

_STEP = re.compile(r"^step-(\d{8})$")


def _ranks() -> tuple[int, int, int]:
    return (
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_rank(),
    )


def _model_file(tp: int, pp: int) -> str:
    return f"rank-tp{tp}-pp{pp}.pt"


def _rank_file(dp: int, tp: int, pp: int) -> str:
    return f"dp{dp}-tp{tp}-pp{pp}.pt"


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def complete_steps(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(m[1]) for p in folder.iterdir() if (m := _STEP.match(p.name)))


def save(run_dir: Path, step: int, model_state: dict, rank_state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    folder = run_dir / "checkpoints"
    final = folder / f"step-{step:08d}"
    partial = folder / f"step-{step:08d}.partial"
    dp, tp, pp = _ranks()
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    if dp == 0:
        _atomic_torch_save(model_state, partial / _model_file(tp, pp))
    _atomic_torch_save(rank_state, partial / _rank_file(dp, tp, pp))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in complete_steps(run_dir)[:-keep_last]:
            shutil.rmtree(folder / f"step-{old:08d}", ignore_errors=True)
        for stale in folder.glob("*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def load(path: Path) -> tuple[dict, dict]:
    """This rank's (model_state, rank_state) from the checkpoint directory `path`."""
    dp, tp, pp = _ranks()
    model_file, rank_file = path / _model_file(tp, pp), path / _rank_file(dp, tp, pp)
    if not model_file.is_file() or not rank_file.is_file():
        raise FileNotFoundError(
            f"{path} has no state for this rank (dp {dp}, tp {tp}, pp {pp}): resume with the "
            "parallel layout the run was saved with"
        )
    return (
        torch.load(model_file, map_location="cpu", weights_only=False),
        torch.load(rank_file, map_location="cpu", weights_only=False),
    )

"""Atomic, verified, resumable checkpoints of a distillation run.

RUN/checkpoints/step-00000100/ holds one file per model-parallel rank (rank-tp{t}-pp{p}.pt,
written by data-parallel rank 0 of that model-parallel rank: data-parallel ranks hold the same
weights), one per rank for per-data-parallel-rank state (dp{d}-tp{t}-pp{p}.pt: random
generators and condition sampler, so a resumed run draws exactly what the uninterrupted one
would have), and manifest.json, written last: the sha256 and size of every file, the parallel
layout and the config. Ranks write into step-N.partial/; after a barrier global rank 0 writes
the manifest and renames the directory to step-N/, so a directory without the suffix is
complete. A checkpoint whose files do not match its manifest (truncated, deleted, bit-flipped)
is named and skipped in favour of the newest intact one.

Before a save, rank 0 checks that the file system has room for it (the previous checkpoint's
size, or the state's when there is none); a full disk, found then or as ENOSPC while writing,
raises DiskFullError with the sizes, and the .partial directory is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from phased_dmd_mp import atomic
from phased_dmd_mp.atomic import DiskFullError
from phased_dmd_mp.distill.signals import agree

_STEP = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
_HEADROOM = 1.05  # a checkpoint's size varies a little (optimizer state appears, pickles)
_HASH_CHUNK = 1 << 24


class CheckpointError(RuntimeError):
    """No usable checkpoint to resume from; the message says why."""


def _ranks() -> tuple[int, int, int]:
    return (
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_rank(),
    )


def layout() -> dict[str, int]:
    """The sizes the files depend on (not context parallelism: a CP group shares its files, so a
    run may resume at another context-parallel size)."""
    return {
        "data_parallel": parallel_state.get_data_parallel_world_size(),
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
    }


def _model_file(tp: int, pp: int) -> str:
    return f"rank-tp{tp}-pp{pp}.pt"


def _rank_file(dp: int, tp: int, pp: int) -> str:
    return f"dp{dp}-tp{tp}-pp{pp}.pt"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def _write(obj, path: Path) -> dict:
    """torch.save into `path` through the guarded path (atomic.py); {'sha256', 'bytes'}."""
    return atomic.torch_save(obj, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def complete_steps(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(m[1]) for p in folder.iterdir() if (m := _STEP.match(p.name)))


def _directory_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _check_free_space(run_dir: Path, step: int, needed: int) -> None:
    folder = run_dir / "checkpoints"
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskFullError(
            f"disk full: checkpoint step-{step:08d} needs ~{needed / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB free in {folder}; free space (or lower keep_last) and "
            "--resume from the last checkpoint",
        )


def save(
    run_dir: Path, step: int, model_state: dict, rank_state: dict, keep_last: int, config: dict
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory.

    Raises DiskFullError on every rank when the file system has no room (before or while
    writing; the .partial directory is then removed)."""
    folder = run_dir / "checkpoints"
    final = step_dir(run_dir, step)
    partial = folder / f"step-{step:08d}.partial"
    dp, tp, pp = _ranks()
    writes = {_rank_file(dp, tp, pp): rank_state}
    if dp == 0:
        writes[_model_file(tp, pp)] = model_state
    if parallel_state.get_context_parallel_rank() > 0:  # the same files as its CP rank 0's
        writes = {}
    # Room for the new checkpoint next to the old ones (they are removed only after it).
    needed = torch.tensor([sum(_tensor_bytes(obj) for obj in writes.values())], dtype=torch.float64)
    if dist.get_world_size() > 1:
        needed = needed.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(needed)
    error = None
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.partial"):  # the lock guarantees they are no live run's
            shutil.rmtree(stale, ignore_errors=True)
        steps = complete_steps(run_dir)
        estimate = _directory_bytes(step_dir(run_dir, steps[-1])) if steps else needed.item()
        try:
            _check_free_space(run_dir, step, int(estimate * _HEADROOM))
            partial.mkdir()
        except DiskFullError as caught:
            error = caught
    if agree(error is not None):
        raise error or DiskFullError("disk full: another rank ran out of space")
    digests, error = {}, None
    try:
        for name, obj in writes.items():
            digests[name] = _write(obj, partial / name)
    except DiskFullError as caught:
        error = caught
    _raise_if_any_rank_full(error, run_dir, step, partial)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digests)
    error = None
    if dist.get_rank() == 0:
        manifest = {
            "step": step,
            "layout": layout(),
            "config": config,
            "files": {name: d for rank_digests in gathered for name, d in rank_digests.items()},
        }
        try:
            atomic.write_json(partial / MANIFEST, manifest, indent=1)
        except DiskFullError as caught:
            error = caught
    _raise_if_any_rank_full(error, run_dir, step, partial)
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in complete_steps(run_dir)[:-keep_last]:
            shutil.rmtree(step_dir(run_dir, old), ignore_errors=True)
    dist.barrier()
    return final


def _raise_if_any_rank_full(error, run_dir: Path, step: int, partial: Path) -> None:
    """Collective: if a rank's write failed for a full disk, remove the .partial and raise
    DiskFullError on every rank."""
    if not agree(error is not None):
        return
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    folder = run_dir / "checkpoints"
    raise DiskFullError(
        f"disk full while writing checkpoint step-{step:08d} into {folder} "
        f"({atomic.free_mib(folder):.1f} MiB free); removed its .partial; free space (or lower "
        "keep_last) and --resume from the last checkpoint",
    )


def read_manifest(path: Path) -> dict | None:
    """The checkpoint's manifest, or None when it has none (or it is unreadable)."""
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _file_problems(path: Path, name: str, expected: dict | None) -> list[str]:
    file = path / name
    if expected is None or not file.is_file():
        return [f"{name} missing"]
    if file.stat().st_size != expected["bytes"]:
        return [f"{name} has {file.stat().st_size} bytes, not {expected['bytes']}"]
    if _sha256(file) != expected["sha256"]:
        return [f"{name} does not match its sha256"]
    return []


def _problems(path: Path, manifest: dict | None) -> list[str]:
    """What is wrong with the checkpoint (empty: intact), as far as this rank checks: its own
    two files, or, for a checkpoint of another layout, its share of all the manifest's files."""
    if manifest is None:
        return [f"{MANIFEST} missing or unreadable"]
    if manifest.get("layout", layout()) == layout():
        dp, tp, pp = _ranks()
        names = [_model_file(tp, pp), _rank_file(dp, tp, pp)]
    else:
        names = sorted(manifest["files"])[dist.get_rank() :: dist.get_world_size()]
    files = manifest["files"]
    return [problem for name in names for problem in _file_problems(path, name, files.get(name))]


def _layout_error(path: Path, saved: dict, intact: bool) -> CheckpointError | None:
    """Why a checkpoint saved with layout `saved` cannot continue in this job (None: it can)."""
    ours = layout()
    if saved == ours:
        return None
    state = "is intact but " if intact else ""
    if (saved["tensor_parallel"], saved["pipeline_parallel"]) != (
        ours["tensor_parallel"],
        ours["pipeline_parallel"],
    ):
        return CheckpointError(
            f"{path.name} {state}was saved with tensor_parallel {saved['tensor_parallel']} x "
            f"pipeline_parallel {saved['pipeline_parallel']}, this job has "
            f"{ours['tensor_parallel']} x {ours['pipeline_parallel']}: resume with the same "
            "model-parallel layout"
        )
    return CheckpointError(
        f"{path.name} {state}was saved with data_parallel {saved['data_parallel']}, this job has "
        f"data_parallel {ours['data_parallel']}: each data-parallel rank's random streams and "
        "condition sampler are part of the state, so the run cannot continue exactly at "
        f"another size; resume on {saved['data_parallel']} x {ours['tensor_parallel']} x "
        f"{ours['pipeline_parallel']} ranks"
    )


def check_layout(path: Path) -> None:
    """Raise CheckpointError unless the checkpoint was saved with this job's layout."""
    saved = (read_manifest(path) or {}).get("layout")
    if saved is not None and (error := _layout_error(path, saved, intact=False)) is not None:
        raise error


def latest_intact(run_dir: Path, report=print) -> Path:
    """Collective: the newest checkpoint every rank finds intact; damaged ones are reported
    (with what is wrong) and skipped. Raises CheckpointError when none is, or when the newest
    intact one was saved with another parallel layout (saying so: it is not damaged)."""
    for step in reversed(complete_steps(run_dir)):
        path = step_dir(run_dir, step)
        manifest = read_manifest(path)
        problems = _problems(path, manifest)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, problems)
        found = sorted({p for rank_problems in gathered for p in rank_problems})
        if not found:
            saved = manifest.get("layout")
            if saved is not None and (error := _layout_error(path, saved, intact=True)):
                raise error
            return path
        if dist.get_rank() == 0:
            report(f"checkpoint {path} is damaged ({'; '.join(found)}): skipping it")
    raise CheckpointError(f"{run_dir / 'checkpoints'} holds no intact checkpoint to resume from")


def load(path: Path) -> tuple[dict, dict]:
    """This rank's (model_state, rank_state) from the checkpoint directory `path`."""
    dp, tp, pp = _ranks()
    model_file, rank_file = path / _model_file(tp, pp), path / _rank_file(dp, tp, pp)
    if not model_file.is_file() or not rank_file.is_file():
        raise CheckpointError(
            f"{path} has no state for this rank (dp {dp}, tp {tp}, pp {pp}): resume with the "
            "parallel layout the run was saved with"
        )
    return (
        torch.load(model_file, map_location="cpu", weights_only=False),
        torch.load(rank_file, map_location="cpu", weights_only=False),
    )

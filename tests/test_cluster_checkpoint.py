"""Checkpoint integrity and failure modes a cluster run meets: a damaged latest checkpoint
(truncated, deleted file, bit flip) is named and skipped for the newest intact one and the run
still ends exactly where an uninterrupted one does; a full disk says so and leaves no .partial;
a diverged run stops non-zero with a checkpoint and never exports an untrained generator."""

import errno
import io
import json
import time
from collections import namedtuple

import pytest
import torch
from cli_helpers import run_cli
from distill_helpers import ALGORITHMS, distill_args

from phased_dmd_mp import atomic, pretrain_distill
from phased_dmd_mp.distill import checkpoint
from phased_dmd_mp.models.convert import read_diffusers_dir

SGTS = [*ALGORITHMS["phased_dmd_sgts"], "checkpoint_every=1", "keep_last=4"]


def cli(capsys, out, teacher, *overrides, extra=()):
    return run_cli(pretrain_distill.main, [*distill_args(out, teacher, *overrides), *extra], capsys)


def assert_same_export(run, reference):
    for name in ("expert_1", "expert_2"):
        _, _, ours = read_diffusers_dir(run / "export" / name)
        _, _, theirs = read_diffusers_dir(reference / "export" / name)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def flip_a_weight_bit(path):
    """Flip one bit inside the largest tensor's storage (not the zip headers)."""
    data = bytearray(path.read_bytes())
    state = torch.load(path, weights_only=False)
    tensor = state["generator"][0][0]
    probe = tensor.flatten()[: len(tensor.flatten()) // 2 + 1].numpy().tobytes()[-8:]
    at = bytes(data).find(probe)
    assert at > 0
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=False)["generator"][0][0], tensor)


@pytest.mark.parametrize("damage", ["truncate", "delete", "bit_flip"])
def test_damaged_latest_checkpoint_is_skipped_and_resume_is_exact(
    tmp_path, teacher, single_process_runs, capsys, damage
):
    assert cli(capsys, tmp_path, teacher, *SGTS)[0] == 0
    latest = checkpoint.step_dir(tmp_path, 4)
    model_file = latest / "rank-tp0-pp0.pt"
    if damage == "truncate":
        model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    elif damage == "delete":
        model_file.unlink()
    else:
        flip_a_weight_bit(model_file)
    start = time.perf_counter()
    code, err = cli(capsys, tmp_path, teacher, *SGTS, extra=["--resume"])
    assert code == 0, err
    reason = {"truncate": "bytes, not", "delete": "missing", "bit_flip": "sha256"}[damage]
    assert f"checkpoint {latest} is damaged (rank-tp0-pp0.pt" in err and reason in err
    assert "Traceback" not in err
    # Resumed from step 3: one iteration lost, and the end is the uninterrupted run's.
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["iteration"] for h in history] == [1, 2, 3, 4]
    assert_same_export(tmp_path, single_process_runs["phased_dmd_sgts"])
    print(f"{damage}: detected and resumed in {time.perf_counter() - start:.2f} s, 1 step lost")


def test_no_intact_checkpoint_is_a_one_line_error(tmp_path, teacher, capsys):
    assert cli(capsys, tmp_path, teacher, *ALGORITHMS["dmd"], "checkpoint_every=1")[0] == 0
    for step in checkpoint.complete_steps(tmp_path):
        (checkpoint.step_dir(tmp_path, step) / "dp0-tp0-pp0.pt").write_bytes(b"")
    code, err = cli(capsys, tmp_path, teacher, *ALGORITHMS["dmd"], extra=["--resume"])
    assert code == 2 and "holds no intact checkpoint" in err and "Traceback" not in err


class _FullAfter(io.FileIO):
    """A file on a disk that fills up after `room` bytes."""

    room = 4096

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_disk_full_while_saving_says_so_and_removes_the_partial(
    tmp_path, teacher, single_process_runs, capsys, monkeypatch
):
    original = checkpoint._write

    def fill_at_step_3(obj, path):
        if path.parent.name.startswith("step-00000003"):
            monkeypatch.setattr(atomic, "_open_for_write", lambda p: _FullAfter(p, "wb"))
        return original(obj, path)

    monkeypatch.setattr(checkpoint, "_write", fill_at_step_3)
    code, err = cli(capsys, tmp_path, teacher, *SGTS)
    assert code == 1 and "disk full while writing checkpoint step-00000003" in err, err
    assert "unexpected pos" not in err and "Traceback" not in err
    assert not list((tmp_path / "checkpoints").glob("*.partial"))
    assert checkpoint.complete_steps(tmp_path) == [1, 2]
    monkeypatch.undo()
    code, err = cli(capsys, tmp_path, teacher, *SGTS, extra=["--resume"])
    assert code == 0, err
    assert_same_export(tmp_path, single_process_runs["phased_dmd_sgts"])


def test_no_room_for_the_next_checkpoint_is_found_before_writing(
    tmp_path, teacher, capsys, monkeypatch
):
    usage = namedtuple("usage", "total used free")
    real = checkpoint.shutil.disk_usage
    sizes = []

    def nearly_full(path):
        steps = checkpoint.complete_steps(tmp_path)
        if steps:  # room for less than one more checkpoint
            size = checkpoint._directory_bytes(checkpoint.step_dir(tmp_path, steps[-1]))
            sizes.append(size)
            return usage(10 * size, 9 * size, size // 2)
        return real(path)

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", nearly_full)
    code, err = cli(capsys, tmp_path, teacher, *SGTS)
    assert code == 1 and "disk full: checkpoint step-00000002 needs ~" in err, err
    assert "MiB free in" in err and checkpoint.complete_steps(tmp_path) == [1]
    assert not list((tmp_path / "checkpoints").glob("*.partial"))


def test_diverged_run_stops_with_a_checkpoint_and_does_not_export(tmp_path, teacher, capsys):
    diverging = [*ALGORITHMS["phased_dmd_sgts"], "generator_lr=1e4", "checkpoint_every=100"]
    code, err = cli(
        capsys, tmp_path / "guard", teacher, *diverging,
        "iterations_per_phase=10", "max_consecutive_skips=3",
    )  # fmt: skip
    assert code == 1 and "the run diverged: 3 consecutive" in err and "Traceback" not in err
    # what the user can do, truthfully: resume as is, or lower the rates in a new run
    assert "--resume continues from it" in err and "--resume refuses changed keys" in err
    assert checkpoint.complete_steps(tmp_path / "guard") == [4]  # stopped at 4 of 20
    assert not (tmp_path / "guard" / "export").exists()
    # ... and both are so: the same config resumes (max_consecutive_skips may change; the count
    # of skips in a row goes on) from iteration 4; a lower learning rate is refused by --resume
    code, err = cli(capsys, tmp_path / "guard", teacher, *diverging, "iterations_per_phase=10",
                    "max_consecutive_skips=6", extra=["--resume"])  # fmt: skip
    assert code == 1 and "the run diverged: 6 consecutive" in err
    assert checkpoint.complete_steps(tmp_path / "guard")[-1] > 4
    lower = [*ALGORITHMS["phased_dmd_sgts"], "generator_lr=1e-4", "checkpoint_every=100"]
    code, err = cli(capsys, tmp_path / "guard", teacher, *lower, "iterations_per_phase=10",
                    extra=["--resume"])  # fmt: skip
    assert code == 2 and "generator_lr" in err
    # Too short for the guard: every update of expert 2 skipped still refuses to export it.
    code, err = cli(capsys, tmp_path / "short", teacher, *diverging)
    assert code == 1 and "not exporting an untrained generator" in err
    assert not (tmp_path / "short" / "export").exists()


def os_error_28(*args, **kwargs):
    """safetensors' own words for a full disk (its Rust writer's io::Error)."""
    from safetensors import SafetensorError

    raise SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )


@pytest.mark.parametrize("full_at", ["expert_1.sharded", "expert_2_lora"])
def test_disk_full_during_the_export_is_one_line_and_leaves_no_partial_export(
    tmp_path, teacher, single_process_runs, capsys, monkeypatch, full_at
):
    """The export's writes (expert shards, LoRA files, generator.json) go through the guarded
    path: a full disk is one line naming the export, exit 1, and nothing half-written is left
    (was: a 31-line SafetensorError traceback and export/expert_1.sharded behind)."""
    lora = full_at.endswith("_lora")
    overrides = [*(ALGORITHMS["phased_dmd_lora"] if lora else SGTS), "checkpoint_every=100"]
    real = atomic._save_file

    def full_disk(tensors, path, metadata):
        if full_at in str(path):
            os_error_28()
        return real(tensors, path, metadata)

    monkeypatch.setattr(atomic, "_save_file", full_disk)
    code, err = cli(capsys, tmp_path, teacher, *overrides)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1, err
    assert f"disk full writing the export {tmp_path / 'export'}" in lines[0]
    assert "Traceback" not in err and "SafetensorError" not in err
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export*"))
    assert not list(tmp_path.rglob("*.partial*")) and not list(tmp_path.rglob("*.sharded"))
    monkeypatch.undo()
    code, err = cli(capsys, tmp_path, teacher, *overrides, extra=["--resume"])
    assert code == 0 and (tmp_path / "export" / "generator.json").is_file(), err
    if not lora:
        assert_same_export(tmp_path, single_process_runs["phased_dmd_sgts"])


def test_resume_at_a_larger_data_parallel_size_names_both_sizes_and_no_damage(
    tmp_path, teacher, single_process_runs
):
    """A run saved on one process resumed on two (DP 1 -> 2): every checkpoint is intact and
    said to be; the sizes are named (was: each 'damaged (dp1-tp0-pp0.pt missing)', then 'no
    intact checkpoint', which may make a user delete good checkpoints)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    run = shutil.copytree(single_process_runs["phased_dmd_sgts"], tmp_path / "run")
    saved = checkpoint.complete_steps(run)
    root = Path(__file__).parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "phased_dmd_mp.pretrain_distill",
        *distill_args(run, teacher, *ALGORITHMS["phased_dmd_sgts"]), "--resume",
    ]  # fmt: skip
    job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    output = job.stdout + job.stderr
    assert job.returncode != 0
    name = checkpoint.step_dir(run, saved[-1]).name
    assert (
        f"--resume: {name} is intact but was saved with data_parallel 1, this job has "
        "data_parallel 2" in output
    ), output[-3000:]
    assert "resume on 1 x 1 x 1 ranks" in output
    assert "damaged" not in output and "no intact checkpoint" not in output
    assert checkpoint.complete_steps(run) == saved

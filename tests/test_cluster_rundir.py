"""The run directory on a cluster: one run at a time (lock), --overwrite deletes only a run,
and a resume names every config key that differs from the run's (config.yaml and the
checkpoint's own)."""

import os
import shutil

import yaml
from cli_helpers import run_cli
from distill_helpers import ALGORITHMS, distill_args

from phased_dmd_mp import pretrain_distill
from phased_dmd_mp.distill import rundir

DMD = ALGORITHMS["dmd"]


def cli(capsys, out, teacher, *overrides, extra=()):
    return run_cli(pretrain_distill.main, [*distill_args(out, teacher, *overrides), *extra], capsys)


def test_second_run_on_a_locked_directory_is_refused_naming_the_holder(tmp_path, teacher, capsys):
    holder = rundir.RunLock(tmp_path / "run")  # another run (flock: per open file, not process)
    try:
        code, err = cli(capsys, tmp_path / "run", teacher, *DMD)
        assert code == 2
        assert f"in use by another run (pid {os.getpid()} on" in err and "Traceback" not in err
        assert not (tmp_path / "run" / "checkpoints").exists()
    finally:
        holder.release()
    code, _ = cli(capsys, tmp_path / "run", teacher, *DMD)  # released: the run starts
    assert code == 0 and (tmp_path / "run" / "export" / "generator.json").is_file()
    # The finished run released its lock, and a crashed one cannot keep it (the kernel drops
    # a flock with its process): the directory is free again.
    rundir.RunLock(tmp_path / "run").release()


def test_overwrite_deletes_only_a_run_and_says_what(tmp_path, teacher, capsys):
    teacher_copy = shutil.copytree(teacher, tmp_path / "teacher")
    before = sorted(p.name for p in teacher_copy.rglob("*"))
    code, err = cli(capsys, teacher_copy, teacher, *DMD, extra=["--overwrite"])
    assert code == 2 and "not a run's (conditions, real_data, teacher.yaml, transformer)" in err
    assert sorted(p.name for p in teacher_copy.rglob("*") if p.name != ".lock") == before

    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    code, err = cli(capsys, a_file, teacher, *DMD, extra=["--overwrite"])
    assert code == 2 and "is a file" in err and a_file.read_text() == "keep me"

    run = tmp_path / "run"
    assert cli(capsys, run, teacher, *DMD)[0] == 0
    (run / "nested_run").mkdir()  # another run (or anything) inside it: not ours to delete
    code, err = cli(capsys, run, teacher, *DMD, extra=["--overwrite"])
    assert code == 2 and "nested_run" in err and (run / "checkpoints").is_dir()
    (run / "nested_run").rmdir()

    code, err = cli(capsys, run, teacher, *DMD, "seed=1", extra=["--overwrite"])
    assert code == 0, err
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["seed"] == 1 and (run / rundir.MARKER_FILE).is_file()


def test_overwrite_lists_what_it_removes(tmp_path, teacher, capsys):
    run = tmp_path / "run"
    assert cli(capsys, run, teacher, *DMD)[0] == 0
    capsys.readouterr()
    assert pretrain_distill.main([*distill_args(run, teacher, *DMD), "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "--overwrite: removed .phased_dmd_run, checkpoints, config.yaml, export" in out


def test_new_run_into_a_foreign_directory_is_refused(tmp_path, teacher, capsys):
    (tmp_path / "data.bin").write_bytes(b"\0")
    code, err = cli(capsys, tmp_path, teacher, *DMD)
    assert code == 2 and "not a run's (data.bin)" in err


def test_resume_names_each_differing_key_and_checks_the_checkpoints_config(
    tmp_path, teacher, capsys
):
    run = tmp_path / "run"
    assert cli(capsys, run, teacher, *DMD)[0] == 0
    code, err = cli(capsys, run, teacher, *DMD, "seed=3", "fake_lr=0.001", extra=["--resume"])
    assert code == 2
    assert "fake_lr: 0.0001 -> 0.001; seed: 0 -> 3" in err and "config.yaml" in err
    # Another run rewrote config.yaml (the old failure: a run's config.yaml paired with the
    # other's checkpoint); the config stored in the checkpoint still tells them apart.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "seed": 3}))
    code, err = cli(capsys, run, teacher, *DMD, "seed=3", extra=["--resume"])
    assert code == 2 and "checkpoint step-00000002: seed: 0 -> 3" in err
    # Run mechanics may change on resume (e.g. a longer collective timeout after a hang).
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    code, err = cli(
        capsys, run, teacher, *DMD, "collective_timeout=1200", "log_every=2", extra=["--resume"]
    )
    assert code == 0, err

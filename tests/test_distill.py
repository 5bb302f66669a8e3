"""The distillation runner on a tiny random teacher: every algorithm runs and exports, phases
behave as the paper prescribes, resume is exact, a bad update is skipped, user mistakes are
clean errors."""

import json

import pytest
import torch
import yaml
from distill_helpers import ALGORITHMS, QUICK, crash_at_iteration_3, run_distill

from phased_dmd_mp.conditioning import Conditions, dit_velocity
from phased_dmd_mp.distill.trainer import Distiller
from phased_dmd_mp.models import build
from phased_dmd_mp.models.convert import diffusers_to_ours, read_diffusers_dir


def run(out, teacher, *overrides, extra=()):
    return run_distill(out, teacher, *overrides, extra=extra)


def load_export(folder):
    _, arch, state = read_diffusers_dir(folder)
    model = build(arch, init_weights=False)
    model.load_state_dict(diffusers_to_ours(state, arch), strict=False)
    return model, arch


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_trains_and_exports(single_process_runs, teacher, name):
    run_dir = single_process_runs[name]
    history = json.loads((run_dir / "history.json").read_text())
    assert all(torch.isfinite(torch.tensor(h["generator_loss"])) for h in history)
    summary = json.loads((run_dir / "export" / "generator.json").read_text())
    assert len(summary["expert_of_step"]) == len(summary["timesteps"]) - 1
    # The exported experts are what was trained: they differ from the teacher.
    _, _, teacher_state = read_diffusers_dir(teacher / "transformer")
    _, _, expert_state = read_diffusers_dir(run_dir / "export" / summary["experts"][-1])
    assert any(not torch.equal(teacher_state[k], expert_state[k]) for k in teacher_state)


def test_export_names_the_teacher_by_absolute_path(tmp_path, teacher, monkeypatch):
    """A run started with a relative teacher path can be sampled from any directory."""
    monkeypatch.chdir(teacher.parent)
    dmd = ["algorithm=dmd", "num_steps=1", "num_phases=1"]
    assert run_distill(tmp_path / "run", teacher.name, *dmd) == 0
    summary = json.loads((tmp_path / "run" / "export" / "generator.json").read_text())
    assert summary["teacher"] == str(teacher.resolve())
    assert summary["conditions"] == str((teacher / "conditions").resolve())


def test_phases_freeze_earlier_experts_and_restart_the_fake(tmp_path, teacher):
    config_args = ["num_steps=4", "num_phases=2", "checkpoint_every=1", "keep_last=10"]
    assert run(tmp_path, teacher, *config_args) == 0
    after_phase_1 = torch.load(
        tmp_path / "checkpoints" / "step-00000002" / "rank-tp0-pp0.pt", weights_only=False
    )
    final = torch.load(
        tmp_path / "checkpoints" / "step-00000004" / "rank-tp0-pp0.pt", weights_only=False
    )
    expert_1_then, expert_1_now = after_phase_1["generator"][0], final["generator"][0]
    assert all(torch.equal(a, b) for a, b in zip(expert_1_then, expert_1_now, strict=True))
    assert set(after_phase_1["fakes"]) == {1} and set(final["fakes"]) == {2}
    # A phase's fake starts from the teacher, not from the previous phase's fake.
    model, _ = load_export(teacher / "transformer")
    teacher_weights = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    from phased_dmd_mp.distill.config import DistillConfig

    distiller = Distiller(DistillConfig(teacher=str(teacher), **_kv(QUICK)), tmp_path / "fresh")
    fake_2 = distiller._fake(2).module.state_dict()
    assert all(torch.equal(fake_2[k], teacher_weights[k]) for k in teacher_weights)


def _kv(items):
    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in items)}


def test_resume_continues_exactly(tmp_path, teacher, monkeypatch, capsys):
    args = ["num_steps=4", "num_phases=2", "checkpoint_every=1", "ema_decay=0.9"]
    assert run(tmp_path / "straight", teacher, *args) == 0

    crash_at_iteration_3(monkeypatch, tmp_path / "resumed", teacher, *args)
    capsys.readouterr()
    assert run(tmp_path / "resumed", teacher, *args, extra=["--resume"]) == 0
    # which checkpoint it continued from (was: no word, only a bar starting at 3)
    resumed = tmp_path / "resumed" / "checkpoints" / "step-00000003"
    assert f"--resume: continuing from {resumed} (generator update 3 of " in capsys.readouterr().out
    for name in ("expert_1", "expert_2"):
        _, _, a = read_diffusers_dir(tmp_path / "straight" / "export" / name)
        _, _, b = read_diffusers_dir(tmp_path / "resumed" / "export" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_finished_run_trains_and_exports_nothing(tmp_path, teacher, capsys):
    dmd = ["algorithm=dmd", "num_steps=1", "num_phases=1"]
    assert run(tmp_path, teacher, *dmd) == 0
    exported = (tmp_path / "export" / "generator.json").stat().st_mtime_ns
    history = (tmp_path / "history.json").read_text()
    capsys.readouterr()
    assert run(tmp_path, teacher, *dmd, extra=["--resume"]) == 0
    assert "nothing left to train" in capsys.readouterr().out
    assert (tmp_path / "export" / "generator.json").stat().st_mtime_ns == exported
    assert (tmp_path / "history.json").read_text() == history


def test_non_finite_generator_update_is_skipped(tmp_path, teacher, monkeypatch):
    original = Distiller._dmd_loss
    calls = []

    def poisoned(self, *args):
        calls.append(1)
        loss = original(self, *args)
        return loss * float("nan") if len(calls) == 1 else loss

    monkeypatch.setattr(Distiller, "_dmd_loss", poisoned)
    assert run(tmp_path, teacher, "num_steps=1", "num_phases=1", "algorithm=dmd") == 0
    history = json.loads((tmp_path / "history.json").read_text())
    assert history[0]["generator_skipped"] == 1 and history[-1]["generator_skipped"] == 1
    assert history[-1]["fake_skipped"] == 0
    state = torch.load(
        tmp_path / "checkpoints" / "step-00000002" / "rank-tp0-pp0.pt", weights_only=False
    )
    assert all(torch.isfinite(v).all() for v in state["generator"][0])


def test_history_records_each_measurement_under_its_own_iteration(tmp_path, teacher):
    # Logged at 2 and 4, sampled at 3 and 4: the diversity measured at 3 belongs to 3, not 2.
    overrides = ["algorithm=dmd", "num_steps=1", "num_phases=1", "iterations_per_phase=4"]
    assert run(tmp_path, teacher, *overrides, "log_every=2", "sample_every=3") == 0
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["iteration"] for h in history] == [2, 3, 4]
    assert "pairwise_distance" not in history[0] and "generator_loss" in history[0]
    assert set(history[1]) == {"iteration", "pairwise_distance"}
    assert "pairwise_distance" in history[2] and "generator_loss" in history[2]


def test_user_mistakes_are_clean_errors(tmp_path, teacher, capsys):
    with pytest.raises(SystemExit) as info:
        run(tmp_path / "a", tmp_path / "no-teacher")
    err = capsys.readouterr().err
    assert info.value.code == 2 and "does not exist" in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):  # docs' pure bf16 without distributed_optimizer: false
        run(tmp_path / "a", teacher, "dtype=bfloat16", "main_params_dtype=bfloat16")
    err = capsys.readouterr().err
    assert "set distributed_optimizer false" in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        run(tmp_path / "a", teacher, "num_steps=4", "num_phases=3")
    assert "evenly" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(tmp_path / "a", teacher, "algorithm=dmd")
    assert "num_steps must be 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # found only once the job runs: one process, TP 2
        run(tmp_path / "a", teacher, "tensor_parallel=2")
    err = capsys.readouterr().err
    assert "not divisible by tensor_parallel" in err and "Traceback" not in err
    assert run(tmp_path / "b", teacher, "algorithm=dmd", "num_steps=1", "num_phases=1") == 0
    with pytest.raises(SystemExit):
        run(tmp_path / "b", teacher, "algorithm=dmd", "num_steps=1", "num_phases=1")
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(
            tmp_path / "b",
            teacher,
            "algorithm=dmd",
            "num_steps=1",
            "num_phases=1",
            "seed=3",
            extra=["--resume"],
        )
    assert "config differs" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["phased_dmd_sgts", "phased_dmd_lora"])
def test_exported_experts_reproduce_the_trained_velocity(
    tmp_path, teacher, single_process_runs, name
):
    """The export (merged, EMA weights where kept) gives the velocity of the checkpointed expert
    restored into a fresh run; a LoRA export applied to the teacher gives it too."""
    from phased_dmd_mp.distill.config import DistillConfig
    from phased_dmd_mp.models.lora import add_lora, load_lora, set_active_adapter

    run_dir = single_process_runs[name]
    config = DistillConfig(teacher=str(teacher), **_kv([*QUICK, *ALGORITHMS[name]]))
    distiller = Distiller(config, tmp_path / "restored")
    distiller.load_checkpoint(run_dir / "checkpoints" / "step-00000004")
    x, t = torch.randn(3, 1, 1, 8, 8), torch.tensor([0.3, 0.6, 0.9])
    for k, expert in enumerate(distiller.generator, start=1):
        exported, arch = load_export(run_dir / "export" / f"expert_{k}")
        cond = Conditions(text=torch.randn(3, 1, arch.text_dim))
        with distiller.exported_parameters(k):
            trained = expert.predict(x, t, cond)
        torch.testing.assert_close(dit_velocity(exported, arch)(x, t, cond), trained)
        if config.generator_adapter == "lora":
            base, _ = load_export(teacher / "transformer")
            add_lora(base, config.lora_rank, config.lora_alpha, num_adapters=1)
            load_lora(base, 0, run_dir / "export" / f"expert_{k}_lora")
            set_active_adapter(base, 0)
            torch.testing.assert_close(dit_velocity(base, arch)(x, t, cond), trained)


def test_teacher_from_our_sharded_checkpoint(tmp_path, teacher, single_process_runs):
    """A teacher converted to our sharded format (each rank reads its shard) trains the same
    generator as the diffusers-format one."""
    import shutil

    from phased_dmd_mp.models import convert

    sharded = tmp_path / "teacher"
    shutil.copytree(teacher, sharded, ignore=shutil.ignore_patterns("transformer"))
    convert.to_ours(teacher / "transformer", sharded / "transformer", 1, 1)
    assert run(tmp_path / "run", sharded, *ALGORITHMS["dmd"]) == 0
    _, _, ours = read_diffusers_dir(tmp_path / "run" / "export" / "expert_1")
    _, _, reference = read_diffusers_dir(single_process_runs["dmd"] / "export" / "expert_1")
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_preemption_signal_checkpoints_and_resume_finishes_the_same(
    tmp_path, teacher, single_process_runs, monkeypatch
):
    import os
    import signal

    original = Distiller._iteration

    def preempted(self):
        metrics = original(self)
        if self.state.iteration == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # as SLURM's --signal=USR1 would
        return metrics

    monkeypatch.setattr(Distiller, "_iteration", preempted)
    assert run(tmp_path, teacher, *ALGORITHMS["phased_dmd_sgts"]) == 0
    assert (tmp_path / "checkpoints" / "step-00000001").is_dir()
    assert not (tmp_path / "export").exists()
    monkeypatch.setattr(Distiller, "_iteration", original)
    assert run(tmp_path, teacher, *ALGORITHMS["phased_dmd_sgts"], extra=["--resume"]) == 0
    reference = single_process_runs["phased_dmd_sgts"] / "export"
    for name in ("expert_1", "expert_2"):
        _, _, ours = read_diffusers_dir(tmp_path / "export" / name)
        _, _, theirs = read_diffusers_dir(reference / name)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_sample_cli_runs_the_exported_moe_generator(tmp_path, teacher, single_process_runs):
    """`sample --checkpoint RUN` integrates the exported experts, each on its own steps, to the
    samples the trained generator gives; it writes the evaluation's format."""
    import numpy as np

    from phased_dmd_mp import sample as sample_cli
    from phased_dmd_mp.distill.config import DistillConfig
    from phased_dmd_mp.sampling import sample

    name = "phased_dmd_sgts"
    run_dir = single_process_runs[name]
    config = DistillConfig(teacher=str(teacher), **_kv([*QUICK, *ALGORITHMS[name]]))
    distiller = Distiller(config, tmp_path / "restored")
    distiller.load_checkpoint(run_dir / "checkpoints" / "step-00000004")
    noise = torch.randn(6, 1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = distiller.conditions.batch(torch.tensor([0, 1, 2, 3, 4, 5]))
    source = sample_cli.generator_source(run_dir)
    assert source.timesteps.tolist() == distiller.timesteps
    ours = sample(lambda x, t: source.velocity(x, t, cond), noise, source.timesteps)
    torch.testing.assert_close(ours, distiller.sample(noise, cond))

    assert sample_cli.main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "s")]) == 0
    with np.load(tmp_path / "s" / "samples.npz") as file:
        assert file["samples"].shape == (len(distiller.conditions), 8, 1, 8, 8)
    assert (tmp_path / "s" / "grid.png").is_file()
    with pytest.raises(SystemExit):
        sample_cli.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "t")])
    with pytest.raises(SystemExit):
        sample_cli.main(
            ["--checkpoint", str(run_dir), "--out", str(tmp_path / "t"), "--steps", "8"]
        )


def test_the_final_line_counts_generator_and_fake_skips_apart(
    tmp_path, teacher, monkeypatch, capsys
):
    """One skipped fake update is not a skipped generator update (was: 'N generator updates
    (1 skipped)')."""
    from phased_dmd_mp.distill import trainer

    original, calls = trainer.flow_matching_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) == 1 else loss

    monkeypatch.setattr(trainer, "flow_matching_loss", poisoned)
    assert run(tmp_path, teacher, "num_steps=1", "num_phases=1", "algorithm=dmd") == 0
    out = capsys.readouterr()
    assert "done: 2 generator updates (0 skipped), 2 fake updates (1 skipped)" in out.out
    assert "fake update skipped: non-finite gradient (norm nan), 1 so far; the batch's " in out.out
    history = json.loads((tmp_path / "history.json").read_text())
    assert history[-1]["fake_skipped"] == 1 and history[-1]["generator_skipped"] == 0


def test_a_skip_names_the_nonfinite_condition(tmp_path, teacher, capsys):
    """A condition set damaged after it was written (its manifest still says finite, so
    validation does not read it): the skip message names the condition."""
    import shutil

    from safetensors.torch import load_file, save_file

    conditions = shutil.copytree(teacher / "conditions", tmp_path / "conditions")
    shard = sorted(conditions.glob("items-*.safetensors"))[0]  # holds condition 3
    tensors = load_file(shard)
    tensors["text"][3, 0, 0] = float("nan")
    save_file(tensors, shard)
    overrides = ["num_steps=1", "num_phases=1", "algorithm=dmd", "max_consecutive_skips=100"]
    code = run(tmp_path / "run", teacher, *overrides, f"conditions={conditions}")
    out = capsys.readouterr().out
    assert code == 1  # both generator updates drew condition 3: nothing to export
    assert (
        "generator update skipped: non-finite gradient (norm nan), 1 so far; condition 3: "
        "NaN/Inf in text" in out
    )


def test_several_latent_shapes_drawn_per_iteration_previewed_and_exported(
    tmp_path, teacher, single_process_runs
):
    """`latent_shapes` with weights: the shape of an iteration comes from the iteration alone
    (not the data-parallel rank's random streams), by weight; each is previewed and exported,
    and `sample --checkpoint` samples the one asked for (refusing one not trained)."""
    import numpy as np

    from phased_dmd_mp import sample as sample_cli
    from phased_dmd_mp.distill.config import DistillConfig

    name = "phased_dmd_alternating"  # latent_shapes [[1, 1, 8, 8], [1, 1, 4, 8]], weights 1:3
    config = DistillConfig(teacher=str(teacher), **_kv([*QUICK, *ALGORITHMS[name]]))
    distiller = Distiller(config, tmp_path / "draws")
    draws = [distiller.shape_of(i) for i in range(400)]
    torch.randn(8, generator=distiller.rng)  # the rank's streams move: the draws do not
    assert [distiller.shape_of(i) for i in range(400)] == draws
    share = draws.count((1, 1, 4, 8)) / len(draws)
    assert 0.68 < share < 0.82, share  # weight 3 of 4
    run_dir = single_process_runs[name]
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["shape"] for h in history if "shape" in h] == [1, 0, 1, 0]  # the draws
    assert (run_dir / "samples" / "iter_000004_1x1x8x8.png").is_file()
    assert (run_dir / "samples" / "iter_000004_1x1x4x8.png").is_file()
    assert {"pairwise_distance_1x1x4x8", "pairwise_distance"} <= set(history[-1])
    summary = json.loads((run_dir / "export" / "generator.json").read_text())
    assert summary["latent_shapes"] == [[1, 1, 8, 8], [1, 1, 4, 8]]
    assert summary["latent_shape_weights"] == [1.0, 3.0]
    out = tmp_path / "wide"
    args = ["--checkpoint", str(run_dir), "--out", str(out), "--latent-shape", "1", "1", "4", "8"]
    assert sample_cli.main([*args, "--no-progress"]) == 0
    with np.load(out / "samples.npz") as file:
        assert file["samples"].shape[2:] == (1, 4, 8)
    with pytest.raises(SystemExit):
        sample_cli.main([*args[:4], "--latent-shape", "1", "1", "8", "4"])

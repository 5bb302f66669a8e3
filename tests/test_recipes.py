"""Every config in configs/ runs in CI in the shape it ships (tests/rehearsal.py: the rule).

- Distillation recipes (configs/*.yaml that DistillConfig reads): each runs, shrunk to a tiny
  teacher of its model family and 2 iterations, in one process and under torchrun on 2 ranks
  (gloo), and its export matches the config.
- Teacher-training recipes (pretrain_teacher's configs): each trains, shrunk, through
  pretrain_teacher; the *_smoke.yaml files are already test-sized and run verbatim by the test
  that names them.
- Reproduction suites (configs/reproduce/): every run of each suite trains, shrunk, on the
  suite's teacher recipe rehearsed.
- Architectures (configs/models/): each is a released model (test_models_execution checks the
  parameter counts at full size), and shrunk by the rehearsal rule it builds and takes the
  conditions of its family.
A config that fits none of these fails test_every_config_is_rehearsed.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rehearsal import (
    CONFIGS,
    LEVERS,
    RECIPES,
    SIZE_KEYS,
    TINY_TEACHER_TRAINING,
    check_export,
    model_config,
    rehearsal_config,
    rehearsal_overrides,
    rehearsal_world_size,
    rehearse_teacher_training,
    shrink,
    tiny_arch,
    write_recipe_teacher,
    write_teacher,
)

from phased_dmd_mp import pretrain_distill, pretrain_teacher, toy
from phased_dmd_mp.conditioning import dit_velocity
from phased_dmd_mp.config import load_config, parse_overrides
from phased_dmd_mp.data.teacher import load_transformer, read_conditions, read_spec
from phased_dmd_mp.distill.config import DistillConfig
from phased_dmd_mp.models.convert import read_diffusers_dir
from phased_dmd_mp.reproduce import load_suite
from phased_dmd_mp.sample import guided_velocity

ROOT = Path(__file__).parents[1]
TESTS = Path(__file__).parent
WORKER = TESTS / "parallel" / "rehearsal_worker.py"
TEACHER_RECIPES = ["digits_teacher.yaml", "mixture_teacher.yaml", "moving_digits_teacher.yaml"]
# Test-sized configs that a test runs verbatim: {config: the test file that runs it}.
SMOKE = {
    "digits_teacher_smoke.yaml": "test_teacher.py",
    "mixture_teacher_smoke.yaml": "test_mixture_teacher.py",
    "moving_digits_teacher_smoke.yaml": "test_moving_digits.py",
    "toy_smoke.yaml": "test_toy.py",
}


def test_every_config_is_rehearsed():
    """Each configs/*.yaml is exactly one of: a distillation recipe (RECIPES), a teacher recipe
    (TEACHER_RECIPES), a smoke config run by its test (SMOKE); each is read by its job's config."""
    kinds = {
        **{name: DistillConfig for name in RECIPES},
        **{name: pretrain_teacher.TeacherConfig for name in TEACHER_RECIPES},
        **{name: pretrain_teacher.TeacherConfig for name in SMOKE if "teacher" in name},
        "toy_smoke.yaml": toy.ToyConfig,
    }
    assert len(kinds) == len(RECIPES) + len(TEACHER_RECIPES) + len(SMOKE)  # no name twice
    shipped = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert shipped == sorted(kinds), (
        f"without a rehearsal: {sorted(set(shipped) - set(kinds))}; "
        f"listed but missing: {sorted(set(kinds) - set(shipped))}"
    )
    for name, cls in kinds.items():
        load_config(cls, CONFIGS / name)
    for name, test in SMOKE.items():
        assert name in (TESTS / test).read_text(), f"{test} does not run {name}"
    assert all((CONFIGS / teacher.model).is_file() for teacher in RECIPES.values())
    from test_models_execution import RELEASED  # full-size parameter counts

    assert sorted(RELEASED) == sorted(p.name for p in (CONFIGS / "models").glob("*.yaml"))


@pytest.mark.parametrize("name", RECIPES)
def test_rehearsal_changes_only_size_keys(tmp_path, name):
    recipe = dataclasses.asdict(load_config(DistillConfig, CONFIGS / name))
    rehearsal = dataclasses.asdict(rehearsal_config(name, tmp_path, world_size=2))
    changed = {key for key in recipe if recipe[key] != rehearsal[key]}
    assert changed <= SIZE_KEYS, changed - SIZE_KEYS
    assert rehearsal["num_phases"] * rehearsal["iterations_per_phase"] == 2
    assert rehearsal["batch_size"] <= 4


# --- teachers (shared by every test here) ----------------------------------------------------


@pytest.fixture(scope="session")
def teacher_rehearsals(tmp_path_factory):
    """{teacher recipe: the teacher directory its rehearsal trained}."""
    root = tmp_path_factory.mktemp("teacher_rehearsals")
    return {
        name: rehearse_teacher_training(name, root / Path(name).stem) for name in TEACHER_RECIPES
    }


@pytest.fixture(scope="session")
def recipe_teachers(tmp_path_factory, teacher_rehearsals):
    """{distillation recipe: its tiny teacher}; the embedded ones are the rehearsed teachers."""
    root = tmp_path_factory.mktemp("recipe_teachers")
    teachers = {}
    for name, teacher in RECIPES.items():
        if teacher.model in teacher_rehearsals:
            teachers[name] = teacher_rehearsals[teacher.model]
        else:
            teachers[name] = write_recipe_teacher(name, root / Path(name).stem)
    return teachers


def check_run(run: Path, config: DistillConfig, boundary_ratio: float | None = None) -> None:
    """The run finished every update with finite losses and non-zero gradients and exported
    the configured generator; with two teacher experts (write_teacher's layout, split at
    boundary_ratio), generator expert k is its LoRA on the teacher expert of its first step."""
    history = json.loads((run / "history.json").read_text())
    iterations = config.num_phases * config.iterations_per_phase
    assert [h["iteration"] for h in history] == list(range(1, iterations + 1))
    assert history[-1]["generator_skipped"] == history[-1]["fake_skipped"] == 0
    assert all(h["generator_grad_norm"] > 0 and h["fake_grad_norm"] > 0 for h in history)
    for h in history:
        assert all(torch.isfinite(torch.tensor(h[k])) for k in ("generator_loss", "fake_loss"))
    summary = check_export(run, config)
    if boundary_ratio is None:
        return
    boundary = config.moe_boundary or boundary_ratio
    _, _, high = read_diffusers_dir(Path(config.teacher) / "transformer")
    _, _, low = read_diffusers_dir(Path(config.teacher) / "transformer_2")
    for k, name in enumerate(summary["experts"], start=1):
        _, _, expert = read_diffusers_dir(run / "export" / name)
        first_step = summary["timesteps"][summary["expert_of_step"].index(k)]
        own, other = (high, low) if first_step >= boundary else (low, high)
        distance = {
            label: sum(float((expert[key].float() - ref[key].float()).norm()) for key in expert)
            for label, ref in (("own", own), ("other", other))
        }
        assert distance["own"] < 0.1 * distance["other"], (name, distance)


# --- distillation recipes ---------------------------------------------------------------------


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_rehearsal_in_one_process(tmp_path, recipe_teachers, name):
    teacher = recipe_teachers[name]
    args = ["--config", str(CONFIGS / name), "--out", str(tmp_path), "--no-progress"]
    for item in rehearsal_overrides(name, teacher):
        args += ["--set", item]
    assert pretrain_distill.main(args) == 0
    config = rehearsal_config(name, teacher)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == yaml.safe_load(
        yaml.safe_dump(dataclasses.asdict(config))
    )
    check_run(tmp_path, config, RECIPES[name].boundary_ratio)


def test_recipe_rehearsals_under_torchrun(tmp_path, recipe_teachers):
    """All recipes in one torchrun launch per world size: TP=2 (DP=1) for the TP=8 recipes,
    DP=2 for the data-parallel digits recipe."""
    by_world: dict[int, list[str]] = {}
    for name in RECIPES:
        by_world.setdefault(rehearsal_world_size(name), []).append(name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for world, names in by_world.items():
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={world}", str(WORKER), str(tmp_path),
            *[f"{name}={recipe_teachers[name]}" for name in names],
        ]  # fmt: skip
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=400, check=False
        )
        errors = [x for x in result.stderr.splitlines() if x.startswith(("rank", "[rank"))]
        assert result.returncode == 0, "\n".join(errors[-60:]) or result.stderr[-4000:]
        for name in names:
            config = rehearsal_config(name, recipe_teachers[name], world)
            check_run(tmp_path / Path(name).stem, config, RECIPES[name].boundary_ratio)


# The recipe whose rehearsal also runs every quality lever (rehearsal.LEVERS): bf16, LoRA
# experts on a two-expert teacher, TP = 2 under torchrun.
LEVERS_RECIPE = "wan2.2_t2v_a14b_phased_dmd.yaml"
LEVER_LOSSES = {
    "gan_discriminator_loss", "gan_generator_loss", "diversity_loss", "real_critic_loss",
    "real_critic_fake_loss",
}  # fmt: skip


def test_every_lever_in_a_recipe_rehearsal(tmp_path, recipe_teachers):
    """The official trainer's levers on the Wan2.2 A14B recipe's rehearsal, in one process and
    under torchrun (TP = 2): every update finite, each lever's losses logged, the export the
    configured generator."""
    name, teacher = LEVERS_RECIPE, recipe_teachers[LEVERS_RECIPE]
    boundary = RECIPES[name].boundary_ratio
    overrides = [*rehearsal_overrides(name, teacher), *LEVERS]
    args = ["--config", str(CONFIGS / name), "--out", str(tmp_path / "one"), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    assert pretrain_distill.main(args) == 0
    check_run(tmp_path / "one", load_config(DistillConfig, CONFIGS / name, overrides), boundary)

    world = rehearsal_world_size(name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={world}", str(WORKER), str(tmp_path / "torchrun"),
        "+".join([f"{name}={teacher}", *LEVERS]),
    ]  # fmt: skip
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=400, check=False
    )
    errors = [x for x in result.stderr.splitlines() if x.startswith(("rank", "[rank"))]
    assert result.returncode == 0, "\n".join(errors[-60:]) or result.stderr[-4000:]
    config = load_config(
        DistillConfig, CONFIGS / name, [*rehearsal_overrides(name, teacher, world), *LEVERS]
    )
    assert config.tensor_parallel == 2 and config.dtype == "bfloat16"
    run = tmp_path / "torchrun" / Path(name).stem
    check_run(run, config, boundary)
    for folder in (tmp_path / "one", run):
        history = json.loads((folder / "history.json").read_text())
        assert LEVER_LOSSES <= {key for h in history for key in h}, folder


# --- teacher recipes, reproduction suites, architectures --------------------------------------


@pytest.mark.parametrize("name", TEACHER_RECIPES)
def test_teacher_recipe_rehearsal(teacher_rehearsals, name):
    """pretrain_teacher on the recipe with only its size keys shrunk writes a teacher directory
    with the recipe's data settings."""
    out = teacher_rehearsals[name]
    config = load_config(pretrain_teacher.TeacherConfig, CONFIGS / name, TINY_TEACHER_TRAINING)
    assert read_spec(out) == config.spec()
    kind, arch, _ = read_diffusers_dir(out / "transformer")
    assert kind == "wan" and arch == config.arch()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["steps"] == config.train_steps
    assert torch.isfinite(torch.tensor(metrics["training"]["final_loss"]))


@pytest.mark.parametrize("suite", sorted(p.name for p in (CONFIGS / "reproduce").glob("*.yaml")))
def test_reproduction_suite_rehearsal(tmp_path, teacher_rehearsals, suite):
    """Every run of the suite (its common settings and its own) trains shrunk on the suite's
    teacher recipe rehearsed, and exports what it configures."""
    loaded = load_suite(CONFIGS / "reproduce" / suite)
    teacher = teacher_rehearsals[loaded.teacher_config.name]
    for run in loaded.runs:
        keys = [*loaded.common, *run.overrides]
        overrides = [*keys, *shrink(parse_overrides(keys), teacher)]
        out = tmp_path / run.name.replace(" ", "_").replace(":", "").replace(",", "")
        args = ["--out", str(out), "--no-progress"]
        for item in overrides:
            args += ["--set", item]
        assert pretrain_distill.main(args) == 0, run.name
        check_run(out, load_config(DistillConfig, None, overrides))


@pytest.mark.parametrize("path", sorted(p.name for p in (CONFIGS / "models").glob("*.yaml")))
def test_model_config_builds_tiny_with_its_conditions(tmp_path, path):
    """Shrunk by the rehearsal rule, each released architecture makes a teacher directory whose
    model takes its condition set under CFG (I2V image latents and CLIP tokens, Qwen masks)."""
    arch = tiny_arch(model_config(f"models/{path}"))
    teacher = write_teacher(tmp_path, arch)
    spec, conditions = read_spec(teacher), read_conditions(teacher)
    model = load_transformer(teacher).eval()
    velocity = guided_velocity(dit_velocity(model, arch), conditions, 4.0, "cpu")
    cond = conditions.batch([0, 1, 2, 3])
    x = torch.randn(4, *spec.latent_shape)
    with torch.no_grad():
        v = velocity(x, torch.full((4,), 0.5), cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    expected = {"text"}
    expected |= {"text_mask"} if path.startswith("qwen_image") else set()
    expected |= (
        {"image_latents"}
        if arch.in_channels != arch.out_channels and not path.startswith("qwen")
        else set()
    )
    expected |= {"image_embeds"} if getattr(arch, "image_dim", None) else set()
    assert set(conditions.fields) == expected

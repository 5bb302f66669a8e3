"""preflight: exact parameter counts, exact live-tensor measurement, activation constants that
reproduce measurements, the estimate of a whole iteration against its measured peak (three
small runs, one of them TP=2 under torchrun), and the CLI's verdicts."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phased_dmd_mp import preflight
from phased_dmd_mp.data.condition_writer import write_condition_set
from phased_dmd_mp.data.teacher import TeacherSpec, write_spec
from phased_dmd_mp.memory.activations import activation_bytes
from phased_dmd_mp.memory.calibrate import measure_point
from phased_dmd_mp.memory.measure import LiveTensorBytes
from phased_dmd_mp.memory.parameters import stage_parameters
from phased_dmd_mp.models import QwenImageConfig, WanConfig, build
from phased_dmd_mp.models.config import read_architecture
from phased_dmd_mp.models.convert import ours_to_diffusers, shard
from phased_dmd_mp.models.convert import write_diffusers_dir
from phased_dmd_mp.models.lora import add_lora, adapter_parameters
from phased_dmd_mp.parallel.state import ensure_initialized

ROOT = Path(__file__).parents[1]
WORKER = ROOT / "tests" / "parallel" / "preflight_worker.py"
TOLERANCE = 0.15  # the estimate is within 15% of the measured peak of an iteration

WAN = WanConfig(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=8, freq_dim=16, ffn_dim=96, num_layers=4)  # fmt: skip
QWEN = QwenImageConfig(patch_size=2, in_channels=16, out_channels=4, num_layers=4,
                       attention_head_dim=16, num_attention_heads=4, joint_attention_dim=8,
                       axes_dims_rope=(4, 6, 6))  # fmt: skip


@pytest.mark.parametrize("arch", [WAN, QWEN], ids=["wan", "qwen_image"])
def test_stage_parameters_are_the_shards(arch):
    """Meta-device counts of every (TP=2, PP=2) rank equal the converter's real shards."""
    ensure_initialized()
    torch.manual_seed(0)
    whole = build(arch).state_dict()
    shards = shard({k: v for k, v in whole.items() if isinstance(v, torch.Tensor)}, arch, 2, 2)
    for (tp_rank, pp_rank), tensors in shards.items():
        counted = stage_parameters(arch, 2, 2, pp_rank).weights
        assert counted == sum(v.numel() for k, v in tensors.items() if "_extra_state" not in k)
    assert stage_parameters(arch, 1, 1, 0).weights == sum(
        p.numel() for p in build(arch).parameters()
    )


def test_lora_adapter_count():
    ensure_initialized()
    model = build(WAN)
    add_lora(model, 8, 1.0, 2)
    assert stage_parameters(WAN, 1, 1, 0, lora_rank=8).adapter == sum(
        p.numel() for p in adapter_parameters(model, 1)
    )


def test_live_tensor_bytes_is_exact():
    weight = torch.nn.Parameter(torch.randn(256, 128))
    x = torch.randn(32, 256)
    (x @ weight).sum().backward()  # the gradient exists before measuring, unread from Python
    with LiveTensorBytes() as tracker:
        start = tracker.live
        a = torch.randn(1000, 250)  # 1 MB
        b = a * 2  # 2 MB live
        del a
        c = b + 1  # 2 MB again
        del b, c
        after = tracker.live
    assert tracker.peak - start == 2_000_000
    assert after == start
    assert start >= (256 * 128 * 2 + 32 * 256) * 4  # weight, its gradient, x


@pytest.mark.parametrize(
    "kind,tp,dtype,adapter,recompute",
    [("wan", 2, "bfloat16", "lora", False), ("qwen_image", 1, "float32", "full", False),
     ("wan", 1, "bfloat16", "full", True)],
)  # fmt: skip
def test_layer_constants_reproduce_a_new_measurement(kind, tp, dtype, adapter, recompute):
    """Bytes a layer keeps for backward, measured at a shape the calibration never drew, equal
    the formula's (exact in float32; bfloat16 fits leave ~1%)."""
    ensure_initialized()
    seed, batch, frames, size, text = random.Random(7).randrange(1 << 30), 2, 3, 12, 17
    common = (tp, batch, frames, size, text, dtype, adapter, recompute)
    arch, shape, kept1, _, _ = measure_point((kind, seed), 1, *common)
    _, _, kept2, _, _ = measure_point((kind, seed), 2, *common)
    estimated = activation_bytes(arch, shape, batch, "layer", dtype=dtype, adapter=adapter,
                                 recompute=recompute)  # fmt: skip
    assert estimated == pytest.approx(kept2 - kept1, rel=0.02)


# --- a whole iteration: estimated vs measured ------------------------------------------------

SMALL_WAN = WanConfig(num_attention_heads=4, attention_head_dim=128, in_channels=4,
                      out_channels=4, text_dim=32, freq_dim=32, ffn_dim=1536, num_layers=2)  # fmt: skip
SMALL_QWEN = QwenImageConfig(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                             attention_head_dim=128, num_attention_heads=2,
                             joint_attention_dim=32, axes_dims_rope=(16, 56, 56))  # fmt: skip
RUNS = {  # name: (arch, latent shape, world size, overrides)
    "wan_full_fp32": (SMALL_WAN, (4, 2, 16, 16), 1, ["batch_size=2"]),
    "wan_lora_tp2": (SMALL_WAN, (4, 2, 16, 16), 2,
                     ["batch_size=2", "tensor_parallel=2", "generator_adapter=lora", "lora_rank=64"]),
    "qwen_recompute": (SMALL_QWEN, (4, 1, 32, 32), 1,
                            ["batch_size=2", "recompute=true"]),
    # optimizer state and layer inputs in host memory: device and host peaks both estimated
    "wan_offload_bf16": (SMALL_WAN, (4, 2, 16, 16), 1,
                         ["batch_size=2", "dtype=bfloat16", "recompute=true", "ema_decay=0.9",
                          "optimizer_offload=true", "activation_offload=true"]),
}  # fmt: skip


def write_teacher(path: Path, arch, latent_shape, text_tokens: int = 16) -> Path:
    ensure_initialized()
    torch.manual_seed(0)
    model = build(arch)
    write_diffusers_dir(path / "transformer", arch, ours_to_diffusers(model.state_dict(), arch))
    width = arch.text_dim if isinstance(arch, WanConfig) else arch.joint_attention_dim
    items = {"text": torch.randn(4, text_tokens, width)}
    write_condition_set(path / "conditions", items, {"text": torch.zeros(text_tokens, width)})
    write_spec(path, TeacherSpec(latent_shape=latent_shape, shift=5.0, guidance_scale=4.0))
    return path


def measure_run(tmp_path: Path, name: str) -> dict:
    arch, latent_shape, world, overrides = RUNS[name]
    teacher = write_teacher(tmp_path / "teacher", arch, latent_shape)
    launcher = [sys.executable]
    if world > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [*launcher, str(WORKER), str(teacher), str(tmp_path / "run"), "fake_updates=1",
               *overrides]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(RUNS))
def test_estimate_is_within_15_percent_of_the_measured_peak(tmp_path, name):
    result = measure_run(tmp_path, name)
    error = result["estimated"] / result["measured"] - 1
    print(
        f"{name}: measured {result['measured']} B, estimated {result['estimated']} B, "
        f"error {error:+.1%}"
    )  # shown by pytest -s (docs/parallelism-and-memory.md's table)
    assert abs(error) < TOLERANCE, (name, error, result)
    if result["host_estimated"] or result["host_measured"]:  # offload's host memory per GPU
        host_error = result["host_estimated"] / result["host_measured"] - 1
        print(f"{name} host: measured {result['host_measured']} B, estimated "
              f"{result['host_estimated']} B, error {host_error:+.1%}")  # fmt: skip
        assert abs(host_error) < TOLERANCE, (name, host_error, result)


# --- the command line ------------------------------------------------------------------------

RECIPE = str(ROOT / "configs" / "wan2.1_t2v_14b_phased_dmd.yaml")
WAN14B = str(ROOT / "configs" / "models" / "wan2.1_t2v_14b.yaml")


def run_preflight(capsys, *args) -> tuple[int, str, str]:
    code = preflight.main([*args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_recipe_fits_on_eight_gpus(capsys):
    code, out, _ = run_preflight(capsys, "--config", RECIPE, "--world-size", "8",
                                 "--gpu-memory", "80GiB", "--model", WAN14B,
                                 "--latent-shape", "16", "21", "60", "104")  # fmt: skip
    assert code == 0, out
    assert "phase 2, every rank (ranks 0-7)" in out and "fits: peak" in out


def test_cli_names_what_does_not_fit_and_suggests_layouts(capsys):
    code, out, _ = run_preflight(capsys, "--config", RECIPE, "--set", "tensor_parallel=1",
                                 "--set", "recompute=false", "--world-size", "8",
                                 "--gpu-memory", "80GiB", "--model", WAN14B,
                                 "--latent-shape", "16", "21", "60", "104")  # fmt: skip
    assert code == 1
    assert "does not fit: phase 1, every rank" in out
    assert "fits at" in out and "--set tensor_parallel=" in out


def test_cli_layout_mistake_is_one_line(capsys):
    code, _, err = run_preflight(capsys, "--config", RECIPE, "--world-size", "12",
                                 "--model", WAN14B, "--latent-shape", "16", "21", "60", "104")  # fmt: skip
    assert code == 2
    assert err.count("\n") == 1 and "world size = 12" in err


@pytest.mark.parametrize("flags, message", [
    (["--latent-shape", "32", "21", "60", "104"], "in_channels = 16"),
    (["--latent-shape", "16", "21", "61", "104"], "latent height = 61"),
    (["--latent-shape", "16", "21", "60", "104", "--gpu-memory", "0GiB"], "must be more than 0"),
])  # fmt: skip
def test_cli_latents_against_model_and_budget_are_one_line(capsys, flags, message):
    code, _, err = run_preflight(capsys, "--config", RECIPE, "--world-size", "8",
                                 "--model", WAN14B, *flags)  # fmt: skip
    assert code == 2
    assert err.count("\n") == 1 and message in err, err


def test_cli_missing_teacher_points_to_the_architecture_keys(capsys):
    code, _, err = run_preflight(capsys, "--config", RECIPE, "--set", "teacher=runs/nowhere",
                                 "--set", "architecture=null", "--world-size", "8")  # fmt: skip
    assert code == 2
    assert err.count("\n") == 1 and "runs/nowhere does not exist" in err
    assert "architecture and latent_shape" in err and "--model" in err


SHIPPED = ["wan2.1_t2v_14b", "wan2.2_t2v_a14b", "wan2.2_i2v_a14b", "qwen_image",
           "wan2.1_t2v_1.3b_from_14b", "wan2.2_ti2v_5b"]  # fmt: skip


def test_every_shipped_recipe_is_checked_here():
    recipes = (ROOT / "configs").glob("*_phased_dmd.yaml")
    shipped = {p.name.removesuffix("_phased_dmd.yaml") for p in recipes}
    assert shipped - {"digits"} == set(SHIPPED)


@pytest.mark.parametrize("recipe", SHIPPED)
def test_cli_answers_for_a_shipped_recipe_before_its_teacher_is_on_disk(capsys, recipe):
    """Each recipe names its architecture and latent shape (and a student's): a verdict, not a
    config error, and the recipe's layout fits 8 GPUs of 80 GiB (with 1 TiB of host memory per
    node; docs/recipes.md's table)."""
    code, out, err = run_preflight(capsys, "--config", str(ROOT / "configs" / f"{recipe}_phased_dmd.yaml"),
                                   "--world-size", "8", "--gpu-memory", "80GiB",
                                   "--host-memory", "1TiB")  # fmt: skip
    assert code == 0, out + err
    assert "(architecture " in out and "fits: peak" in out
    if recipe.endswith("a14b"):
        assert ", two experts;" in out


def test_cli_offload_without_enough_host_memory_is_one_line(capsys):
    args = ["--config", str(ROOT / "configs" / "wan2.2_t2v_a14b_phased_dmd.yaml"),
            "--set", "optimizer_offload=true", "--world-size", "8", "--gpu-memory", "80GiB"]  # fmt: skip
    code, out, _ = run_preflight(capsys, *args, "--host-memory", "128GiB")
    assert code == 1
    verdicts = [x for x in out.splitlines() if x.startswith("does not fit")]
    assert len(verdicts) == 1, out
    line = verdicts[0]
    assert "host memory per node" in line and "optimizer_offload" in line
    assert "--host-memory 128.00 GiB" in line
    code, out, _ = run_preflight(capsys, *args)  # unchecked without --host-memory, but stated
    assert code == 0 and "host memory per node: 8 GPUs x" in out and "not checked" in out


def test_cli_names_the_peak_phase_when_a_later_phase_needs_more(capsys):
    # Wan2.2 at 720p on 16 GPUs of 70 GiB without sequence parallelism or offload: phase 1
    # needs 79.6 GiB, phase 2's two-expert fake 101.9 GiB
    code, out, _ = run_preflight(capsys, "--config", str(ROOT / "configs" / "wan2.2_t2v_a14b_phased_dmd.yaml"),
                                 "--set", "optimizer_offload=false", "--set", "sequence_parallel=false",
                                 "--world-size", "16", "--gpu-memory", "70GiB", "--model", WAN14B,
                                 "--latent-shape", "16", "21", "90", "160",
                                 "--moe-boundary", "0.875")  # fmt: skip
    assert code == 1
    line = next(x for x in out.splitlines() if x.startswith("does not fit:"))
    assert line.startswith("does not fit: phase 1") and "; peak: phase 2, 101.88" in line, line


def test_cli_plans_with_the_largest_of_latent_shapes(capsys):
    """A run at several latent shapes peaks at the one with the most tokens, whatever the
    recipe's latent_shape; each entry is checked against the architecture like it."""
    shapes = "latent_shapes=[[16, 5, 30, 52], [16, 21, 60, 112], [16, 21, 60, 104]]"
    code, out, err = run_preflight(capsys, "--config", RECIPE, "--set", shapes,
                                   "--world-size", "8", "--gpu-memory", "80GiB")  # fmt: skip
    assert "latents [16, 21, 60, 112] = 35280 tokens" in out, out + err
    code, _, err = run_preflight(capsys, "--config", RECIPE, "--world-size", "8",
                                 "--set", "latent_shapes=[[16, 21, 60, 105]]")  # fmt: skip
    assert code == 2
    assert err.count("\n") == 1 and "latent width = 105" in err, err


def test_cli_without_a_layout_that_fits_says_what_would(capsys):
    """Wan2.1 14B on one GPU: nothing of one GPU fits, whatever the micro batch (already 1),
    so the advice is what was tried, the closest layout and the GPUs that do fit, not a
    smaller batch_size."""
    code, out, _ = run_preflight(capsys, "--config", RECIPE, "--set", "tensor_parallel=1",
                                 "--world-size", "1", "--gpu-memory", "80GiB",
                                 "--host-memory", "1TiB")  # fmt: skip
    assert code == 1
    assert "fits at" not in out and "batch_size" not in out
    advice = out[out.index("no layout of 1 GPU fits"):].splitlines()
    assert "micro batches down to 1" in advice[0]
    assert "optimizer and activation offload" in advice[0]
    least = float(advice[1].split("least memory: ")[1].split(" GiB")[0])
    assert 80 < least < 304, advice[1]  # below the recipe's 304 GiB at TP 1, above the budget
    assert "--set activation_offload=true --set optimizer_offload=true" in advice[1]
    assert advice[2].startswith("  more GPUs: 2 fit at ")
    assert "--world-size 2 --set tensor_parallel=2" in advice[2]


def test_cli_counts_a_smaller_student(capsys):
    """The 1.3B-from-14B recipe: the frozen 14B teacher, and 1.3B student, expert copies and
    fake (fake_init: student), each at its own per-rank size; before either is on disk."""
    recipe = ROOT / "configs" / "wan2.1_t2v_1.3b_from_14b_phased_dmd.yaml"
    code, out, _ = run_preflight(capsys, "--config", str(recipe), "--world-size", "8",
                                 "--gpu-memory", "80GiB")  # fmt: skip
    assert code == 0, out
    teacher = stage_parameters(read_architecture("wan2.1_t2v_14b"), 2, 1, 0).weights
    student = stage_parameters(read_architecture("wan2.1_t2v_1.3b"), 2, 1, 0).weights
    assert "student: WanConfig (student_architecture wan2.1_t2v_1.3b)" in out
    for phase, copies in ((1, 1), (2, 2)):  # student + expert copies + fake, in bf16
        block = out.split(f"phase {phase}, every rank")[1]
        gib = float(block.split("parameters")[1].split("GiB")[0])
        assert gib == pytest.approx((teacher + (2 + copies) * student) * 2 / 2**30, abs=0.006)
        gradients = float(block.split("gradients")[1].split("GiB")[0])  # fp32: expert and fake
        assert gradients == pytest.approx(2 * student * 4 / 2**30, abs=0.006)
    code, _, err = run_preflight(capsys, "--config", str(recipe), "--world-size", "8",
                                 "--set", "student_architecture=null")  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "set the student_architecture key" in err


"""Mixed precision and the sharded optimizer (distill/optim.py): bf16 with fp32 main parameters
learns like fp32 where pure bf16 does not; DP = 2 with megatron's DistributedOptimizer equals
DP = 1; saved state restores exactly, also at another data-parallel size; the EMA and the
checkpoint hold fp32; no forward runs more than micro_batch_size samples; a phase holds only
the models it needs."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distill_helpers import QUICK, run_distill, write_tiny_teacher

from phased_dmd_mp.config import load_config
from phased_dmd_mp.distill.config import DistillConfig
from phased_dmd_mp.distill.models import RoutedVelocity, VelocityModel
from phased_dmd_mp.distill.trainer import Distiller
from phased_dmd_mp.parallel import pipeline
from phased_dmd_mp.parallel.state import initialize

sys.path.insert(0, str(Path(__file__).parent / "parallel"))
import optim_worker  # noqa: E402

ROOT = Path(__file__).parents[1]
OPTIM_WORKER = ROOT / "tests" / "parallel" / "optim_worker.py"
# One-step DMD with a full-copy generator at a learning rate real recipes use (2e-6).
REAL_LR = ["algorithm=dmd", "num_steps=1", "num_phases=1", "generator_lr=2e-6", "fake_lr=2e-6"]


def _config(teacher: Path, *overrides: str) -> DistillConfig:
    return load_config(DistillConfig, None, [f"teacher={teacher}", *overrides])


def _generator_state(run_dir: Path) -> dict:
    checkpoint = max((run_dir / "checkpoints").iterdir())
    state = torch.load(checkpoint / "rank-tp0-pp0.pt", weights_only=False)
    return state["optimizers"]["generator/1"]


def _teacher_values(teacher: Path, dtype: str) -> list[torch.Tensor]:
    distiller = Distiller(_config(teacher, *QUICK, *REAL_LR, f"dtype={dtype}"), teacher / "unused")
    return [p.detach().float().clone() for p in distiller._expert(1).parameters()]


def _change(after: list[torch.Tensor], before: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(a - b).flatten() for a, b in zip(after, before, strict=True)])


def test_bf16_mixed_moves_the_generator_like_fp32_and_pure_bf16_does_not(tmp_path, teacher):
    """The generator's change from the teacher after two updates at lr 2e-6 (fp32 main params;
    the weights themselves for pure bf16): bf16 with fp32
    main parameters matches fp32 in direction and size; pure bf16 loses most of it to
    rounding (its updates are below half a bf16 ulp of most weights)."""
    # The fake learns fast (lr 1e-3) so that the generator's DMD gradient (teacher - fake,
    # zero at the start) is signal rather than bf16 rounding of the forward passes.
    signal = ["fake_lr=1e-3", "fake_updates=3", "batch_size=8"]
    runs = {
        "fp32": ["dtype=float32"],
        "mixed": ["dtype=bfloat16"],
        "pure": ["dtype=bfloat16", "main_params_dtype=bfloat16", "distributed_optimizer=false"],
    }
    change = {}
    for name, overrides in runs.items():
        assert run_distill(tmp_path / name, teacher, *REAL_LR, *signal, *overrides) == 0
        # fp32 main params start from the fp32 teacher; pure bf16 from its rounding
        start = _teacher_values(teacher, "bfloat16" if name == "pure" else "float32")
        change[name] = _change(_generator_state(tmp_path / name)["main_params"], start)

    def compare(name):
        cosine = torch.nn.functional.cosine_similarity(change[name], change["fp32"], dim=0)
        return float(cosine), float(change[name].norm() / change["fp32"].norm())

    cosine, ratio = compare("mixed")
    assert cosine > 0.95 and 0.9 < ratio < 1.1, (cosine, ratio)  # measured 0.99, 0.99
    cosine, ratio = compare("pure")
    assert cosine < 0.5 and ratio < 0.5, (cosine, ratio)  # measured 0.26, 0.31


def test_checkpoint_holds_fp32_main_params_and_ema(tmp_path, teacher):
    assert run_distill(tmp_path, teacher, *REAL_LR, "dtype=bfloat16", "ema_decay=0.9") == 0
    state = torch.load(
        max((tmp_path / "checkpoints").iterdir()) / "rank-tp0-pp0.pt", weights_only=False
    )
    trained, weights = state["optimizers"]["generator/1"], state["generator"][0]
    assert trained["steps"] == 2
    assert all(w.dtype == torch.bfloat16 for w in weights)
    for key in ("main_params", "exp_avg", "exp_avg_sq", "ema"):
        assert all(v.dtype == torch.float32 for v in trained[key]), key
    # The bf16 weights are the main params rounded; the main params keep what rounding drops.
    main = trained["main_params"]
    assert all(torch.equal(m.to(torch.bfloat16), w) for m, w in zip(main, weights))
    assert any(not torch.equal(m, w.float()) for m, w in zip(main, weights))
    # The EMA (decay 0.9 over two updates) sits between the start (the fp32 teacher the main
    # params start from) and the last main params.
    start = _teacher_values(teacher, "float32")
    ema_change, main_change = _change(trained["ema"], start), _change(main, start)
    ratio = float(ema_change.norm() / main_change.norm())
    assert 0.2 < ratio < 0.9, ratio


def _torchrun(out: Path, nproc: int, *args: str) -> dict:
    """optim_worker.py's result.pt from a torchrun of nproc ranks."""
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", str(OPTIM_WORKER), str(out), *args,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out / "result.pt", weights_only=False)


def _assert_same(a: dict, b: dict, atol: float) -> None:
    for key in ("main_params", "exp_avg", "exp_avg_sq"):
        for x, y in zip(a["state"][key], b["state"][key], strict=True):
            torch.testing.assert_close(x, y, atol=atol, rtol=0)


def test_sharded_optimizer_at_dp2_equals_dp1_and_resumes_exactly(tmp_path):
    """bf16 weights, fp32 main params: DP = 2 with megatron's DistributedOptimizer (each rank
    half the batch, main params and moments split) equals DP = 1 up to fp32 summation order;
    restoring the state saved after two updates continues bit-exactly at DP = 2, and at DP = 1
    from the DP = 2 state (the saved state is whole tensors, layout-free)."""
    two = _torchrun(tmp_path / "dp2", 2, "shard")
    initialize(1, 1)  # DP = 1: this process
    one = {"straight": optim_worker.run(shard=False)}
    one["from_other"] = optim_worker.run(shard=False, resume_from=two["straight"])
    _assert_same(two["straight"], one["straight"], atol=1e-6)
    _assert_same(two["resumed"], two["straight"], atol=0)
    assert all(
        torch.equal(a, b) for a, b in zip(two["resumed"]["weights"], two["straight"]["weights"])
    )
    _assert_same(one["from_other"], one["straight"], atol=1e-6)
    assert one["straight"]["bytes_per_parameter"] == 18.0  # 2 weights + 4 grad + 4 main + 8 Adam
    # 2 + 4 + 12 / 2, plus megatron's 64-element alignment of each tiny parameter in the buffers
    assert 12.0 <= two["straight"]["bytes_per_parameter"] < 14.0


@pytest.mark.parametrize(
    "dtype, main, bytes_per_parameter",
    [("float32", "float32", 16.0), ("bfloat16", "float32", 18.0), ("bfloat16", "bfloat16", 8.0)],
)
def test_bytes_per_trained_parameter_match_the_documented_table(
    teacher, tmp_path, dtype, main, bytes_per_parameter
):
    """optim.py's table at DP = 1: what the fake model's role holds after one update."""
    overrides = [*QUICK, *REAL_LR, f"dtype={dtype}", f"main_params_dtype={main}"]
    if main == "bfloat16":
        overrides.append("distributed_optimizer=false")
    distiller = Distiller(_config(teacher, *overrides), tmp_path)
    distiller.fake_update(1)
    assert (
        optim_worker.held_bytes_per_parameter(distiller.trained[("fake", 1)]) == bytes_per_parameter
    )


def test_no_forward_sees_more_than_micro_batch_size_and_results_are_the_same(
    tmp_path, teacher, monkeypatch
):
    """Rollouts, the teacher's guided pair (2 x batch), the fake's prediction, the trained
    forwards and the previews run in pieces of micro_batch_size; the updates equal the
    whole-batch ones."""
    sizes = []
    for name in ("forward", "forward_backward"):
        original = getattr(pipeline, name)

        def recording(model, microbatches, *rest, original=original):
            for item in microbatches:
                inputs = item[0] if isinstance(item, tuple) else item
                sizes.append(inputs["hidden_states"].shape[0])
            return original(model, microbatches, *rest)

        monkeypatch.setattr(pipeline, name, recording)

    def updated(micro):
        overrides = [*QUICK, "num_steps=4", "num_phases=2", "batch_size=6"]
        config = _config(teacher, *overrides, f"micro_batch_size={micro or 'null'}")
        distiller = Distiller(config, tmp_path / str(micro))
        losses = [distiller.fake_update(2)["fake_loss"], distiller.generator_update(2)]
        noise = torch.randn(5, 1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        samples = distiller.sample(noise, distiller.conditions.batch(torch.arange(5)))
        # the averaged, clipped gradients of the last fake and generator update
        grads = [b.grad_data.clone() for t in distiller.trained.values() for b in t.ddp.buffers]
        return losses, samples, grads

    whole = updated(None)
    assert max(sizes) == 6  # default: the rank batch, also for each half of the guided pair
    sizes.clear()
    pieces = updated(3)
    assert max(sizes) == 3 and 2 in sizes  # 6 = 2 x 3, the pair 12 = 4 x 3, previews 5 = 3 + 2
    (fake_loss, generator), samples, grads = pieces
    assert fake_loss == pytest.approx(whole[0][0], rel=1e-5)
    # the DMD loss (~2e-6 here) is a difference of nearly equal teacher and fake velocities
    assert generator["generator_loss"] == pytest.approx(whole[0][1]["generator_loss"], rel=1e-4)
    torch.testing.assert_close(samples, whole[1], atol=1e-5, rtol=0)
    for ours, theirs in zip(grads, whole[2], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def two_expert_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_expert")
    high = write_tiny_teacher(root / "high", seed=0)
    write_tiny_teacher(root / "low", seed=1)
    return high, root / "low" / "transformer"


def test_a_phase_holds_only_the_teacher_experts_its_noise_reaches(tmp_path, two_expert_teacher):
    """Wan2.2's phase 1 injects noise in (0.875, 1) only: its fake model is a copy of the
    high-noise expert alone; the last phase's (t below the boundary) of the low-noise one; a
    range across the boundary keeps both, and steps one expert alone when only it saw samples."""
    high, low = two_expert_teacher
    overrides = [
        *QUICK, "num_steps=4", "num_phases=2", f"teacher_low_noise={low}", "moe_boundary=0.875",
    ]  # fmt: skip
    ranges = "phase_t_ranges=[[0.875, 1.0], [0.0, 0.875]]"
    distiller = Distiller(_config(high, *overrides, ranges), tmp_path / "split")
    teacher = distiller.teacher
    fake_1, fake_2 = distiller._fake(1), distiller._fake(2)
    assert isinstance(fake_1, VelocityModel) and isinstance(fake_2, VelocityModel)
    for fake, expert in ((fake_1, teacher.high), (fake_2, teacher.low)):
        assert all(torch.equal(a, b) for a, b in zip(fake.parameters(), expert.parameters()))
    across = Distiller(_config(high, *overrides), tmp_path / "across")
    fake = across._fake(2)
    assert isinstance(fake, RoutedVelocity)
    # An expert that sees no sample has no gradient: its zero gradient buffer steps nothing.
    trained = across._trained("fake", 2)
    low_before = [p.detach().clone() for p in fake.low.parameters()]
    high_before = [p.detach().clone() for p in fake.high.parameters()]
    trained.zero_grad()
    x, t = torch.randn(2, 1, 1, 8, 8), torch.tensor([0.95, 0.9])
    fake.train(x, t, across.conditions.batch(torch.arange(2)), lambda v, i: v.square().mean(), 1)
    assert math.isfinite(trained.step())
    assert all(torch.equal(a, b) for a, b in zip(fake.low.parameters(), low_before))
    assert any(not torch.equal(a, b) for a, b in zip(fake.high.parameters(), high_before))


def test_a_phase_builds_its_expert_and_retires_the_last_phases_state(tmp_path, teacher):
    """Full-copy experts: expert 2 is its teacher until phase 2 trains (phase 1 holds one copy);
    when phase 2 starts, phase 1's fake, gradient buffers and optimizer are gone."""
    distiller = Distiller(_config(teacher, *QUICK, "num_steps=4", "num_phases=2"), tmp_path)
    assert distiller.generator[1] is distiller.teacher and not distiller.copied_experts
    for _ in range(2):  # phase 1 (iterations_per_phase = 2)
        distiller._iteration()
    assert distiller.copied_experts == {1} and distiller.generator[1] is distiller.teacher
    assert set(distiller.trained) == {("fake", 1), ("generator", 1)}
    distiller._iteration()  # phase 2
    assert distiller.copied_experts == {1, 2} and set(distiller.fakes) == {2}
    assert set(distiller.trained) == {("fake", 2), ("generator", 2)}


# --- the export keeps what training learned (issue 23, item 5) --------------------------------


def _named(arch, values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full copy's trained tensors (module parameter order) in diffusers' naming."""
    from phased_dmd_mp.models import build
    from phased_dmd_mp.models.convert import ours_to_diffusers

    names = [name for name, _ in build(arch, init_weights=False).named_parameters()]
    return ours_to_diffusers(dict(zip(names, values, strict=True)), arch)


@pytest.mark.parametrize("offload", [False, True])
def test_bf16_export_holds_the_fp32_main_params_in_the_teachers_dtype(tmp_path, teacher, offload):
    """bf16 compute, fp32 main params (on the device, or the host with optimizer_offload), an
    fp32 teacher, two phases of full copies (expert 1 retires before the end): each exported
    expert is fp32, its bf16 rounding is the bf16 weights training computed with, and it is not
    the teacher rounded (before: a bf16 export of the weights, half of whose values were
    bf16(teacher) after 200 updates at lr 2e-6: benchmarks/export_precision.py)."""
    from phased_dmd_mp.models.convert import read_diffusers_dir

    overrides = [*REAL_LR[3:], "num_steps=4", "num_phases=2", "dtype=bfloat16",
                 f"optimizer_offload={str(offload).lower()}"]  # fmt: skip
    assert run_distill(tmp_path, teacher, *overrides) == 0
    state = torch.load(
        max((tmp_path / "checkpoints").iterdir()) / "rank-tp0-pp0.pt", weights_only=False
    )
    _, arch, stored = read_diffusers_dir(teacher / "transformer")
    mains = {1: state["finished_main"][1], 2: state["optimizers"]["generator/2"]["main_params"]}
    for k, main in mains.items():
        _, _, exported = read_diffusers_dir(tmp_path / "export" / f"expert_{k}")
        weights, fp32 = _named(arch, state["generator"][k - 1]), _named(arch, main)
        assert exported.keys() == stored.keys()
        for name, value in exported.items():
            assert value.dtype == torch.float32, name
            assert torch.equal(value.bfloat16(), weights[name]), name
            assert torch.equal(value, fp32[name]), name
        values = torch.cat([v.flatten() for v in exported.values()])
        rounded = torch.cat([stored[n].bfloat16().float().flatten() for n in exported])
        assert float((values == rounded).float().mean()) < 0.05


def test_lora_export_is_the_stored_teacher_plus_the_fp32_adapter_product(tmp_path, teacher):
    """A bf16 run's LoRA expert: its adapter files hold fp32 tensors; the merged expert is the
    fp32 teacher as stored, exactly where no adapter acts, plus scale B A of that fp32
    adapter (computed in fp32) where one does."""
    from safetensors import safe_open

    from phased_dmd_mp.models.convert import diffusers_to_ours, ours_to_diffusers, read_diffusers_dir
    from phased_dmd_mp.models.lora import LORA_FILE, read_diffusers_lora

    overrides = [*REAL_LR, "dtype=bfloat16", "generator_adapter=lora", "lora_rank=4",
                 "lora_alpha=8", "generator_lr=1e-3"]  # fmt: skip
    assert run_distill(tmp_path, teacher, *overrides) == 0
    _, arch, stored = read_diffusers_dir(teacher / "transformer")
    _, _, merged = read_diffusers_dir(tmp_path / "export" / "expert_1")
    lora_dir = tmp_path / "export" / "expert_1_lora"
    with safe_open(lora_dir / LORA_FILE, framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F32"}
    adapter, rank, alpha = read_diffusers_lora(lora_dir, arch)
    base = diffusers_to_ours(stored, arch)
    expected = dict(base)
    for key, A in adapter.items():
        if key.endswith(".lora_A"):
            target = key.removesuffix(".lora_A") + ".weight"
            B = adapter[key.removesuffix("A") + "B"]
            expected[target] = base[target] + (alpha / rank) * (B.float() @ A.float())
    expected = ours_to_diffusers(expected, arch)
    changed = 0
    for name, value in merged.items():
        assert value.dtype == torch.float32, name
        if torch.equal(expected[name], stored[name]):
            assert torch.equal(value, stored[name]), name
        else:
            changed += 1
            torch.testing.assert_close(value, expected[name], atol=1e-7, rtol=0)
    assert changed > 0

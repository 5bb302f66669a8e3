"""Optimizer offload (`optimizer_offload`, distill/host_optimizer.py): the host step equals the
device step bit for bit on CPU (bf16 mixed and fp32, clipped gradients, EMA, one chunk or many),
the optimizer holds no device bytes with it, a run resumes with it switched either way exactly
(one process, and under torchrun at TP = 2 with LoRA and at DP = 2 with the sharded optimizer),
and a config that cannot offload is one line. On a GPU (skipped here): state in pinned host
memory, device memory freed, weights equal to the device step's up to the last bit."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distill_helpers import ALGORITHMS, TINY_WAN, run_distill

from phased_dmd_mp.conditioning import Conditions
from phased_dmd_mp.distill import host_optimizer
from phased_dmd_mp.distill.models import VelocityModel
from phased_dmd_mp.distill.optim import TrainedModel, storage_bytes
from phased_dmd_mp.distill.trainer import Distiller
from phased_dmd_mp.models import ExecutionConfig, build
from phased_dmd_mp.models.convert import read_diffusers_dir
from phased_dmd_mp.parallel.offload import HOST
from phased_dmd_mp.parallel.state import initialize

ROOT = Path(__file__).parents[1]
WORKER = ROOT / "tests" / "parallel" / "offload_worker.py"
UPDATES = 3


def train(offload: bool, dtype: str = "bfloat16", device: str = "cpu") -> tuple:
    """Three clipped updates (norm ~1.1 > grad_clip 0.5) with an EMA of a tiny Wan DiT."""
    initialize(1, 1)
    torch.manual_seed(0)
    module = build(TINY_WAN, ExecutionConfig(dtype=dtype)).to(device)
    model = VelocityModel(module)
    data = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 1, 8, 8, generator=data).to(device)
    t = torch.rand(4, generator=data).to(device)
    cond = Conditions(text=torch.randn(4, 3, TINY_WAN.text_dim, generator=data)).to(device)
    target = torch.randn(4, 1, 1, 8, 8, generator=data).to(device)
    trained = TrainedModel(
        model.parameters(), module.config, lr=1e-3, betas=(0.0, 0.999), weight_decay=0.01,
        grad_clip=0.5, main_params_dtype="float32", shard=False, offload=offload,
    )  # fmt: skip
    norms = []
    for _ in range(UPDATES):
        trained.zero_grad()
        model.train(x, t, cond, lambda v, i: (v - target[i]).square().mean(), micro_batch_size=2)
        norms.append(trained.step())
        trained.update_ema(0.9)
    return trained, norms


def optimizer_tensors(trained: TrainedModel) -> list[torch.Tensor]:
    """Main parameters, Adam moments and EMA: what offload moves to the host."""
    mains = [m[0] for m in trained.main if m is not None]
    state = [trained._state(m)[key] for m in mains for key in ("exp_avg", "exp_avg_sq")]
    return mains + state + [e for e in trained.ema if e is not None]


def assert_identical(ours: TrainedModel, theirs: TrainedModel) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    for key in ("main_params", "exp_avg", "exp_avg_sq", "ema"):
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key], strict=True)), key
    assert all(torch.equal(x, y) for x, y in zip(ours.parameters, theirs.parameters))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("chunk_elements", [None, 100], ids=["one_chunk", "chunks_of_100"])
def test_host_step_equals_the_device_step(monkeypatch, dtype, chunk_elements):
    if chunk_elements:  # the GPU's pipelined path: many chunks through two staging slots
        monkeypatch.setattr(host_optimizer, "CHUNK_ELEMENTS", chunk_elements)
    device, device_norms = train(offload=False, dtype=dtype)
    host, host_norms = train(offload=True, dtype=dtype)
    if chunk_elements:
        assert len(host.host.chunks) > 10
    assert host_norms == device_norms and min(host_norms) > 0.5  # every update clipped
    assert_identical(host, device)


def test_device_resident_optimizer_bytes_are_zero_with_offload():
    """Counted by where each tensor's storage lives: the host arena (pinned on a GPU machine)
    or not; on a GPU the same split is the tensors' device (test below)."""
    for offload in (False, True):
        trained, _ = train(offload=offload)
        count = sum(p.numel() for p in trained.parameters)
        state = optimizer_tensors(trained)
        on_device = storage_bytes([t for t in state if not HOST.holds(t)])
        on_host = storage_bytes([t for t in state if HOST.holds(t)])
        role_on_device = storage_bytes([t for t in trained.tensors() if not HOST.holds(t)])
        if offload:  # main 4 + moments 8 + EMA 4 per parameter, all on the host
            assert (on_device, on_host / count) == (0, 16.0)
            assert role_on_device / count == 6.0  # bf16 weights 2 + fp32 gradient buffer 4
        else:
            assert (on_device / count, on_host) == (16.0, 0)
            assert role_on_device / count == 22.0  # optim.py's 18 + EMA 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_state_is_pinned_host_memory_and_weights_match_the_device_step():
    device, _ = train(offload=False, device="cuda")
    before = torch.cuda.memory_allocated()
    del device
    torch.cuda.empty_cache()
    freed_without_offload = before - torch.cuda.memory_allocated()
    host, _ = train(offload=True, device="cuda")
    state = optimizer_tensors(host)
    assert all(t.device.type == "cpu" and t.is_pinned() for t in state)
    assert all(p.device.type == "cuda" for p in host.parameters)
    count = sum(p.numel() for p in host.parameters)
    assert freed_without_offload >= 22 * count  # the device step's role held its state there
    device, _ = train(offload=False, device="cuda")
    # the same AdamW formula in CUDA's and the CPU's fused kernels: last-bit differences only
    for a, b in zip(host.state_dict()["main_params"], device.state_dict()["main_params"]):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-6, atol=1e-7)


# --- whole runs: resume with offload switched ----------------------------------------------

LORA_BF16 = [*ALGORITHMS["phased_dmd_lora"], "dtype=bfloat16", "grad_clip=1e-7"]


def preempted_after_one_iteration(monkeypatch, out: Path, teacher: Path, *overrides) -> None:
    original = Distiller._iteration

    def preempted(self):
        metrics = original(self)
        if self.state.iteration == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # checkpoint and stop, as on preemption
        return metrics

    monkeypatch.setattr(Distiller, "_iteration", preempted)
    assert run_distill(out, teacher, *overrides) == 0
    monkeypatch.setattr(Distiller, "_iteration", original)
    assert not (out / "export").exists()


def final_state(run: Path) -> dict:
    checkpoint = max((run / "checkpoints").iterdir())
    return torch.load(checkpoint / "rank-tp0-pp0.pt", weights_only=False)["optimizers"]


def test_resume_with_offload_switched_either_way_is_bit_exact(tmp_path, teacher, monkeypatch):
    """LoRA experts with an EMA, bf16 with fp32 main params, every update clipped: 4 updates
    straight without offload; 1 with offload, then 3 without; 1 without, then 3 with."""
    straight = tmp_path / "straight"
    assert run_distill(straight, teacher, *LORA_BF16) == 0
    for first, then in (("true", "false"), ("false", "true")):
        run = tmp_path / f"{first}_then_{then}"
        preempted_after_one_iteration(
            monkeypatch, run, teacher, *LORA_BF16, f"optimizer_offload={first}"
        )
        resumed = run_distill(run, teacher, *LORA_BF16, f"optimizer_offload={then}",
                              extra=["--resume"])  # fmt: skip
        assert resumed == 0
        for name in ("expert_1", "expert_2"):  # the adapters merged into the base
            _, _, ours = read_diffusers_dir(run / "export" / name)
            _, _, theirs = read_diffusers_dir(straight / "export" / name)
            assert all(torch.equal(ours[k], theirs[k]) for k in theirs), (run.name, name)
        ours, theirs = final_state(run), final_state(straight)
        for role in theirs:
            for key in ("main_params", "exp_avg", "exp_avg_sq", "ema"):
                a, b = ours[role][key], theirs[role][key]
                assert (a is None) == (b is None), (role, key)
                assert a is None or all(torch.equal(x, y) for x, y in zip(a, b)), (role, key)


@pytest.mark.parametrize(
    "name, layout",
    [
        # TP = 2, LoRA experts with EMA, recomputed layers whose inputs go to the host too
        ("phased_dmd_lora", ["tensor_parallel=2", "recompute=true"]),
        ("phased_dmd_sgts", ["ema_decay=0.9"]),  # DP = 2, full experts, sharded state and EMA
    ],
    ids=["tp2_lora", "dp2_sharded_full"],
)
def test_offload_under_torchrun_is_bit_exact(tmp_path, teacher, name, layout):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(WORKER), str(teacher), str(tmp_path), name, "dtype=bfloat16", "grad_clip=1e-7",
        *layout,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    errors = [line for line in result.stderr.splitlines() if line.startswith(("rank", "[rank"))]
    assert result.returncode == 0, "\n".join(errors[-40:]) or result.stderr[-4000:]
    assert "bit-identical with offload" in result.stdout


def test_offload_without_fp32_main_params_is_one_line(tmp_path, teacher, capsys):
    with pytest.raises(SystemExit):
        run_distill(tmp_path, teacher, "dtype=bfloat16", "main_params_dtype=bfloat16",
                    "distributed_optimizer=false", "optimizer_offload=true")  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optimizer_offload" in err and "main_params_dtype" in err

"""Tensor (with and without sequence parallelism), pipeline, context and data parallelism on
CPU (gloo, torchrun): outputs and gradients of every layout equal the single-process model's
within 1e-5, for Wan (T2V, I2V with image tokens, TI2V with per-token timesteps) and Qwen-Image.
Wan T2V's 9 tokens, TI2V's 10 and Qwen-Image's 5 text tokens do not divide by 4 (and 9 not by
2): sequence and context parallelism pad them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phased_dmd_mp.models import ExecutionConfig, QwenImageConfig, WanConfig, build, convert
from phased_dmd_mp.models.convert import model_kind

ROOT = Path(__file__).parents[1]
WORKER = ROOT / "tests" / "parallel" / "dit_worker.py"
SAMPLES = 4  # divisible by every data-parallel size below

WAN = {
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "in_channels": 5,
    "out_channels": 3,
    "text_dim": 12,
    "freq_dim": 16,
    "ffn_dim": 48,
    "num_layers": 4,
}
ARCHS = {
    "wan_t2v": WanConfig(**WAN),
    "wan_i2v": WanConfig(**WAN, image_dim=10, added_kv_proj_dim=32),
    "wan_ti2v": WanConfig(**WAN, cross_attn_norm=False),
    "qwen_image": QwenImageConfig(
        in_channels=8,
        out_channels=2,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=12,
        axes_dims_rope=(2, 2, 4),
    ),
}


# Latent (frames, height, width): 2 x 2 x 3 = 12 tokens, 1 x 3 x 3 = 9, 1 x 2 x 5 = 10.
LATENT_GRIDS = {"wan_i2v": (2, 4, 6), "wan_t2v": (1, 6, 6), "wan_ti2v": (1, 4, 10)}


def sample_inputs(name: str, arch, generator) -> dict:
    if name.startswith("wan"):
        grid = LATENT_GRIDS[name]
        inputs = {
            "hidden_states": torch.randn(1, arch.in_channels, *grid, generator=generator),
            "timestep": torch.rand(1, generator=generator) * 1000,
            "encoder_hidden_states": torch.randn(1, 5, arch.text_dim, generator=generator),
        }
        if arch.image_dim is not None:
            inputs["encoder_hidden_states_image"] = torch.randn(
                1, 3, arch.image_dim, generator=generator
            )
        if name == "wan_ti2v":
            tokens = grid[0] * (grid[1] // 2) * (grid[2] // 2)
            inputs["timestep"] = torch.rand(1, tokens, generator=generator) * 1000
        return inputs
    return {
        "hidden_states": torch.randn(1, 12, arch.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, 5, arch.joint_attention_dim, generator=generator),
        "encoder_hidden_states_mask": (torch.arange(5) < 3 + torch.randint(3, (1,))).long()[None],
        "timestep": torch.rand(1, generator=generator),
        "img_shapes": [[(1, 3, 4)]],
    }


def write_reference(path: Path, name: str, recompute: bool = False) -> Path:
    """Single-process outputs, losses and gradients of the mean loss over SAMPLES samples."""
    arch = ARCHS[name]
    torch.manual_seed(0)
    model = build(arch, ExecutionConfig())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    samples, outputs, losses = [], [], []
    for _ in range(SAMPLES):
        inputs = sample_inputs(name, arch, generator)
        output = model(**inputs)
        weight = torch.randn(output.shape, generator=generator)
        loss = (output * weight).sum()
        (loss / SAMPLES).backward()
        samples.append((inputs, weight))
        outputs.append(output.detach())
        losses.append(loss.detach())
    target = path / f"{name}{'_recompute' if recompute else ''}.pt"
    torch.save(
        {
            "model": model_kind(arch),
            "arch": arch.__dict__,
            "recompute": recompute,
            "weights": {k: v for k, v in model.state_dict().items() if v is not None},
            "samples": samples,
            "outputs": outputs,
            "losses": losses,
            "grads": {n: p.grad for n, p in model.named_parameters()},
        },
        target,
    )
    return target


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    path = tmp_path_factory.mktemp("references")
    refs = {name: write_reference(path, name) for name in ARCHS}
    refs["wan_i2v_recompute"] = write_reference(path, "wan_i2v", recompute=True)
    return refs


def torchrun(nproc: int, layouts: list[str], references: list[Path], save: Path | None = None):
    """tests/parallel/dit_worker.py on `nproc` ranks: each layout (e.g. tp2-cp2-sp) in turn."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", str(WORKER), *map(str, references),
        *([f"--save={save}"] if save else []), "--layouts", *layouts,
    ]  # fmt: skip
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=500, check=False
    )
    # The workers' own messages and tracebacks, without the import-time warnings.
    errors = [line for line in result.stderr.splitlines() if line.startswith(("rank", "[rank"))]
    assert result.returncode == 0, "\n".join(errors[-60:]) or result.stderr[-4000:]


def test_tensor_sequence_and_context_parallel_2(references):
    torchrun(2, ["tp2", "tp2-sp", "cp2"], list(references.values()))


def assert_saved_checkpoint_is(path: Path, reference: Path, layout: tuple[int, int]) -> None:
    """save_checkpoint wrote one shard per model-parallel rank, together the whole model."""
    arch, tp, pp = convert.read_layout(path)
    assert (tp, pp) == layout
    assert len(list(path.glob("*.safetensors"))) == tp * pp
    whole = convert.unshard(convert.read_sharded_dir(path)[1], arch)
    expected = torch.load(reference, weights_only=False)["weights"]
    assert whole.keys() == expected.keys()
    assert all(torch.equal(whole[k], v) for k, v in expected.items())


def test_pipeline_parallel_2(references, tmp_path):
    torchrun(2, ["pp2"], list(references.values()), save=tmp_path)
    assert_saved_checkpoint_is(tmp_path, references["wan_t2v"], (1, 2))


def test_four_ranks(references, tmp_path):
    """TP = 2 x DP = 2; TP = 2 x CP = 2 with sequence parallelism and without; pipeline stages
    carrying sequence-parallel rows (TP = 2 x PP = 2); CP = 2 x DP = 2."""
    layouts = ["tp2", "tp2-cp2-sp", "tp2-cp2", "tp2-pp2-sp", "cp2"]
    torchrun(4, layouts, list(references.values()), save=tmp_path)
    assert_saved_checkpoint_is(tmp_path, references["wan_t2v"], (2, 1))

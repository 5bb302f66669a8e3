"""Tensor, pipeline and data parallelism on CPU (gloo, torchrun): outputs and gradients of
every layout equal the single-process model's, for Wan (I2V with image tokens, TI2V with
per-token timesteps) and Qwen-Image."""

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


def sample_inputs(name: str, arch, generator) -> dict:
    if name.startswith("wan"):
        inputs = {
            "hidden_states": torch.randn(1, arch.in_channels, 2, 4, 6, generator=generator),
            "timestep": torch.rand(1, generator=generator) * 1000,
            "encoder_hidden_states": torch.randn(1, 5, arch.text_dim, generator=generator),
        }
        if arch.image_dim is not None:
            inputs["encoder_hidden_states_image"] = torch.randn(
                1, 3, arch.image_dim, generator=generator
            )
        if name == "wan_ti2v":
            inputs["timestep"] = torch.rand(1, 2 * 2 * 3, generator=generator) * 1000
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


def torchrun(nproc: int, tp: int, pp: int, references: list[Path], save: Path | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", str(WORKER), f"--tp={tp}", f"--pp={pp}",
        *([f"--save={save}"] if save else []), *map(str, references),
    ]  # fmt: skip
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=400, check=False
    )
    # The workers' own messages and tracebacks, without the import-time warnings.
    errors = [line for line in result.stderr.splitlines() if line.startswith(("rank", "[rank"))]
    assert result.returncode == 0, "\n".join(errors[-60:]) or result.stderr[-4000:]


def test_tensor_parallel_2(references):
    torchrun(2, tp=2, pp=1, references=list(references.values()))


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
    torchrun(2, tp=1, pp=2, references=list(references.values()), save=tmp_path)
    assert_saved_checkpoint_is(tmp_path, references["wan_i2v"], (1, 2))


def test_tensor_parallel_2_x_data_parallel_2(references, tmp_path):
    qwen, wan = references["qwen_image"], references["wan_ti2v"]
    torchrun(4, tp=2, pp=1, references=[qwen, wan], save=tmp_path)
    assert_saved_checkpoint_is(tmp_path, qwen, (2, 1))

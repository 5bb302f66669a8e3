"""LoRA generator experts on the DiTs: a fresh adapter is the base, adapters switch, only the
active one gets gradients, merged weights equal the adapter path, the export loads into
diffusers with the same output, files round-trip, and TP=2 (with and without sequence
parallelism), PP=2, CP=2 and TP=2 x CP=2 (torchrun, gloo) equal one process in outputs and
adapter gradients."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.models import ExecutionConfig, QwenImageConfig, WanConfig, build, convert
from phased_dmd_mp.models.convert import model_kind
from phased_dmd_mp.models.lora import (
    adapter_parameters,
    add_lora,
    default_targets,
    load_lora,
    lora_from_diffusers,
    lora_state_dict,
    lora_to_diffusers,
    merged_state_dict,
    read_diffusers_lora,
    save_lora,
    set_active_adapter,
    shard_lora,
    unshard_lora,
)
from phased_dmd_mp.parallel import fp8

ROOT = Path(__file__).parents[1]
WORKER = ROOT / "tests" / "parallel" / "lora_worker.py"

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
WAN_I2V = WanConfig(**WAN, image_dim=10, added_kv_proj_dim=32)
QWEN = QwenImageConfig(
    in_channels=8,
    out_channels=2,
    num_layers=4,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=12,
    axes_dims_rope=(2, 2, 4),
)
QWEN_ALL_TARGETS = (*default_targets(QWEN), "img_modulation", "txt_modulation")


def randomize(params, seed: int, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=generator))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def inputs(arch, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    if isinstance(arch, WanConfig):
        args = {
            # 2 x 3 x 3 = 18 tokens: padded to 20 at TP x CP = 4
            "hidden_states": torch.randn(1, arch.in_channels, 2, 6, 6, generator=generator),
            "timestep": torch.rand(1, generator=generator) * 1000,
            "encoder_hidden_states": torch.randn(1, 5, arch.text_dim, generator=generator),
        }
        if arch.image_dim is not None:
            args["encoder_hidden_states_image"] = torch.randn(
                1, 3, arch.image_dim, generator=generator
            )
        return args
    return {
        "hidden_states": torch.randn(1, 12, arch.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, 5, arch.joint_attention_dim, generator=generator),
        "encoder_hidden_states_mask": torch.tensor([[1, 1, 1, 1, 0]]),
        "timestep": torch.rand(1, generator=generator),
        "img_shapes": [[(1, 3, 4)]],
    }


def base_model(arch, execution: ExecutionConfig | None = None):
    torch.manual_seed(0)
    model = build(arch, execution)
    randomize(model.parameters(), 0)
    return model


def lora_model(arch, targets=None, num_adapters: int = 3, execution=None):
    """A randomized base with `num_adapters` randomized rank-4 adapters (B no longer zero)."""
    model = base_model(arch, execution)
    add_lora(model, rank=4, alpha=8, num_adapters=num_adapters, targets=targets)
    for adapter in range(num_adapters):
        randomize(adapter_parameters(model, adapter), seed=10 + adapter, scale=0.3)
    return model


def test_fresh_adapters_are_the_base_and_only_the_active_one_acts():
    model, args = base_model(WAN_I2V), inputs(WAN_I2V)
    with torch.no_grad():
        base = model(**args)
        config = add_lora(model, rank=4, alpha=8, num_adapters=3)
        assert config.scale == 2 and "cross_attention.linear_kv_image" in config.targets
        assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora." not in n)
        for adapter in range(3):
            set_active_adapter(model, adapter)
            assert torch.equal(model(**args), base)

        for adapter in range(3):
            randomize(adapter_parameters(model, adapter), seed=adapter, scale=0.3)
        outputs = []
        for adapter in range(3):
            set_active_adapter(model, adapter)
            outputs.append(model(**args))
        assert relative_error(outputs[0], base) > 1e-2
        assert relative_error(outputs[1], outputs[0]) > 1e-2
        randomize(adapter_parameters(model, 2), seed=7)  # another adapter changes ...
        assert set_active_adapter(model, 0) == 2
        assert torch.equal(model(**args), outputs[0])  # ... nothing for adapter 0
        set_active_adapter(model, None)
        assert torch.equal(model(**args), base)


def test_adapters_are_in_the_state_dict_and_split_ones_marked_like_megatrons():
    model, args = lora_model(WAN_I2V, num_adapters=2), inputs(WAN_I2V)
    layer = model.decoder.layers[0]
    column, row = layer.self_attention.linear_qkv.lora, layer.mlp.linear_fc2.lora
    assert (column.B[0].tensor_model_parallel, column.B[0].partition_dim) == (True, 0)
    assert (row.A[0].tensor_model_parallel, row.A[0].partition_dim) == (True, 1)
    assert not hasattr(column.A[0], "tensor_model_parallel")
    assert not hasattr(row.B[0], "tensor_model_parallel")

    resumed = base_model(WAN_I2V)  # a checkpoint of the LoRA model restores both adapters
    add_lora(resumed, rank=4, alpha=8, num_adapters=2)
    state = model.state_dict()
    assert "decoder.layers.3.mlp.linear_fc2.lora.B.1" in state
    resumed.load_state_dict(state, strict=True)
    with torch.no_grad():
        for adapter in (0, 1):
            set_active_adapter(model, adapter)
            set_active_adapter(resumed, adapter)
            assert torch.equal(resumed(**args), model(**args))


@pytest.mark.parametrize(
    "arch, targets, recompute",
    [(WAN_I2V, None, True), (QWEN, QWEN_ALL_TARGETS, False)],
    ids=["wan_i2v_recompute", "qwen_image"],
)
def test_gradients_reach_the_active_adapter_only_and_equal_the_merged_weights(
    arch, targets, recompute
):
    """The adapter path is exactly base + scale B A: the merged model (no recompute) gives the
    same output, and the adapter gradients are dL/dB = scale dL/dW A^T, dL/dA = scale B^T dL/dW."""
    execution = ExecutionConfig(recompute=recompute)
    model, args = lora_model(arch, targets, execution=execution), inputs(arch)
    set_active_adapter(model, 1)
    output = model(**args)
    weight = torch.randn(output.shape, generator=torch.Generator().manual_seed(5))
    (output * weight).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora." not in n)
    assert all(p.grad is None for i in (0, 2) for p in adapter_parameters(model, i))
    # (Qwen-Image's last text-stream linears get zero gradients: the head reads images only.)
    assert all(p.grad is not None for p in adapter_parameters(model, 1))

    merged = build(arch, ExecutionConfig(), init_weights=False)
    merged.load_state_dict(merged_state_dict(model, 1), strict=True)
    merged_output = merged(**args)
    assert relative_error(merged_output, output) < 1e-5
    (merged_output * weight).sum().backward()
    scale = model.lora_config.scale
    for local, layer in enumerate(model.decoder.layers):
        for target in model.lora_config.targets:
            adapters = layer.get_submodule(target).lora
            A, B = adapters.A[1], adapters.B[1]
            weight_grad = merged.decoder.layers[local].get_submodule(target).weight.grad
            name = f"layer {local} {target}"
            assert relative_error(B.grad, scale * weight_grad @ A.detach().T) < 1e-4, name
            assert relative_error(A.grad, scale * B.detach().T @ weight_grad) < 1e-4, name


@pytest.mark.parametrize(
    "pipeline_cls, arch, targets",
    [("WanPipeline", WAN_I2V, None), ("QwenImagePipeline", QWEN, QWEN_ALL_TARGETS)],
    ids=["wan_i2v", "qwen_image"],
)
def test_exports_load_into_diffusers_with_the_same_output(tmp_path, pipeline_cls, arch, targets):
    """The LoRA file through the pipeline's `load_lora_weights`, and the merged expert through
    the converter, give our adapter's output in diffusers."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")  # diffusers loads LoRA files through PEFT
    model = lora_model(arch, targets)
    set_active_adapter(model, 1)
    args = inputs(arch)
    theirs_args = dict(args)
    if isinstance(arch, WanConfig):  # diffusers finds the CLIP tokens after 512 text tokens
        text = torch.randn(1, 512, arch.text_dim, generator=torch.Generator().manual_seed(2))
        theirs_args["encoder_hidden_states"] = args["encoder_hidden_states"] = text
    with torch.no_grad():
        expected = model(**args)

        class_name = convert.DIFFUSERS_CLASSES[model_kind(arch)]
        base = convert.ours_to_diffusers(merged_state_dict(model, None), arch)
        transformer = getattr(diffusers, class_name)(**arch.to_diffusers()).eval()
        transformer.load_state_dict(base, strict=True)
        save_lora(model, 1, tmp_path / "lora")
        components = {"transformer": transformer, "vae": None, "scheduler": None}
        components |= {"text_encoder": None, "tokenizer": None}
        getattr(diffusers, pipeline_cls)(**components).load_lora_weights(tmp_path / "lora")
        assert relative_error(transformer(**theirs_args).sample, expected) < 1e-5

        merged = convert.ours_to_diffusers(merged_state_dict(model, 1), arch)
        convert.write_diffusers_dir(tmp_path / "merged", arch, merged)
        expert = getattr(diffusers, class_name).from_pretrained(tmp_path / "merged").eval()
        assert relative_error(expert(**theirs_args).sample, expected) < 1e-5


def test_lora_files_round_trip_into_another_adapter(tmp_path):
    model = lora_model(WAN_I2V)
    save_lora(model, 2, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["pytorch_lora_weights.safetensors"]
    whole, rank, alpha = read_diffusers_lora(tmp_path, WAN_I2V)
    assert (rank, alpha) == (4, 4)  # the scale alpha / rank = 2 is folded into lora_B
    saved = lora_state_dict(model, 2)
    assert whole.keys() == saved.keys()
    folded = {k: 2 * v if k.endswith(".lora_B") else v for k, v in saved.items()}
    assert all(torch.equal(whole[k], v) for k, v in folded.items())

    load_lora(model, 0, tmp_path / "pytorch_lora_weights.safetensors")
    loaded = lora_state_dict(model, 0)
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())

    theirs = lora_to_diffusers(saved, WAN_I2V)
    qkv = "decoder.layers.0.self_attention.linear_qkv"
    to_q, to_k = "blocks.0.attn1.to_q", "blocks.0.attn1.to_k"
    assert torch.equal(theirs[f"{to_q}.lora_A.weight"], saved[f"{qkv}.lora_A"])
    assert theirs[f"{to_k}.lora_B.weight"].shape == (32, 4)  # k's rows of the fused B
    shards = shard_lora(saved, WAN_I2V, tensor_parallel=2, pipeline_parallel=2)
    assert shards[(1, 1)]["decoder.layers.1.mlp.linear_fc2.lora_A"].shape == (4, 24)
    unsharded = unshard_lora(shards, WAN_I2V)
    assert all(torch.equal(unsharded[k], v) for k, v in saved.items())


def test_mistakes_are_clear_errors(tmp_path):
    model = base_model(WAN_I2V)
    with pytest.raises(ConfigError, match="LoRA targets must be distinct names among"):
        add_lora(model, rank=4, alpha=8, num_adapters=1, targets=["attn1.to_q"])
    with pytest.raises(ConfigError, match="rank and num_adapters must be >= 1"):
        add_lora(model, rank=0, alpha=8, num_adapters=1)
    with pytest.raises(ConfigError, match="call add_lora first"):
        set_active_adapter(model, 0)
    replaced = model.decoder.layers[1].mlp
    replaced.linear_fc1 = torch.nn.Linear(32, 48)  # as a Transformer Engine linear would be
    with pytest.raises(ConfigError, match="Transformer Engine linears"):
        add_lora(model, rank=4, alpha=8, num_adapters=1)

    model = lora_model(WAN_I2V, num_adapters=2)
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        add_lora(model, rank=4, alpha=8, num_adapters=1)
    with pytest.raises(ValueError, match=r"None or an int in \[0, 2\)"):
        set_active_adapter(model, 2)
    with pytest.raises(ValueError, match=r"an int in \[0, 2\)"):
        adapter_parameters(model, None)

    save_lora(model, 0, tmp_path)
    other = base_model(WAN_I2V)
    add_lora(other, rank=8, alpha=8, num_adapters=1)
    with pytest.raises(ConfigError, match="holds a rank 4 LoRA; this model's adapters have rank 8"):
        load_lora(other, 0, tmp_path)
    theirs = lora_to_diffusers(lora_state_dict(model, 0), WAN_I2V)
    theirs["blocks.0.attn1.to_k.lora_A.weight"] = theirs["blocks.0.attn1.to_k.lora_A.weight"] + 1
    with pytest.raises(ConfigError, match="different lora_A"):
        lora_from_diffusers(theirs, WAN_I2V)


def test_fp8_torch_backend_linears_take_adapters(monkeypatch):
    """The FP8 "torch" linears (run here through torch._scaled_mm's CPU kernel) are megatron's
    subclasses: a fresh adapter keeps the FP8 output, a trained one is the float32 LoRA model's
    up to FP8 rounding, and gradients reach the adapter."""
    monkeypatch.setattr(fp8, "fp8_supported", lambda: True)
    arch = WanConfig(**{**WAN, "attention_head_dim": 16, "text_dim": 32, "ffn_dim": 64})
    reference = lora_model(arch, num_adapters=1)
    quantized = build(arch, ExecutionConfig(fp8="torch"))
    assert isinstance(quantized.decoder.layers[0].mlp.linear_fc1, fp8.FP8ColumnParallelLinear)
    quantized.load_state_dict(merged_state_dict(reference, None))
    args = inputs(arch)
    with torch.no_grad():
        base = quantized(**args)
    add_lora(quantized, rank=4, alpha=8, num_adapters=1)
    set_active_adapter(quantized, 0)
    assert torch.equal(quantized(**args), base)
    with torch.no_grad():
        for ours, theirs in zip(adapter_parameters(quantized, 0), adapter_parameters(reference, 0)):
            ours.copy_(theirs)
    set_active_adapter(reference, 0)
    output = quantized(**args)
    assert relative_error(output, reference(**args).detach()) < 0.1
    output.square().sum().backward()
    assert all(p.grad is not None for p in adapter_parameters(quantized, 0))


def write_reference(path: Path, name: str, arch, targets) -> Path:
    """Single-process outputs and adapter-1 gradients of the mean loss over two samples, with
    the base weights, the initial and the trained adapters."""
    model = base_model(arch)
    lora = {"rank": 4, "alpha": 8, "num_adapters": 2, "targets": targets}
    add_lora(model, **lora)
    initial = {k: v.clone() for k, v in lora_state_dict(model, 0).items()}
    for adapter in range(2):
        randomize(adapter_parameters(model, adapter), seed=10 + adapter, scale=0.3)
    set_active_adapter(model, 1)
    generator = torch.Generator().manual_seed(3)
    samples, outputs = [], []
    for seed in range(2):
        args = inputs(arch, seed)
        output = model(**args)
        weight = torch.randn(output.shape, generator=generator)
        ((output * weight).sum() / 2).backward()
        samples.append((args, weight))
        outputs.append(output.detach())
    names = list(lora_state_dict(model, 1))
    target = path / f"{name}.pt"
    torch.save(
        {
            "model": model_kind(arch),
            "arch": arch.__dict__,
            "lora": lora,
            "base": merged_state_dict(model, None),
            "initial": initial,
            "adapters": [lora_state_dict(model, adapter) for adapter in range(2)],
            "samples": samples,
            "outputs": outputs,
            "grads": {n: p.grad for n, p in zip(names, adapter_parameters(model, 1))},
        },
        target,
    )
    return target


def run_lora_worker(tmp_path, nproc: int, layouts: list[str]) -> None:
    """tests/parallel/lora_worker.py on `nproc` ranks over `layouts` (the worker says what it
    checks); here, the adapter that `save_lora` gathered from the shards is the reference's."""
    references = {
        "wan_i2v": write_reference(tmp_path, "wan_i2v", WAN_I2V, None),
        "qwen_image": write_reference(tmp_path, "qwen_image", QWEN, QWEN_ALL_TARGETS),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", str(WORKER), *map(str, references.values()),
        "--save", str(tmp_path / "saved"), "--layouts", *layouts,
    ]  # fmt: skip
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=400, check=False
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith(("rank", "[rank"))]
    assert result.returncode == 0, "\n".join(errors[-60:]) or result.stderr[-4000:]
    for name, path in references.items():
        reference = torch.load(path, weights_only=False)
        scale = reference["lora"]["alpha"] / reference["lora"]["rank"]  # folded into lora_B
        adapter = reference["adapters"][1]
        expected = {k: v * scale if k.endswith(".lora_B") else v for k, v in adapter.items()}
        arch = WAN_I2V if name == "wan_i2v" else QWEN
        for layout in layouts:
            whole, rank, alpha = read_diffusers_lora(tmp_path / "saved" / layout / name, arch)
            assert whole.keys() == expected.keys() and rank == alpha
            assert all(torch.equal(whole[k], v) for k, v in expected.items()), (name, layout)


def test_tensor_sequence_pipeline_and_context_parallel_2_equal_one_process(tmp_path):
    run_lora_worker(tmp_path, 2, ["tp2", "pp2", "tp2-sp", "cp2"])


def test_tensor_parallel_2_x_context_parallel_2_equal_one_process(tmp_path):
    """Four ranks: TP = 2 x CP = 2 with sequence parallelism, and TP = 2 x PP = 2 with it."""
    run_lora_worker(tmp_path, 4, ["tp2-cp2-sp", "tp2-pp2-sp"])


def test_a_loader_that_ignores_the_metadata_merges_the_same_weights(tmp_path):
    """The LoRA file carries alpha in its tensors: diffusers merges the same weights from it
    with and without its metadata (without, it takes alpha = rank: the recipes' rank 64, alpha 8
    used to be applied at 8x), and they are our merged expert's."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    from phased_dmd_mp.models.lora import LORA_FILE

    model = lora_model(WAN_I2V)  # rank 4, alpha 8: scale 2
    save_lora(model, 1, tmp_path / "with")
    (tmp_path / "without").mkdir()
    save_file(load_file(tmp_path / "with" / LORA_FILE), tmp_path / "without" / LORA_FILE)
    base = convert.ours_to_diffusers(merged_state_dict(model, None), WAN_I2V)
    merged = {}
    for name in ("with", "without"):
        transformer = diffusers.WanTransformer3DModel(**WAN_I2V.to_diffusers()).eval()
        transformer.load_state_dict(base, strict=True)
        components = {"transformer": transformer, "vae": None, "scheduler": None}
        pipe = diffusers.WanPipeline(**components, text_encoder=None, tokenizer=None)
        pipe.load_lora_weights(tmp_path / name)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        merged[name] = transformer.state_dict()
    assert merged["with"].keys() == merged["without"].keys() == base.keys()
    assert all(torch.equal(merged["with"][k], merged["without"][k]) for k in base)
    ours = convert.ours_to_diffusers(merged_state_dict(model, 1), WAN_I2V)
    assert max(relative_error(merged["with"][k], ours[k]) for k in ours) < 1e-6
    changed = [k for k in base if not torch.equal(merged["with"][k], base[k])]
    assert len(changed) > 10  # the adapter did act

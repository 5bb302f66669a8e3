"""The exported generator in stock diffusers: the scheduler runs the trained step table, two
experts route as trained (the shift-7 tie on Wan2.2's boundary included), the pipeline folder
loads with DiffusionPipeline.from_pretrained and samples our sampler's latents, and the LoRAs
load in both formats to the merged weights."""

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from test_models_lora import QWEN, WAN_I2V, lora_model  # noqa: E402

from phased_dmd_mp.conditioning import Conditions, dit_velocity  # noqa: E402
from phased_dmd_mp.data.teacher import load_diffusers_transformer  # noqa: E402
from phased_dmd_mp.distill.diffusers_pipeline import (  # noqa: E402
    COMFY_FILE,
    PipelineUnsupported,
    passes_sigmas,
    routing,
    scheduler_config,
    write_comfy_lora,
    write_pipeline,
)
from phased_dmd_mp.media import decode_latents, load_vae  # noqa: E402
from phased_dmd_mp.models import convert  # noqa: E402
from phased_dmd_mp.models.lora import merged_state_dict, save_lora  # noqa: E402
from phased_dmd_mp.sampling import sample  # noqa: E402
from phased_dmd_mp.schedule import timestep_table  # noqa: E402

TINY_WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    rope_max_seq_len=32,
)


def scheduler_sigmas(pipeline_cls, config: dict, steps: int) -> np.ndarray:
    """The sigmas the pipeline's denoising loop steps through, set up as its __call__ does."""
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    if passes_sigmas(pipeline_cls):  # QwenImagePipeline
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=0.8)
    else:
        scheduler.set_timesteps(steps)
    return scheduler.sigmas.double().numpy()


@pytest.mark.parametrize(
    "pipeline_cls", ["WanPipeline", "WanImageToVideoPipeline", "QwenImagePipeline"]
)
@pytest.mark.parametrize("steps, shift", [(1, 5.0), (2, 3.0), (4, 5.0), (4, 7.0), (8, 3.0)])
def test_scheduler_runs_the_trained_table(pipeline_cls, steps, shift):
    cls = getattr(diffusers, pipeline_cls)
    sigmas = scheduler_sigmas(cls, scheduler_config(cls, shift, renoise=False), steps)
    table = timestep_table(steps, shift).numpy()
    exact = pipeline_cls.startswith("Wan")  # FlowMap: float64, bit for bit; Qwen: float32
    np.testing.assert_allclose(sigmas, table, rtol=0, atol=0 if exact else 1e-7)
    # what the stock scheduler of Wan2.x would have run instead (shift 5, 4 steps: 1, .91, .72)
    stock = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    stock.set_timesteps(steps)
    if steps > 1:
        assert np.abs(stock.sigmas.double().numpy() - table).max() > 0.01
    if (steps, shift) == (4, 5.0):
        np.testing.assert_allclose(stock.timesteps, [1000, 909.7, 717.3, 24.4], atol=0.05)


def test_renoising_runs_only_where_diffusers_has_the_step():
    qwen = scheduler_config(diffusers.QwenImagePipeline, 3.0, renoise=True)
    assert qwen["stochastic_sampling"] is True  # x0 re-noised to the next sigma, DMD2's step
    with pytest.raises(PipelineUnsupported, match="re-noising"):
        scheduler_config(diffusers.WanPipeline, 5.0, renoise=True)


def test_routing_of_two_experts_and_what_diffusers_cannot_route():
    wan, qwen = diffusers.WanPipeline, diffusers.QwenImagePipeline
    table = timestep_table(4, 7.0).tolist()  # 1, 0.9545, 0.875, 0.7
    assert table[2] == 0.875  # the tie with Wan2.2's boundary
    boundary = routing(wan, table, [1, 1, 2, 2])
    assert table[2] < boundary < table[1]
    assert routing(qwen, table, [1, 1, 1, 1]) is None
    with pytest.raises(PipelineUnsupported, match="one expert") as info:
        routing(qwen, table, [1, 1, 2, 2])
    assert "num_phases: 1 for a pipeline stock diffusers loads" in str(info.value)
    with pytest.raises(PipelineUnsupported, match="4"):
        routing(wan, table, [1, 2, 3, 4])


def tiny_wan(seed: int):
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(**TINY_WAN)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def two_expert_export(tmp_path_factory):
    """A Wan2.2-style source pipeline (two experts, boundary 0.875, its own scheduler; no text
    encoder: prompts come as embeddings) and an export of a 4-step, 2-expert, shift-7 student."""
    root = tmp_path_factory.mktemp("wan22")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    scheduler = diffusers.UniPCMultistepScheduler(
        flow_shift=5.0, use_flow_sigmas=True, prediction_type="flow_prediction"
    )
    diffusers.WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=scheduler,
        transformer=tiny_wan(0),
        transformer_2=tiny_wan(1),
        boundary_ratio=0.875,
    ).save_pretrained(root / "source")
    export = root / "export"
    for k in (1, 2):
        tiny_wan(10 + k).save_pretrained(export / f"expert_{k}")
    summary = {
        "timesteps": timestep_table(4, 7.0).tolist(),
        "expert_of_step": [1, 1, 2, 2],
        "experts": ["expert_1", "expert_2"],
        "shift": 7.0,
        "step_noise": "deterministic",
    }
    (export / "generator.json").write_text(json.dumps(summary))
    return root / "source", export, write_pipeline(export, root / "source")


def test_pipeline_folder_links_instead_of_copying(two_expert_export):
    source, export, folder = two_expert_export
    index = json.loads((folder / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMapEulerDiscreteScheduler"]
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert (folder / "vae").is_symlink() and (folder / "vae").resolve() == (
        source / "vae"
    ).resolve()
    assert (folder / "transformer").resolve() == (export / "expert_1").resolve()
    assert (folder / "transformer_2").resolve() == (export / "expert_2").resolve()
    assert write_pipeline(export, source) == folder  # rewriting removes links, not their targets
    assert (source / "vae").is_dir() and (export / "expert_1" / "config.json").is_file()


def test_stock_pipeline_samples_our_latents_with_the_trained_routing(two_expert_export):
    """Shift 7 puts step 2 on t = 875, Wan2.2's boundary: training makes it expert 2's (phase
    2's first step), and so do our sampler and the exported pipeline."""
    _, export, folder = two_expert_export
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, text_encoder=None, tokenizer=None)
    calls = []
    for k, module in ((1, pipe.transformer), (2, pipe.transformer_2)):
        module.register_forward_pre_hook(
            lambda m, a, kw, k=k: calls.append((k, float(kw["timestep"][0]))), with_kwargs=True
        )
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(1, 12, 32, generator=generator)
    noise = torch.randn(1, 16, 2, 8, 8, generator=generator)
    call = dict(
        prompt_embeds=text,
        num_inference_steps=4,
        guidance_scale=1.0,
        height=64,
        width=64,
        num_frames=5,
    )
    theirs = pipe(**call, latents=noise.clone(), output_type="latent").frames
    assert [k for k, _ in calls] == [1, 1, 2, 2]
    np.testing.assert_allclose([t for _, t in calls], timestep_table(4, 7.0)[:4] * 1000, rtol=1e-12)

    experts = [load_diffusers_transformer(export / f"expert_{k}").eval() for k in (1, 2)]
    table = timestep_table(4, 7.0)
    cond = Conditions(text=text)

    def velocity(x, t):
        step = int((table[:-1] - t[0].item()).abs().argmin())
        expert = experts[0] if step < 2 else experts[1]
        return dit_velocity(expert, expert.arch)(x, t, cond)

    with torch.no_grad():
        ours = sample(velocity, noise, table)
    assert (ours - theirs).abs().max() < 1e-5
    video = pipe(**call, latents=noise.clone(), output_type="np").frames
    assert np.abs(decode_latents(load_vae(folder), ours).numpy() - video).max() < 1e-5


def test_one_expert_from_a_two_expert_source_runs_every_step(two_expert_export, tmp_path):
    """A one-expert student of Wan2.2 (e.g. dmd_sgts) clears transformer_2 and the boundary."""
    source, export, _ = two_expert_export
    single = tmp_path / "export"
    single.mkdir()
    (single / "expert_1").symlink_to(export / "expert_1")
    summary = json.loads((export / "generator.json").read_text())
    summary.update(expert_of_step=[1, 1, 1, 1], experts=["expert_1"])
    (single / "generator.json").write_text(json.dumps(summary))
    pipe = diffusers.DiffusionPipeline.from_pretrained(
        write_pipeline(single, source), text_encoder=None, tokenizer=None
    )
    assert pipe.transformer_2 is None and pipe.config.boundary_ratio is None
    latents = pipe(
        prompt_embeds=torch.zeros(1, 12, 32),
        num_inference_steps=4,
        height=64,
        width=64,
        num_frames=5,
        guidance_scale=1.0,
        output_type="latent",
    ).frames
    assert torch.isfinite(latents).all()


def test_lora_loads_in_both_formats_to_the_merged_weights(tmp_path):
    """Expert 1's LoRA into `transformer`, expert 2's with load_into_transformer_2 (Wan2.2),
    from diffusers' folder and from ComfyUI's file: the fused weights are our merged ones."""
    model = lora_model(WAN_I2V, num_adapters=2)
    arch = model.arch
    base = convert.ours_to_diffusers(merged_state_dict(model, None), arch)
    for k in (0, 1):
        save_lora(model, k, tmp_path / f"expert_{k + 1}_lora")
        write_comfy_lora(tmp_path / f"expert_{k + 1}_lora", "wan")
    comfy = tmp_path / "expert_1_lora" / COMFY_FILE
    from safetensors import safe_open

    with safe_open(comfy, framework="pt") as handle:
        keys = set(handle.keys())
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in keys
    assert "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight" in keys
    assert "diffusion_model.blocks.3.ffn.2.alpha" in keys

    for form in ("diffusers", "comfyui"):
        transformers = []
        for _ in range(2):
            transformer = diffusers.WanTransformer3DModel(**arch.to_diffusers())
            transformer.load_state_dict(base)
            transformers.append(transformer)
        pipe = diffusers.WanPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=None,
            scheduler=None,
            transformer=transformers[0],
            transformer_2=transformers[1],
            boundary_ratio=0.875,
        )
        for k in (1, 2):
            folder = tmp_path / f"expert_{k}_lora"
            pipe.load_lora_weights(
                folder if form == "diffusers" else folder / COMFY_FILE,
                adapter_name=f"expert_{k}",
                load_into_transformer_2=k == 2,
            )
        pipe.fuse_lora(components=["transformer", "transformer_2"])
        pipe.unload_lora_weights()
        for k, transformer in enumerate(transformers):
            merged = convert.ours_to_diffusers(merged_state_dict(model, k), arch)
            state = transformer.state_dict()
            assert state.keys() == merged.keys()
            for name, tensor in merged.items():
                torch.testing.assert_close(
                    state[name], tensor, rtol=1e-5, atol=1e-6, msg=f"{form} expert {k + 1} {name}"
                )


def test_qwen_image_lora_loads_in_comfyui_keys_to_the_merged_weights(tmp_path):
    model = lora_model(QWEN, num_adapters=1)
    save_lora(model, 0, tmp_path / "expert_1_lora")
    comfy = write_comfy_lora(tmp_path / "expert_1_lora", "qwen_image")
    from safetensors import safe_open

    with safe_open(comfy, framework="pt") as handle:
        assert "diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight" in handle.keys()
    transformer = diffusers.QwenImageTransformer2DModel(**QWEN.to_diffusers())
    transformer.load_state_dict(convert.ours_to_diffusers(merged_state_dict(model, None), QWEN))
    pipe = diffusers.QwenImagePipeline(
        transformer=transformer, vae=None, scheduler=None, text_encoder=None, tokenizer=None
    )
    pipe.load_lora_weights(comfy)
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    merged = convert.ours_to_diffusers(merged_state_dict(model, 0), QWEN)
    state = transformer.state_dict()
    for name, tensor in merged.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

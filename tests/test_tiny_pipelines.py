"""The tiny pipeline fixtures are real diffusers pipeline folders: stock
`DiffusionPipeline.from_pretrained` loads them and they generate on CPU."""

import json

import numpy as np
import pytest
import torch
from tiny_pipelines import QWEN_TEMPLATE

diffusers = pytest.importorskip("diffusers")


def load(folder):
    return diffusers.DiffusionPipeline.from_pretrained(folder)


def test_wan22_t2v_loads_and_generates_with_two_experts(tiny_pipeline):
    folder = tiny_pipeline("wan22_t2v")
    assert json.loads((folder / "model_index.json").read_text())["boundary_ratio"] == 0.875
    pipe = load(folder)
    assert type(pipe).__name__ == "WanPipeline" and pipe.transformer_2 is not None
    # the experts differ, so a two-expert run is not a one-expert run twice
    assert not torch.equal(pipe.transformer.proj_out.weight, pipe.transformer_2.proj_out.weight)
    video = pipe(
        "a red cat",
        height=16,
        width=16,
        num_frames=5,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).frames
    assert video.shape == (1, 5, 16, 16, 3) and np.isfinite(video).all()


def test_wan21_i2v_loads_and_generates_from_an_image(tiny_pipeline):
    from PIL import Image

    pipe = load(tiny_pipeline("wan21_i2v"))
    assert type(pipe).__name__ == "WanImageToVideoPipeline"
    assert pipe.image_encoder is not None and pipe.transformer.config.in_channels == 36
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8))
    video = pipe(
        image,
        "a dog on the grass",
        height=16,
        width=16,
        num_frames=5,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).frames
    assert video.shape == (1, 5, 16, 16, 3) and np.isfinite(video).all()


def test_qwen_image_loads_generates_and_drops_its_template_prefix(tiny_pipeline):
    pipe = load(tiny_pipeline("qwen_image"))
    assert type(pipe).__name__ == "QwenImagePipeline"
    # the tiny tokenizer splits the template like Qwen2.5-VL's: 34 prefix tokens are dropped
    prefix = QWEN_TEMPLATE.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    embeds, mask = pipe._get_qwen_prompt_embeds(["a red cat", "a dog"])
    # what is left: the prompt's words and the 5 suffix tokens (<|im_end|> \n <|im_start|>
    # assistant \n)
    assert mask.sum(dim=1).tolist() == [3 + 5, 2 + 5]
    image = pipe(
        "a red cat",
        height=32,
        width=32,
        num_inference_steps=2,
        true_cfg_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()

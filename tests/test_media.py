"""Decoding with a pipeline's VAE reproduces the pipeline's own pixels; PNG and MP4 writing."""

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from phased_dmd_mp import media

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("kind", ["wan22_t2v", "qwen_image"])
def test_decode_latents_matches_the_pipeline_output(tiny_pipeline, kind):
    folder = tiny_pipeline(kind)
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    args = dict(height=32, width=32, num_inference_steps=2, output_type="latent")
    if kind == "wan22_t2v":
        args["num_frames"] = 5
    out = pipe(["a red cat", "a dog"], generator=torch.Generator().manual_seed(0), **args)
    latents = out.frames if kind == "wan22_t2v" else out.images
    if kind == "qwen_image":  # packed [B, tokens, 4 C] -> [B, C, 1, H, W]
        latents = pipe._unpack_latents(latents, 32, 32, pipe.vae_scale_factor)
    args["output_type"] = "np"
    out = pipe(["a red cat", "a dog"], generator=torch.Generator().manual_seed(0), **args)
    expected = out.frames if kind == "wan22_t2v" else out.images[:, None]
    pixels = media.decode_latents(media.load_vae(folder), latents, micro_batch=1)
    assert pixels.shape == expected.shape
    torch.testing.assert_close(pixels, torch.from_numpy(expected), atol=1e-5, rtol=0)
    assert pixels.std() > 0.01  # not a constant image


def test_png_and_mp4_round_trip(tmp_path):
    video = torch.rand(5, 16, 32, 3)
    png = iio.imread(media.write_png(video[3], tmp_path / "g.png"))
    assert np.array_equal(png, media.to_uint8(video[3]))
    frames = iio.imread(media.write_mp4(video, tmp_path / "v.mp4"))
    assert frames.shape == (5, 16, 32, 3)  # H.264 is lossy: only the shape is exact

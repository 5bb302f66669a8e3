"""The steps the end-to-end pipeline tests share: a teacher directory prepared from a tiny
pipeline folder (tests/tiny_pipelines.py) and prompts, then stock diffusers run on an exported
student from our sampler's starting noise, compared latent for latent with our sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from phased_dmd_mp import prepare, sample

PROMPTS = ["a red cat", "a blue dog"]  # as many tokens each: no padding to compare
FRAMES = 5
SIDE = 16  # pixels


def first_frames(root: Path, height: int = SIDE, width: int = SIDE) -> Path:
    """One first frame per prompt, in sorted order (prepare's --images)."""
    from PIL import Image

    folder = root / "images"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for c in range(len(PROMPTS)):
        pixels = rng.integers(0, 255, (height, width, 3), np.uint8)
        Image.fromarray(pixels).save(folder / f"{c:03d}.png")
    return folder


def prepare_teacher(
    pipeline: Path,
    out: Path,
    *,
    video: bool,
    images: Path | None = None,
    height: int = SIDE,
    width: int = SIDE,
    frames: int = FRAMES,
) -> Path:
    """python -m phased_dmd_mp.prepare on PROMPTS (and their first frames)."""
    prompts = out.parent / f"{out.name}_prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["--pipeline", str(pipeline), "--prompts", str(prompts), "--out", str(out)]
    # the stock pipelines run their text encoders in float32: store float32 embeddings
    args += ["--height", str(height), "--width", str(width), "--no-progress", "--dtype", "float32"]
    args += ["--frames", str(frames)] if video else []
    args += ["--images", str(images)] if images is not None else []
    assert prepare.main(args) == 0
    return out


def call_args(video: bool, c: int, images: Path | None, height=SIDE, width=SIDE, frames=FRAMES):
    """What a user passes the stock pipeline for prompt c, guidance off."""
    from PIL import Image

    args = dict(prompt=PROMPTS[c], height=height, width=width)
    if video:
        args.update(num_frames=frames, guidance_scale=1.0)
    else:
        args["true_cfg_scale"] = 1.0  # no negative prompt either: no CFG
    if images is not None:
        args["image"] = Image.open(images / f"{c:03d}.png")
    return args


def pack(x: torch.Tensor) -> torch.Tensor:
    """Qwen-Image's packed latents [B, H/2 * W/2, 4 C] of [B, C, 1, H, W]."""
    b, c, _, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * c)


def unpack(x: torch.Tensor, shape) -> torch.Tensor:
    c, _, h, w = shape
    b = x.shape[0]
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 1, h, w)


def stock_output(pipe, args: dict, start: torch.Tensor, video: bool, output_type="latent"):
    """The stock pipeline's output from the latents `start` [1, C, F, H, W]: latents in our
    layout, or (output_type "np") the decoded pixels [1, F, H, W, 3]."""
    if video:
        return pipe(**args, latents=start.clone(), output_type=output_type).frames
    out = pipe(**args, latents=pack(start), output_type=output_type).images
    return unpack(out, start.shape[1:]) if output_type == "latent" else out[:, None]


def record_routing(pipe) -> list[int]:
    """A list that receives, per transformer call, which of the pipeline's transformers ran
    (1 for `transformer`, 2 for `transformer_2`, k for `transformer_k`)."""
    calls = []
    for name, module in pipe.components.items():
        if name.startswith("transformer") and module is not None:
            k = 1 if name == "transformer" else int(name.rsplit("_", 1)[1])
            module.register_forward_pre_hook(
                lambda m, a, kw, k=k: calls.append(k), with_kwargs=True
            )
    return calls


def compare_with_ours(
    run: Path, pipe, *, video: bool, images=None, size=None, steps: int, latent_shape=None
):
    """Our sampler (`sample --checkpoint RUN`'s) and the pipeline from the same noise for each
    prompt (condition c from seed c's noise) at `latent_shape` (default the run's first) and its
    pixel `size` = (height, width, frames): (our latents [conditions, seeds, ...], the largest
    latent difference). Our sampler runs one sample at a time, so a re-noising student draws
    its step noise from a generator seeded with the condition's index, as the pipeline is given."""
    source = sample.generator_source(run, latent_shape=latent_shape)
    height, width, frames = size or (SIDE, SIDE, FRAMES)
    ours = sample.generate(source, seeds=2, progress=False, batch=1)  # [conditions, seeds, ...]
    noise = sample.seed_noise(source.latent_shape, 2)
    worst = 0.0
    for c in range(len(PROMPTS)):
        args = dict(call_args(video, c, images, height, width, frames), num_inference_steps=steps)
        if source.renoise:
            args["generator"] = torch.Generator().manual_seed(c)
        theirs = stock_output(pipe, args, noise[c : c + 1], video)
        worst = max(worst, (theirs - ours[c, c : c + 1]).abs().max().item())
    return ours, worst

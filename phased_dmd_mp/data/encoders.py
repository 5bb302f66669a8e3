"""The conditions of a diffusers pipeline, computed by the pipeline's own code: `encode_prompt`
for the text (Wan: umT5; Qwen-Image: Qwen2.5-VL), `prepare_latents` (VAE) and `encode_image`
(Wan2.1's CLIP) for an image-to-video first frame. `python -m phased_dmd_mp.prepare` stores what
they return as a condition set (data/conditions.py); an online set (data/online.py) encodes each
training batch with the same code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from phased_dmd_mp.data.pipeline_folder import QWEN_MAX_TOKENS, WAN_TEXT_TOKENS, PipelineFolder
from phased_dmd_mp.data.readers import read_image
from phased_dmd_mp.data.real_encoding import VIDEO_SUFFIXES, first_frame

ENCODER_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def encoder_device(where: str) -> torch.device:
    """"gpu": this process's GPU (torch.cuda.current_device(), set per rank from LOCAL_RANK),
    the CPU when there is none; "cpu": the CPU."""
    if where == "gpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ConditionEncoder:
    """The pipeline without its transformers, encoding batches of conditions its own way.

    `dtype` is the text encoder's (its embeddings come out in it); the VAE and CLIP run in
    float32, as Wan's image-to-video example loads them. `size` (height, width, frames) is the
    first frames' size for image-to-video; None loads the text encoder only."""

    def __init__(
        self,
        pipe: PipelineFolder,
        dtype: torch.dtype,
        device: torch.device,
        size: tuple[int, int, int] | None = None,
    ):
        import diffusers

        self.pipe_info, self.device, self.size = pipe, device, size
        images = size is not None and pipe.kind in ("wan_i2v", "wan_ti2v")
        # the transformers are not needed to encode; a pipeline without transformer_2
        # (Qwen-Image) warns about the keyword, so name only the ones it has
        skip = {"transformer": None}
        if pipe.transformer_2 is not None:
            skip["transformer_2"] = None
        if not images:
            skip["vae"] = None
            if pipe.image_encoder is not None:
                skip["image_encoder"] = None
        self.pipe = diffusers.DiffusionPipeline.from_pretrained(
            pipe.path,
            dtype={"default": dtype, "vae": torch.float32, "image_encoder": torch.float32},
            **skip,
        ).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.first_frame_pipe = None  # Wan2.2 TI2V: its image-to-video pipeline makes them
        if images and pipe.kind == "wan_ti2v":
            self.first_frame_pipe = diffusers.WanImageToVideoPipeline(
                tokenizer=None,
                text_encoder=None,
                vae=self.pipe.vae,
                scheduler=self.pipe.scheduler,
                expand_timesteps=True,
            )

    @torch.no_grad()
    def text(self, prompts: list[str]) -> list[Tensor]:
        """Each prompt's real tokens [len_i, D] (CPU, the text encoder's dtype): the rows of the
        pipeline's `encode_prompt` that are not its padding. Wan pads every prompt with zero
        rows to 512 tokens: the trailing zero rows are dropped (padding them back with zeros
        gives the pipeline's tensor exactly). Qwen-Image returns a mask of the real tokens
        (None when all are real)."""
        if self.pipe_info.is_wan:
            embeds, _ = self.pipe.encode_prompt(
                prompts,
                do_classifier_free_guidance=False,
                max_sequence_length=WAN_TEXT_TOKENS,
                device=self.device,
            )
            embeds = embeds.cpu()
            nonzero = embeds.abs().amax(-1) > 0  # [n, 512]
            positions = torch.arange(1, embeds.shape[1] + 1)
            lengths = (nonzero * positions).amax(1).clamp(min=1)
        else:
            embeds, mask = self.pipe.encode_prompt(
                prompts, device=self.device, max_sequence_length=QWEN_MAX_TOKENS
            )
            embeds = embeds.cpu()
            lengths = (
                torch.full((len(prompts),), embeds.shape[1]) if mask is None else mask.sum(1).cpu()
            )
        return [embed[:length] for embed, length in zip(embeds, lengths.tolist())]

    @torch.no_grad()
    def image(self, files: list[Path]) -> dict[str, Tensor]:
        """{"image_latents": [n, 4 + C, F, H, W]} (+ "image_embeds" [n, T, D'] for Wan2.1),
        each image through WanImageToVideoPipeline.prepare_latents / encode_image; for Wan2.2
        TI2V {"first_frame_latents": [n, C, 1, H, W]}, its prepare_latents with
        expand_timesteps (the normalised latents of the frame alone)."""
        if self.first_frame_pipe is not None:
            return {"first_frame_latents": torch.cat([self._first_frame(f) for f in files])}
        height, width, frames = self.size
        pipe, out = self.pipe, {"image_latents": []}
        clip = pipe.image_encoder is not None
        if clip:
            out["image_embeds"] = []
        for file in files:
            image = _still(file, height, width)
            pixels = pipe.video_processor.preprocess(image, height=height, width=width)
            _, condition = self._prepare_latents(pipe, pixels)
            out["image_latents"].append(condition.cpu())
            if clip:
                out["image_embeds"].append(pipe.encode_image(image, self.device).cpu())
        return {name: torch.cat(parts) for name, parts in out.items()}

    def _first_frame(self, file: Path) -> torch.Tensor:
        pipe = self.first_frame_pipe
        height, width, _ = self.size
        pixels = pipe.video_processor.preprocess(_still(file, height, width), height, width)
        _, condition, _ = self._prepare_latents(pipe, pixels)
        return condition.cpu()

    def _prepare_latents(self, pipe, pixels: Tensor) -> tuple:
        """`pipe.prepare_latents` (WanImageToVideoPipeline's) for one image at this encoder's
        size, in float32: Wan2.1/2.2 I2V return (noise, condition), TI2V's expand_timesteps
        (noise, first-frame latents, mask)."""
        height, width, frames = self.size
        return pipe.prepare_latents(
            pixels.to(self.device, dtype=torch.float32),
            1,
            pipe.vae.config.z_dim,
            height,
            width,
            frames,
            torch.float32,
            self.device,
        )


def _still(file: Path, height: int, width: int):
    """An image file (8-bit RGB as the user sees it, data/readers.py) or a real clip's own first
    frame, covered and centre-cropped to height x width (data/real_encoding.py)."""
    if file.suffix.lower() in VIDEO_SUFFIXES:
        return first_frame(file, height, width)
    return read_image(file)


def qwen_text_len(pipe: PipelineFolder, texts: list[str]) -> int:
    """Tokens kept of the longest of `texts` by QwenImagePipeline.encode_prompt (its template
    prefix dropped, capped at 1024). Loads the tokenizer only."""
    import diffusers

    tokenizer_only = diffusers.DiffusionPipeline.from_pretrained(
        pipe.path, text_encoder=None, transformer=None, vae=None
    )
    template = tokenizer_only.prompt_template_encode
    drop = tokenizer_only.prompt_template_encode_start_idx
    longest = 0
    for start in range(0, len(texts), 1024):
        chunk = [template.format(t) for t in texts[start : start + 1024]]
        longest = max([longest, *map(len, tokenizer_only.tokenizer(chunk).input_ids)])
    return max(1, min(QWEN_MAX_TOKENS, longest - drop))

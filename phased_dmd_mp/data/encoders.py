"""The conditions of a diffusers pipeline, computed by the pipeline's own code: `encode_prompt`
for the text (Wan: umT5; Qwen-Image: Qwen2.5-VL), `prepare_latents` (VAE) and `encode_image`
(Wan2.1's CLIP) for an image-to-video first frame. `python -m phased_dmd_mp.prepare` stores what
they return as a condition set (data/conditions.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from phased_dmd_mp.data.readers import read_image
from phased_dmd_mp.data.pipeline_folder import (
    QWEN_MAX_TOKENS,
    WAN_TEXT_TOKENS,
    PipelineFolder,
)


class ConditionEncoder:
    """The pipeline without its transformers, encoding batches of conditions its own way."""

    def __init__(self, pipe: PipelineFolder, height: int, width: int, frames: int, texts):
        """`texts`: every prompt it will encode (Qwen-Image pads all to the longest)."""
        import diffusers

        self.pipe_info, self.height, self.width, self.frames = pipe, height, width, frames
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cuda = self.device.type == "cuda"
        # bf16 text encoders on the GPU; the VAE and CLIP in float32, as Wan's I2V example loads
        dtype = {"default": torch.bfloat16, "vae": torch.float32, "image_encoder": torch.float32}
        # the transformers are not needed to encode; a pipeline without transformer_2
        # (Qwen-Image) warns about the keyword, so name only the ones it has
        skip = {"transformer": None}
        if pipe.transformer_2 is not None:
            skip["transformer_2"] = None
        if pipe.kind != "wan_i2v":
            skip["vae"] = None
        self.pipe = diffusers.DiffusionPipeline.from_pretrained(
            pipe.path, dtype=dtype if cuda else torch.float32, **skip
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.text_len = WAN_TEXT_TOKENS if pipe.is_wan else qwen_text_len(self.pipe, texts)

    @torch.no_grad()
    def text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """{"text": [n, L, D]} (+ "text_mask" [n, L] for Qwen-Image) as the pipeline encodes."""
        if self.pipe_info.is_wan:
            embeds, _ = self.pipe.encode_prompt(
                prompts,
                do_classifier_free_guidance=False,
                max_sequence_length=WAN_TEXT_TOKENS,
                device=self.device,
            )
            return {"text": embeds.cpu()}
        embeds, mask = self.pipe.encode_prompt(
            prompts, device=self.device, max_sequence_length=QWEN_MAX_TOKENS
        )
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        pad = self.text_len - embeds.shape[1]
        return {
            "text": torch.nn.functional.pad(embeds, (0, 0, 0, pad)).cpu(),
            "text_mask": torch.nn.functional.pad(mask, (0, pad)).to(torch.int64).cpu(),
        }

    @torch.no_grad()
    def image(self, files: list[Path]) -> dict[str, torch.Tensor]:
        """{"image_latents": [n, 4 + C, F, H, W]} (+ "image_embeds" [n, T, D'] for Wan2.1),
        each image through WanImageToVideoPipeline.prepare_latents / encode_image."""
        pipe, out = self.pipe, {"image_latents": []}
        clip = pipe.image_encoder is not None
        if clip:
            out["image_embeds"] = []
        for file in files:
            image = read_image(file)  # 8-bit RGB as the user sees it (data/readers.py)
            pixels = pipe.video_processor.preprocess(image, height=self.height, width=self.width)
            _, condition = pipe.prepare_latents(
                pixels.to(self.device, dtype=torch.float32),
                1,
                pipe.vae.config.z_dim,
                self.height,
                self.width,
                self.frames,
                torch.float32,
                self.device,
            )
            out["image_latents"].append(condition.cpu())
            if clip:
                out["image_embeds"].append(pipe.encode_image(image, self.device).cpu())
        return {name: torch.cat(parts) for name, parts in out.items()}


def qwen_text_len(pipe, texts: list[str]) -> int:
    """Tokens kept of the longest prompt (QwenImagePipeline's template prefix dropped, capped at
    1024): the common length Qwen-Image embeddings are padded to. Tokenizer only."""
    template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
    longest = 0
    for start in range(0, len(texts), 1024):
        ids = pipe.tokenizer([template.format(t) for t in texts[start : start + 1024]]).input_ids
        longest = max([longest, *map(len, ids)])
    return max(1, min(QWEN_MAX_TOKENS, longest - drop))

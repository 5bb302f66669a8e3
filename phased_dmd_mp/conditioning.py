"""What the distillation feeds a DiT besides the noisy latent, and how each DiT is called.

Every model in the runner is used as a velocity field v(x_t, t, conditions) on latents
[B, C, F, H, W] with t in [0, 1] (phased_dmd_mp.schedule's time). `model_inputs` turns that
into the keyword arguments of our DiTs, whose signatures are diffusers':
  Wan2.x      hidden_states [B, C (+ image-conditioning channels), F, H, W], timestep 1000 t,
              encoder_hidden_states (text), encoder_hidden_states_image (Wan2.1 I2V CLIP);
              Wan2.2 TI2V image-to-video (`expand_timesteps`): frame 0 of x replaced by the
              first frame's latents and a timestep per token, 0 on frame 0's tokens
  Qwen-Image  packed 2x2 latent patches [B, H/2 * W/2, 4 C], timestep t (the transformer scales
              it), encoder_hidden_states with its mask, img_shapes
and `velocity_from_output` turns the model's output back into a [B, C, F, H, W] velocity.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from phased_dmd_mp.models.config import QwenImageConfig, WanConfig


@dataclass(frozen=True)
class Conditions:
    """A batch of conditions (all [B, ...]): precomputed text embeddings and, for image-to-video,
    the first-frame latents (concatenated to x on channels) and CLIP image tokens (Wan2.1)."""

    text: Tensor  # [B, text tokens, text_dim]
    text_mask: Tensor | None = None  # [B, text tokens] (Qwen-Image), 1 = real token
    image_latents: Tensor | None = None  # [B, extra channels, F, H, W] (I2V)
    image_embeds: Tensor | None = None  # [B, image tokens, image_dim] (Wan2.1 I2V)
    # [B, C, 1, H, W]: the first frame's latents, which stand in for frame 0 of x (Wan2.2 TI2V
    # image-to-video, diffusers' expand_timesteps: that frame is clean, t = 0 on its tokens)
    first_frame_latents: Tensor | None = None

    def _map(self, fn) -> Conditions:
        return replace(
            self,
            **{
                f.name: fn(getattr(self, f.name))
                for f in fields(self)
                if getattr(self, f.name) is not None
            },
        )

    def select(self, index: Tensor) -> Conditions:
        return self._map(lambda x: x[index])

    def to(self, device: torch.device | str) -> Conditions:
        return self._map(lambda x: x.to(device))

    @property
    def batch_size(self) -> int:
        return self.text.shape[0]

    def pad_text(self, tokens: int) -> Conditions:
        """These conditions with `text` and `text_mask` zero-padded to `tokens` tokens, as
        QwenImagePipeline.encode_prompt pads a batch (the mask keeps the padding unattended).
        Raises ValueError for text without a mask (Wan attends to every token of its 512) or
        longer than `tokens`."""
        have = self.text.shape[1]
        if have == tokens:
            return self
        if self.text_mask is None or have > tokens:
            raise ValueError(f"cannot pad {have} text tokens to {tokens} (needs text_mask)")
        pad = tokens - have
        return replace(
            self,
            text=torch.nn.functional.pad(self.text, (0, 0, 0, pad)),
            text_mask=torch.nn.functional.pad(self.text_mask, (0, pad)),
        )

    @staticmethod
    def cat(parts: list[Conditions]) -> Conditions:
        """One batch of `parts`; masked text of different lengths (a Qwen-Image batch and its
        negative prompt) is padded to the longest first."""
        tokens = max(part.text.shape[1] for part in parts)
        parts = [part.pad_text(tokens) for part in parts]
        first = parts[0]
        return replace(
            first,
            **{
                f.name: torch.cat([getattr(p, f.name) for p in parts])
                for f in fields(first)
                if getattr(first, f.name) is not None
            },
        )


def with_first_frame(x: Tensor, cond: Conditions) -> Tensor:
    """x [B, C, F, H, W] with frame 0 replaced by the first frame's latents when `cond` has them
    (Wan2.2 TI2V image-to-video: the model's input and the sample; what WanImageToVideoPipeline
    with expand_timesteps computes as (1 - mask) * condition + mask * latents), else x."""
    if cond.first_frame_latents is None:
        return x
    return torch.cat([cond.first_frame_latents.to(x), x[:, :, 1:]], dim=2)


def generated_frames(x: Tensor, cond: Conditions) -> Tensor:
    """The frames of x [B, C, F, H, W] the model generates: all, or without frame 0 where the
    first frame is given (its velocity means nothing there: losses leave it out)."""
    return x if cond.first_frame_latents is None else x[:, :, 1:].contiguous()


def token_timesteps(arch: WanConfig, x: Tensor, t: Tensor) -> Tensor:
    """Per-token timesteps [B, tokens] of a first-frame-conditioned Wan call (expand_timesteps):
    t on every token, 0 on frame 0's (patch size 1 in time, as Wan2.2 TI2V's)."""
    frames, height, width = (n // p for n, p in zip(x.shape[2:], arch.patch_size))
    per_frame = height * width
    timesteps = t[:, None].expand(-1, frames * per_frame).clone()
    timesteps[:, :per_frame] = 0.0
    return timesteps


def model_inputs(arch: WanConfig | QwenImageConfig, x: Tensor, t: Tensor, cond: Conditions) -> dict:
    """Keyword arguments of our DiT for velocity at (x [B, C, F, H, W], t [B]) under `cond`."""
    if isinstance(arch, WanConfig):
        hidden = (
            x if cond.image_latents is None else torch.cat([x, cond.image_latents.to(x)], dim=1)
        )
        timestep = t * 1000.0
        if cond.first_frame_latents is not None:
            hidden = with_first_frame(hidden, cond)
            timestep = token_timesteps(arch, x, timestep)
        return {
            "hidden_states": hidden,
            "timestep": timestep,
            "encoder_hidden_states": cond.text,
            "encoder_hidden_states_image": cond.image_embeds,
        }
    batch, channels, frames, height, width = x.shape
    if frames != 1 or cond.image_latents is not None or cond.first_frame_latents is not None:
        raise ValueError("Qwen-Image takes single-frame latents without image conditioning")
    packed = x.reshape(batch, channels, height // 2, 2, width // 2, 2)
    packed = packed.permute(0, 2, 4, 1, 3, 5).reshape(batch, height * width // 4, channels * 4)
    return {
        "hidden_states": packed,
        "encoder_hidden_states": cond.text,
        "encoder_hidden_states_mask": cond.text_mask,
        "timestep": t,
        "img_shapes": [[(1, height // 2, width // 2)]] * batch,
    }


def velocity_from_output(arch: WanConfig | QwenImageConfig, output: Tensor, like: Tensor) -> Tensor:
    """The model output as a velocity shaped like the latent `like` [B, C, F, H, W]."""
    if isinstance(arch, WanConfig):
        return output
    batch, channels, _, height, width = like.shape
    v = output.reshape(batch, height // 2, width // 2, channels, 2, 2)
    return v.permute(0, 3, 1, 4, 2, 5).reshape(like.shape)


def dit_velocity(model, arch: WanConfig | QwenImageConfig):
    """A DiT called directly (pipeline_parallel = 1) as v(x, t, conditions)."""

    def velocity(x: Tensor, t: Tensor, cond: Conditions) -> Tensor:
        return velocity_from_output(arch, model(**model_inputs(arch, x, t, cond)), x)

    return velocity

"""A Phased DMD student of a Wan2.1 / Wan2.2 teacher as a diffusers pipeline: text-to-video,
image-to-video (first-frame latents on channels, Wan2.1's CLIP image tokens when the experts
attend to them) and Wan2.2 TI2V (`expand_timesteps`: the first frame's latents stand in for
frame 0, whose tokens run at t = 0), with up to 8 experts and deterministic or re-noising steps.

    pipe = DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True)
    video = pipe(prompt="a red panda", height=480, width=832, num_frames=81).frames[0]
    video = pipe(prompt="...", image=first_frame, ...).frames[0]          # image-to-video

It reuses WanImageToVideoPipeline's prompt and image encoders and latent preparation and runs
its own loop: the trained steps (phased_dmd_student.py), each on its expert.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, WanImageToVideoPipeline
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from .phased_dmd_student import (
    EXPERT_NAMES,
    check_schedule,
    decode,
    experts_of,
    next_latents,
    timestep_batch,
    trained_step_count,
)


class PhasedDMDWanPipeline(WanImageToVideoPipeline):
    """The student's experts are `transformer` (expert 1) and `transformer_k` (expert k); the
    configuration holds the trained table (`timesteps`), which expert takes each step
    (`expert_of_step`) and how a step moves (`step_noise`)."""

    model_cpu_offload_seq = "text_encoder->image_encoder->" + "->".join(EXPERT_NAMES) + "->vae"
    _optional_components = ["scheduler", "image_processor", "image_encoder", *EXPERT_NAMES[1:]]

    def __init__(
        self,
        tokenizer,
        text_encoder,
        vae,
        transformer,
        transformer_2=None,
        transformer_3=None,
        transformer_4=None,
        transformer_5=None,
        transformer_6=None,
        transformer_7=None,
        transformer_8=None,
        scheduler=None,
        image_processor=None,
        image_encoder=None,
        expand_timesteps: bool = False,
        timesteps: list[float] = (1.0, 0.0),
        expert_of_step: list[int] = (1,),
        step_noise: str = "deterministic",
    ):
        # WanImageToVideoPipeline's encoders and latent preparation, without its scheduler and
        # boundary (the trained table and routing below replace them)
        DiffusionPipeline.__init__(self)
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            image_processor=image_processor,
            image_encoder=image_encoder,
            transformer=transformer,
            transformer_2=transformer_2,
            transformer_3=transformer_3,
            transformer_4=transformer_4,
            transformer_5=transformer_5,
            transformer_6=transformer_6,
            transformer_7=transformer_7,
            transformer_8=transformer_8,
        )
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        self.register_to_config(expand_timesteps=expand_timesteps)
        check_schedule(timesteps, expert_of_step, step_noise)
        self.register_to_config(
            timesteps=list(timesteps), expert_of_step=list(expert_of_step), step_noise=step_noise
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        max_sequence_length: int = 512,
    ):
        """Videos for `prompt` (and, image-to-video, their first frame `image`) from the
        trained steps: `latents` [B, C, F, H, W] (float32) or Gaussian noise from `generator`,
        which also draws the fresh noise of re-noising steps. `output_type` "latent" returns
        the latents; otherwise decoded as WanPipeline's "np" / "pil" / "pt"."""
        config = self.config
        steps = trained_step_count(config.timesteps, num_inference_steps, guidance_scale)
        experts = experts_of(self, config.expert_of_step)
        first = next(iter(experts.values()))
        device, dtype = self._execution_device, first.dtype
        prompt_embeds, _ = self.encode_prompt(
            prompt=prompt,
            do_classifier_free_guidance=False,
            num_videos_per_prompt=num_videos_per_prompt,
            prompt_embeds=prompt_embeds,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        prompt_embeds = prompt_embeds.to(dtype)
        batch = prompt_embeds.shape[0]
        channels = self.vae.config.z_dim
        condition = first_frame_mask = None
        if image is None:
            shape = (
                batch,
                channels,
                (num_frames - 1) // self.vae_scale_factor_temporal + 1,
                height // self.vae_scale_factor_spatial,
                width // self.vae_scale_factor_spatial,
            )
            latents = (
                randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
                if latents is None
                else latents.to(device=device, dtype=torch.float32)
            )
        else:
            if first.config.image_dim is not None and image_embeds is None:
                image_embeds = self.encode_image(image, device).repeat(batch, 1, 1)
            pixels = self.video_processor.preprocess(image, height=height, width=width)
            prepared = self.prepare_latents(
                pixels.to(device, dtype=torch.float32), batch, channels, height, width,
                num_frames, torch.float32, device, generator, latents,
            )  # fmt: skip
            if config.expand_timesteps:
                latents, condition, first_frame_mask = prepared
            else:
                latents, condition = prepared
        if image_embeds is not None:
            image_embeds = image_embeds.to(dtype)

        table = config.timesteps
        for i in self.progress_bar(range(steps)):
            timestep = timestep_batch(table[i], batch, device, 1000.0)
            if first_frame_mask is not None:  # the given frame in place of frame 0, at t = 0
                model_input = first_frame_mask * latents + (1 - first_frame_mask) * condition
                _, patch_h, patch_w = first.config.patch_size
                per_token = first_frame_mask[0, 0, :, ::patch_h, ::patch_w].flatten()
                timestep = timestep[:, None] * per_token[None]
            elif condition is not None:
                model_input = torch.cat([latents, condition], dim=1)
            else:
                model_input = latents
            velocity = experts[config.expert_of_step[i]](
                hidden_states=model_input.to(dtype),
                timestep=timestep,
                encoder_hidden_states=prompt_embeds,
                encoder_hidden_states_image=image_embeds,
                return_dict=False,
            )[0].float()
            latents = next_latents(
                latents, velocity, table[i], table[i + 1], config.step_noise, generator
            )
        if first_frame_mask is not None:
            latents = first_frame_mask * latents + (1 - first_frame_mask) * condition

        if output_type == "latent":
            video = latents
        else:
            video = self.video_processor.postprocess_video(
                decode(self.vae, latents), output_type=output_type
            )
        self.maybe_free_model_hooks()
        return WanPipelineOutput(frames=video) if return_dict else (video,)

"""A Phased DMD student of Qwen-Image as a diffusers pipeline: up to 8 experts, deterministic or
re-noising steps.

    pipe = DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True)
    image = pipe(prompt="a red panda", height=1024, width=1024).images[0]

It reuses QwenImagePipeline's prompt encoder and latent packing and runs its own loop: the
trained steps (phased_dmd_student.py), each on its expert.
"""

from __future__ import annotations

import torch
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput

from .phased_dmd_student import (
    EXPERT_NAMES,
    check_schedule,
    decode,
    experts_of,
    next_latents,
    timestep_batch,
    trained_step_count,
)


class PhasedDMDQwenImagePipeline(QwenImagePipeline):
    """The student's experts are `transformer` (expert 1) and `transformer_k` (expert k); the
    configuration holds the trained table (`timesteps`), which expert takes each step
    (`expert_of_step`) and how a step moves (`step_noise`)."""

    model_cpu_offload_seq = "text_encoder->" + "->".join(EXPERT_NAMES) + "->vae"
    _optional_components = ["scheduler", *EXPERT_NAMES[1:]]

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        transformer,
        transformer_2=None,
        transformer_3=None,
        transformer_4=None,
        transformer_5=None,
        transformer_6=None,
        transformer_7=None,
        transformer_8=None,
        scheduler=None,
        timesteps: list[float] = (1.0, 0.0),
        expert_of_step: list[int] = (1,),
        step_noise: str = "deterministic",
    ):
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
        )
        self.register_modules(
            transformer_2=transformer_2,
            transformer_3=transformer_3,
            transformer_4=transformer_4,
            transformer_5=transformer_5,
            transformer_6=transformer_6,
            transformer_7=transformer_7,
            transformer_8=transformer_8,
        )
        check_schedule(timesteps, expert_of_step, step_noise)
        self.register_to_config(
            timesteps=list(timesteps), expert_of_step=list(expert_of_step), step_noise=step_noise
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int | None = None,
        true_cfg_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        max_sequence_length: int = 512,
    ):
        """Images for `prompt` from the trained steps: packed `latents` [B, H/16 * W/16, 4 C]
        (float32, QwenImagePipeline's layout) or Gaussian noise from `generator`, which also
        draws the fresh noise of re-noising steps. `output_type` "latent" returns the packed
        latents; otherwise decoded as QwenImagePipeline's "pil" / "np" / "pt"."""
        config = self.config
        steps = trained_step_count(config.timesteps, num_inference_steps, true_cfg_scale)
        experts = experts_of(self, config.expert_of_step)
        first = next(iter(experts.values()))
        device = self._execution_device
        prompt_embeds, prompt_embeds_mask = self.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            prompt_embeds=prompt_embeds,
            prompt_embeds_mask=prompt_embeds_mask,
            max_sequence_length=max_sequence_length,
        )
        batch = prompt_embeds.shape[0]
        latents = self.prepare_latents(
            batch, first.config.in_channels // 4, height, width, torch.float32, device,
            generator, latents,
        )  # fmt: skip
        patches = (1, height // self.vae_scale_factor // 2, width // self.vae_scale_factor // 2)

        table = config.timesteps
        for i in self.progress_bar(range(steps)):
            velocity = experts[config.expert_of_step[i]](
                hidden_states=latents.to(first.dtype),
                timestep=timestep_batch(table[i], batch, device, 1.0),
                encoder_hidden_states=prompt_embeds.to(first.dtype),
                encoder_hidden_states_mask=prompt_embeds_mask,
                img_shapes=[[patches]] * batch,
                return_dict=False,
            )[0].float()
            latents = next_latents(
                latents, velocity, table[i], table[i + 1], config.step_noise, generator
            )

        if output_type == "latent":
            image = latents
        else:
            unpacked = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            image = self.image_processor.postprocess(
                decode(self.vae, unpacked)[:, :, 0], output_type=output_type
            )
        self.maybe_free_model_hooks()
        return QwenImagePipelineOutput(images=image) if return_dict else (image,)

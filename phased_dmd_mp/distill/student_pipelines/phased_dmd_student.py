"""What the Phased DMD student pipelines share: the trained schedule and the VAE's latent scale.

A student distilled by phased_dmd_mp samples N steps on a fixed table t_0 = 1 > ... > t_N = 0
(t in [0, 1]; its noisy latent is x_t = (1 - t) x_0 + t noise), step i on expert
`expert_of_step[i]`, and moves between steps by the flow-matching step its training used:
x_0 = x_t - t v is the model's clean estimate, the noise estimate is x_t + (1 - t) v, and the
next latent is (1 - t') x_0 + t' noise, with that estimate (`deterministic`: the Euler step) or
with fresh Gaussian noise (`renoise`: DMD2's few-step sampler). The table and routing live in the
pipeline's model_index.json; nothing else (another step count, guidance) is what it learned.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

MAX_EXPERTS = 8  # transformer, transformer_2, ..., transformer_8: one expert per phase
EXPERT_NAMES = ("transformer", *(f"transformer_{k}" for k in range(2, MAX_EXPERTS + 1)))
STEP_NOISE = ("deterministic", "renoise")


def check_schedule(timesteps, expert_of_step, step_noise: str) -> None:
    """A table falling from 1 to 0, one expert (1-based, at most MAX_EXPERTS) per step."""
    if len(timesteps) < 2 or timesteps[0] != 1.0 or timesteps[-1] != 0.0:
        raise ValueError(f"timesteps must fall from 1 to 0, got {list(timesteps)}")
    if any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"timesteps must decrease, got {list(timesteps)}")
    if len(expert_of_step) != len(timesteps) - 1:
        raise ValueError(
            f"expert_of_step needs one expert per step ({len(timesteps) - 1}), got "
            f"{list(expert_of_step)}"
        )
    if any(not 1 <= k <= MAX_EXPERTS for k in expert_of_step):
        raise ValueError(f"experts are numbered 1..{MAX_EXPERTS}, got {list(expert_of_step)}")
    if step_noise not in STEP_NOISE:
        raise ValueError(f"step_noise must be one of {STEP_NOISE}, got {step_noise!r}")


def trained_step_count(timesteps, num_inference_steps, guidance_scale) -> int:
    """N, after refusing what the student was not trained for."""
    steps = len(timesteps) - 1
    if num_inference_steps is not None and num_inference_steps != steps:
        raise ValueError(
            f"this student was distilled for {steps} steps (num_inference_steps={steps} or "
            f"leave it out), not {num_inference_steps}"
        )
    if guidance_scale is not None and guidance_scale != 1.0:
        raise ValueError(
            "this student was distilled without classifier-free guidance: guidance scale 1 "
            f"(or leave it out), not {guidance_scale}"
        )
    return steps


def experts_of(pipe, expert_of_step) -> list:
    """The pipeline's transformer of each expert number used, in step order of first use."""
    experts = {}
    for k in expert_of_step:
        module = getattr(pipe, EXPERT_NAMES[k - 1], None)
        if module is None:
            raise ValueError(f"expert {k} ({EXPERT_NAMES[k - 1]}) is not in this pipeline")
        experts[k] = module
    return experts


def next_latents(latents, velocity, t: float, t_next: float, step_noise: str, generator):
    """The latent at t_next from the latent and the predicted velocity at t (float32)."""
    clean = latents - t * velocity
    if step_noise == "renoise" and t_next > 0:
        noise = randn_tensor(
            latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
        )
    else:
        noise = latents + (1.0 - t) * velocity
    return (1.0 - t_next) * clean + t_next * noise


def timestep_batch(t: float, batch: int, device, scale: float) -> torch.Tensor:
    """t for every sample, in the transformer's unit (Wan: 1000 t; Qwen-Image: t), float32."""
    return torch.full((batch,), t, dtype=torch.float32, device=device) * scale


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Pixels of normalised latents [B, C, F, H, W]: the VAE's per-channel mean and std undone
    (as its pipelines normalise them), then decoded."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape)
    std = torch.tensor(vae.config.latents_std).view(shape)
    latents = latents.to(vae.device, vae.dtype)
    return vae.decode(latents * std.to(latents) + mean.to(latents), return_dict=False)[0]

"""Sampling a velocity field over a timestep table: the teacher's many-step ODE (with
classifier-free guidance) and the distilled few-step generator use the same loop."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from phased_dmd_mp.conditioning import Conditions
from phased_dmd_mp.losses import classifier_free_guidance
from phased_dmd_mp.schedule import FLOW_MATCHING, NoiseSchedule

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x [B, ...], t [B]) -> v
ConditionedVelocityFn = Callable[[Tensor, Tensor, Conditions], Tensor]


def guided(
    velocity: ConditionedVelocityFn,
    cond: Conditions,
    uncond: Conditions | None = None,
    guidance_scale: float = 1.0,
) -> VelocityFn:
    """v = uncond + scale (cond - uncond) (losses.classifier_free_guidance), both halves in one
    batched call; scale 1 (or no uncond) is the plain conditional velocity."""
    if uncond is None or guidance_scale == 1.0:
        return lambda x, t: velocity(x, t, cond)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        both = velocity(torch.cat([x, x]), torch.cat([t, t]), Conditions.cat([cond, uncond]))
        v_cond, v_uncond = both.chunk(2)
        return classifier_free_guidance(v_cond, v_uncond, guidance_scale).to(x.dtype)

    return fn


@torch.no_grad()
def sample(
    velocity: VelocityFn,
    x_start: Tensor,
    timesteps: Tensor,
    *,
    schedule: NoiseSchedule = FLOW_MATCHING,
    renoise: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Integrate from x_start at timesteps[0] down the (decreasing) table to timesteps[-1].

    Each step predicts x_0 and moves to the next timestep deterministically (DDIM; Euler for
    flow matching) or, given a `renoise` generator, re-noises x_0 with fresh noise as DMD2's
    few-step sampler does.
    """
    x = x_start
    pairs = list(itertools.pairwise(timesteps.tolist()))
    for t, t_next in tqdm(pairs, desc="sample", disable=not progress, leave=False):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        v = velocity(x, t_batch)
        noise = None
        if renoise is not None and t_next > 0:
            noise = torch.randn(x.shape, generator=renoise, dtype=x.dtype).to(x.device)
        x = schedule.denoise_step(x, v, t, t_next, noise=noise)
    return x

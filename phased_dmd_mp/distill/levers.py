"""Quality levers beyond the paper, each off by default (docs/method.md section 9): what the
official trainer and the DMD2 family add on top of DMD, run by the Distiller at fixed points of
its updates (distill/trainer.py keeps the distillation step; this module its extra terms).

  IDA            after each applied generator update, the fake expert that started from the
                 same teacher expert moves toward the generator (LightX2V lightx2v_train,
                 `dmd.ida`, after SenseFlow): `after_generator_step`.
  diversity      phase 1's expert regresses its first-step velocity toward a guided-teacher
                 anchor (LightX2V `dmd.div_loss`): `diversity`; phase 1's DMD gradient then
                 skips the first step (`min_graded_step`).
  real critic    a second fake model per phase learns the expert's outputs from real latents
                 noised to a fixed t; the generator gets a DMD term of teacher vs that critic at
                 them (LightX2V `fake_real_high` / `fake_real_low`): `real_rollout`,
                 `real_critic`, `after_fake_update`, and the Distiller's own DMD step.
  adversarial    a discriminator head on the fake's features (distill/discriminator.py) learns
                 real from generated latents at the phase's injection t; the generator gets the
                 non-saturating GAN loss through the (frozen) fake into its output (DMD2, NVlabs
                 FastGen, NeMo DFM): `after_fake_update`, `adversarial`.

Real latents come from a latent set (data/real_data.py; key `real_data`), drawn per
data-parallel rank by a checkpointed sampler, each with its own condition. Every lever's
randomness comes from the Distiller's generator, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from torch import Tensor

from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.data.conditions import ConditionSampler
from phased_dmd_mp.data.real_data import LatentSet, real_data_dir
from phased_dmd_mp.distill.discriminator import DiscriminatorHead, FeatureTap
from phased_dmd_mp.distill.models import RoutedVelocity, VelocityModel, experts_reached
from phased_dmd_mp.losses import classifier_free_guidance
from phased_dmd_mp.models.lora import LinearAdapters
from phased_dmd_mp.parallel.cpu_compat import cuda_calls_on_cpu
from phased_dmd_mp.sampling import sample
from phased_dmd_mp.schedule import FLOW_MATCHING, per_sample, timestep_table

REAL_SAMPLER_SEED = 1_000_003  # the real-latent stream's seed, apart from the condition stream's


def experts_of(model) -> list[VelocityModel]:
    return [model.high, model.low] if isinstance(model, RoutedVelocity) else [model]


@dataclass
class AdversarialTerm:
    """The generator's GAN loss as a term on its output x_s: `grad` [B, ...] holds each
    sample's gradient of softplus(-logit) (mean over tapped layers) with respect to x_s."""

    weight: float
    grad: Tensor
    value: float  # the GAN loss itself, mean over the batch

    def loss(self, x_s: Tensor, index: Tensor) -> Tensor:
        """weight x mean over `index`'s samples of <x_s, grad>, less its value: its gradient is
        the GAN loss's (a batch mean once megatron divides by the microbatch count)."""
        term = self.weight * (x_s.float() * self.grad[index]).flatten(1).sum(1).mean()
        return term - term.detach()  # value 0: the DMD loss's value stays what is logged


class _Discriminator:
    """Phase k's heads, one per fake expert, their taps and their optimizer (AdamW, float32,
    the fake's learning rate; gradients averaged over data-parallel ranks and clipped by their
    norm over the model-parallel group, like the models' own)."""

    def __init__(self, fake, layers: tuple[int, ...], config, phase: int):
        self.taps = []
        for name, expert in zip(("high", "low"), experts_of(fake)):
            head = DiscriminatorHead.of_stage(
                expert.module, layers, config.seed, f"phase{phase}/{name}"
            )
            self.taps.append(FeatureTap(head))
            expert.module.decoder.feature_tap = self.taps[-1]
        self.params = [p for tap in self.taps for p in tap.head.parameters()]
        self.grad_clip = config.grad_clip
        self.optimizer = None
        if self.params:
            self.optimizer = torch.optim.AdamW(
                self.params, lr=config.fake_lr, betas=config.betas, weight_decay=config.weight_decay
            )

    def collect(self, mode: str, run: Callable[[], object]) -> list[Tensor]:
        """Run `run` with the taps in `mode`; the records it left."""
        for tap in self.taps:
            tap.mode, tap.records = mode, []
        try:
            run()
        finally:
            for tap in self.taps:
                tap.mode = None
        return [record for tap in self.taps for record in tap.records]

    def step(self) -> float:
        """Average, clip and apply the heads' gradients; returns the norm before clipping
        (collective over the data-parallel and model-parallel groups)."""
        dp_group = parallel_state.get_data_parallel_group()
        dp = dist.get_world_size(dp_group)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        squares = torch.zeros((), dtype=torch.float64)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if dp > 1:
                dist.all_reduce(p.grad, group=dp_group)
                p.grad /= dp
            if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                squares += p.grad.double().square().sum()
        dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
        norm = float(squares.sqrt())
        if self.optimizer is not None and math.isfinite(norm):
            if self.grad_clip > 0 and norm > self.grad_clip:
                for p in self.params:
                    p.grad *= self.grad_clip / (norm + 1e-6)
            self.optimizer.step()
        return norm

    def state_dict(self) -> dict:
        return {
            "heads": [tap.head.state_dict() for tap in self.taps],
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        for tap, head in zip(self.taps, state["heads"], strict=True):
            tap.head.load_state_dict(head)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])


def _pipeline_sum(value: Tensor) -> float:
    """A per-stage partial sum added over the pipeline stages (every stage gets the total)."""
    value = value.detach().double().reshape(())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(value, group=parallel_state.get_pipeline_model_parallel_group())
    return float(value)


class Levers:
    """The levers of one Distiller `d` (module docstring); checks at construction that each
    enabled lever applies to this run, raising ConfigError naming the key."""

    def __init__(self, d):
        self.d, config = d, d.config
        self.config = config
        self.critics: dict[int, object] = {}  # phase -> real-data critic (fake-model copies)
        self.discriminators: dict[int, _Discriminator] = {}
        self.real: LatentSet | None = None
        self.real_sampler: ConditionSampler | None = None
        uses_real = [k for k in ("real_critic_weight", "gan_weight") if getattr(config, k)]
        if uses_real:
            self._open_real_data(uses_real[0])
        try:
            self.critic_t = {
                k: config.real_critic_timestep(k, d.shift)
                for k in range(1, config.num_phases + 1)
                if config.real_critic_weight
            }
            depth = experts_of(d.teacher)[0].arch.num_layers
            self.gan_layers = config.gan_feature_layers(depth) if config.gan_weight else ()
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if config.ida_weight:
            for k in range(1, config.num_phases + 1):
                self._ida_partner_reached(k)

    # --- real data ---------------------------------------------------------------------------

    def _open_real_data(self, key: str) -> None:
        d = self.d
        path = real_data_dir(self.config.real_data, self.config.teacher, d.latent_shape, key)
        self.real = LatentSet(path)
        if self.real.max_condition >= len(d.conditions):
            raise ConfigError(
                f"real_data {path} refers to condition item {self.real.max_condition}, the "
                f"condition set {d.conditions.path} has {len(d.conditions)}"
            )
        self.real_sampler = ConditionSampler(
            len(self.real), d.rank_batch, self.config.seed + REAL_SAMPLER_SEED, d.dp_rank, d.dp_size
        )

    def real_batch(self) -> tuple[Tensor, object, object, Tensor]:
        """The next real latents [rank batch, C, F, H, W] with their conditions, the
        unconditional entry (for guidance) and their condition items."""
        d = self.d
        latents, items = self.real.batch(next(self.real_sampler))
        cond = d.conditions.batch(items).to(d.device)
        uncond = d.conditions.uncond(len(items), like=cond).to(d.device)
        return latents.to(d.device), cond, uncond, items

    # --- IDA ---------------------------------------------------------------------------------

    def _ida_partner_reached(self, k: int) -> None:
        """Refuse IDA where generator expert k's teacher expert has no copy in phase k's fake."""
        d = self.d
        teacher = d.teacher
        if not isinstance(teacher, RoutedVelocity):
            return
        low, high = self.config.injection_range(k, d.shift)
        reached = dict(zip(("high", "low"), experts_reached(low, high, teacher.boundary)))
        owner = "high" if d.timesteps[d.bounds[k - 1]] >= teacher.boundary else "low"
        if not reached[owner]:
            raise ConfigError(
                f"ida_weight: generator expert {k} starts from the {owner}-noise teacher expert, "
                f"but phase {k}'s noise injection ({low:.4g}, {high:.4g}) reaches only the other "
                "one, so its fake model has no expert on that base to align"
            )

    def _ida_partner(self, k: int) -> VelocityModel:
        fake, teacher = self.d.fakes[k], self.d.teacher
        if not isinstance(fake, RoutedVelocity):
            return fake
        owner = self.d._teacher_at(self.d.timesteps[self.d.bounds[k - 1]])
        return fake.high if owner is teacher.high else fake.low

    @staticmethod
    def _generator_weights(expert: VelocityModel) -> dict[str, Callable[[], Tensor]]:
        """Generator expert's weights by name, as what it computes with: LoRA merged in (one
        linear at a time, when asked)."""
        named = dict(expert.module.named_parameters())
        weights = {name: (lambda p=p: p) for name, p in named.items() if ".lora." not in name}
        if expert.adapter is not None:
            for name, module in expert.module.named_modules():
                if isinstance(module, LinearAdapters):
                    linear = expert.module.get_submodule(name.removesuffix(".lora"))
                    weights[f"{name.removesuffix('.lora')}.weight"] = (
                        lambda m=module, lin=linear: m.merged_weight(lin.weight, expert.adapter)
                    )
        return weights

    def after_generator_step(self, k: int) -> None:
        """IDA: phase k's fake expert <- (1 - ida_weight) itself + ida_weight generator expert k
        (its fp32 main parameters, then its weights; collective when sharded)."""
        if not self.config.ida_weight:
            return
        d = self.d
        partner = self._ida_partner(k)
        weights = self._generator_weights(d.generator[k - 1])
        targets = []
        for model in experts_of(d.fakes[k]):
            for name, p in model.module.named_parameters():
                if p.requires_grad:
                    targets.append(weights[name]() if model is partner else None)
        d._trained("fake", k).blend(targets, self.config.ida_weight)

    # --- diversity ---------------------------------------------------------------------------

    def min_graded_step(self, k: int) -> int:
        """The first step of phase k a DMD gradient may run through: 1 in phase 1 under the
        diversity loss (its first step learns from the anchor), else 0."""
        return int(bool(self.config.diversity_loss_weight) and k == 1)

    @torch.no_grad()
    def diversity_anchor(self, noise: Tensor, cond, uncond) -> tuple[Tensor, float]:
        """The guided teacher from `noise` after diversity_anchor_steps steps of the
        diversity_teacher_steps-step sampler (the run's shift): (x_anchor, its t)."""
        d, config = self.d, self.config
        table = timestep_table(config.diversity_teacher_steps, d.shift)
        table = table[: config.diversity_anchor_steps + 1].to(torch.float32)

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            v_cond, v_uncond = d._teacher_velocity(x, t, cond, uncond)
            if v_uncond is None:
                return v_cond
            return classifier_free_guidance(v_cond, v_uncond, d.guidance)

        return sample(velocity, noise, table), float(table[-1])

    def diversity(self, k: int, r) -> dict:
        """Phase 1: the expert's first-step velocity at the rollout's noise regressed toward
        (noise - x_anchor) / (1 - t_anchor), weighted diversity_loss_weight (gradient
        accumulates into the expert's update)."""
        weight = self.config.diversity_loss_weight
        if not weight or k != 1:
            return {}
        d = self.d
        anchor, t_anchor = self.diversity_anchor(r.noise, r.cond, r.uncond)
        target = (r.noise - anchor) / (1.0 - t_anchor)
        t = torch.full((r.noise.shape[0],), d.timesteps[0], device=d.device)

        def loss_fn(v: Tensor, i: Tensor) -> Tensor:
            return weight * F.mse_loss(v, target[i])

        loss = d._expert(k).train(r.noise, t, r.cond, loss_fn, d.micro)
        return {"diversity_loss": loss / weight}

    # --- real-data critic --------------------------------------------------------------------

    def real_critic(self, k: int):
        """Phase k's real-data critic: copies of the teacher experts phase k's fake copies."""
        if k not in self.critics:
            self.critics[k] = self.d._new_fake(k)
        return self.critics[k]

    def real_rollout(self, k: int):
        """Real latents noised to phase k's real_critic_t, as a rollout whose one graded step
        is the expert's jump from there to the phase boundary s."""
        d = self.d
        x0, cond, uncond, items = self.real_batch()
        t_real, s = self.critic_t[k], d.timesteps[d.bounds[k]]
        x = FLOW_MATCHING.add_noise(x0, d._randn(x0.shape), t_real)
        return d.rollout_from(x, [(t_real, s)], cond, uncond, items)

    # --- the fake side --------------------------------------------------------------------

    def after_fake_update(self, k: int, x_t: Tensor, t: Tensor, cond) -> dict:
        """After each fake update: the discriminator step on those generated x_t (and real
        latents noised to the same t) and the real-data critic's own update."""
        metrics = {}
        if self.config.gan_weight:
            metrics["gan_discriminator_loss"] = self._discriminator_step(k, x_t, t, cond)
        if self.config.real_critic_weight:
            d = self.d
            r = self.real_rollout(k)
            x_s = d._finish(d._expert(k), r)
            loss, norm, *_ = d._score_match(self.real_critic(k), ("real_critic", k), k, x_s, r)
            metrics.update(real_critic_fake_loss=loss, real_critic_grad_norm=norm)
        return metrics

    def _discriminator(self, k: int) -> _Discriminator:
        if k not in self.discriminators:
            self.discriminators[k] = _Discriminator(
                self.d._fake(k), self.gan_layers, self.config, k
            )
        return self.discriminators[k]

    def _discriminator_step(self, k: int, x_t: Tensor, t: Tensor, cond) -> float:
        """softplus(logit) on generated, softplus(-logit) on real latents (both at t), mean over
        samples and tapped layers; the heads alone learn."""
        d, disc = self.d, self._discriminator(k)
        fake = d._fake(k)
        x0, real_cond, *_ = self.real_batch()
        x_real = FLOW_MATCHING.add_noise(x0, d._randn(x0.shape), t)
        generated = disc.collect("score", lambda: fake.predict(x_t, t, cond, d.micro))
        real = disc.collect("score", lambda: fake.predict(x_real, t, real_cond, d.micro))
        count = x_t.shape[0] * len(self.gan_layers)
        loss = torch.zeros(())
        loss = loss + sum(F.softplus(logit).sum() for logit in generated) / count
        loss = loss + sum(F.softplus(-logit).sum() for logit in real) / count
        if disc.optimizer is not None:
            disc.optimizer.zero_grad()
        if loss.requires_grad:
            with cuda_calls_on_cpu():
                loss.backward()
        with cuda_calls_on_cpu():
            disc.step()
        return _pipeline_sum(loss)

    # --- the generator side ----------------------------------------------------------------

    def adversarial(self, k: int, x_t: Tensor, t: Tensor, s: float, cond) -> AdversarialTerm | None:
        """The generator's GAN term at the DMD step's x_t (noised from its output x_s): the
        gradient through the fake model, parameters held, carried to x_s by alpha_{t|s}."""
        if not self.config.gan_weight:
            return None
        d, disc = self.d, self._discriminator(k)
        grad = []
        records = disc.collect(
            "generator",
            lambda: grad.append(d._fake(k).input_gradient(x_t, t, cond, d.micro)),
        )
        value = _pipeline_sum(sum((r.sum() for r in records), torch.zeros(()))) / x_t.shape[0]
        alpha_ts, _ = FLOW_MATCHING.conditional(t, s)
        grad_x_s = per_sample(alpha_ts, grad[0]) * grad[0]
        return AdversarialTerm(self.config.gan_weight, grad_x_s, value)

    # --- phases and checkpoints ---------------------------------------------------------------

    def retire(self, k: int) -> None:
        """Sequential order: phase k's critic, its optimizer and its heads go."""
        self.critics.pop(k, None)
        self.d.trained.pop(("real_critic", k), None)
        self.discriminators.pop(k, None)  # its taps go with the fake model

    def state_dict(self) -> dict:
        """This model-parallel rank's critics' weights and heads (identical over data-parallel
        ranks)."""
        critics = {}
        for k, critic in self.critics.items():
            critics[k] = [e.module.state_dict() for e in experts_of(critic)]
        heads = {k: disc.state_dict() for k, disc in self.discriminators.items()}
        return {"critics": critics, "discriminators": heads}

    def load_state_dict(self, state: dict) -> None:
        for k, weights in state["critics"].items():
            for expert, values in zip(experts_of(self.real_critic(k)), weights, strict=True):
                expert.module.load_state_dict(values)
        for k, heads in state["discriminators"].items():
            self._discriminator(k).load_state_dict(heads)

    def rank_state(self) -> dict:
        return {} if self.real_sampler is None else {"real": self.real_sampler.state_dict()}

    def load_rank_state(self, state: dict) -> None:
        if self.real_sampler is not None:
            self.real_sampler.load_state_dict(state["real"])

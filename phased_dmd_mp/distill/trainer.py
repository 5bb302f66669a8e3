"""The distillation loop: Phased DMD and its baselines on one set of models (docs/method.md).

Per phase k of K (one generator expert each; the baselines are K = 1):
  fake update (x fake_updates): roll the generator out to the phase boundary s = t_{b_k}
      without gradient, draw t in the phase's noise-injection interval, x_t ~ p(x_t | x_s),
      train the fake model by score matching within (s, 1) (Eq. 13; Eq. 4 where s = 0);
  generator update: the same rollout up to the steps that carry gradient, the teacher (with
      CFG) and fake velocities at x_t, and the expert's update along w_{t|s} (T - F) (Eq. 11).
Stochastic gradient truncation ends a rollout at a random step of the phase, jumping straight
to s; only that last step carries gradient.

Randomness comes from one generator per data-parallel rank (noise, timesteps, truncation
points) and the condition sampler; both are checkpointed, so a resumed run continues exactly.
The latent shape of an iteration (`latent_shapes`) comes from the iteration alone. Which model
plays which role (teacher, student, experts, fake models, their optimizer state): roles.py.
"""

from __future__ import annotations

import datetime
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor
from tqdm import tqdm

from phased_dmd_mp import ops
from phased_dmd_mp.conditioning import (
    Conditions,
    generated_frames,
    model_inputs,
    velocity_from_output,
    with_first_frame,
)
from phased_dmd_mp.data.conditions import ConditionSampler, open_conditions
from phased_dmd_mp.data.readers import describe_nonfinite
from phased_dmd_mp.data.teacher import (
    pipeline_dir,
    read_conditions,
    read_spec,
    student_transformer,
    teacher_experts,
)
from phased_dmd_mp.distill import metrics as metrics_log
from phased_dmd_mp.distill import resume
from phased_dmd_mp.distill.config import DistillConfig
from phased_dmd_mp.distill.export import export_generator
from phased_dmd_mp.distill.levers import Levers
from phased_dmd_mp.distill.models import RoutedVelocity, VelocityModel
from phased_dmd_mp.distill.optim import TrainedModel
from phased_dmd_mp.distill.previews import log_samples
from phased_dmd_mp.distill.roles import ModelRoles
from phased_dmd_mp.distill.signals import agree, stop_on_signals
from phased_dmd_mp.losses import dmd_generator_loss, flow_matching_loss, subinterval_flow_loss
from phased_dmd_mp.models import ExecutionConfig
from phased_dmd_mp.parallel import pipeline
from phased_dmd_mp.parallel.layout import rank_batch_size
from phased_dmd_mp.parallel.state import initialize
from phased_dmd_mp.schedule import (
    FLOW_MATCHING,
    phase_step_boundaries,
    sample_timesteps,
    timestep_table,
)


@dataclass
class Rollout:
    """A generator rollout stopped before the steps that carry gradient."""

    x: Tensor  # input of the first graded step
    steps: list[tuple[float, float]]  # graded steps (t_from, t_to); the last one ends at s
    noises: list[Tensor | None]  # re-noising noise of each graded step (None: deterministic)
    cond: Conditions
    uncond: Conditions
    indices: Tensor  # the conditions' items in the condition set
    noise: Tensor | None = None  # the rollout's starting noise (at t = 1)


@dataclass
class Progress:
    phase: int = 1  # current phase (sequential) or the next to train (alternating)
    iteration: int = 0  # generator updates done in total
    skipped: dict[str, int] = field(default_factory=dict)  # role -> updates skipped (non-finite)
    skips_in_a_row: dict[str, int] = field(default_factory=dict)  # role -> consecutive skips
    applied: dict[int, int] = field(default_factory=dict)  # expert -> generator updates applied
    history: list[dict] = field(default_factory=list)


class Distiller(ModelRoles):
    def __init__(self, config: DistillConfig, run_dir: Path, *, progress: bool = True):
        self.config, self.run_dir, self.show_progress = config, run_dir, progress
        initialize(
            config.tensor_parallel,
            config.pipeline_parallel,
            context_parallel=config.context_parallel,
            timeout=datetime.timedelta(seconds=config.collective_timeout),
        )
        ops.set_kernel_backend(config.kernels)
        # The context-parallel ranks of one group share a data-parallel rank: the same seed,
        # conditions and noise (they split one sample's sequence).
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.is_logger = dist.get_rank() == 0
        self.rank_batch = rank_batch_size(config.batch_size, self.dp_size, config.micro_batch_size)
        self.micro = config.micro_batch_size or self.rank_batch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

        teacher_dir = Path(config.teacher)
        spec = read_spec(teacher_dir)
        # the shapes trained (teacher.yaml's alone by default) and the current iteration's
        self.latent_shapes = [tuple(s) for s in config.latent_shapes] or [spec.latent_shape]
        self.shape_weights = list(config.latent_shape_weights) or [1.0] * len(self.latent_shapes)
        self.latent_shape = self.latent_shapes[0]
        self.value_range = spec.value_range
        self.pipeline_dir = pipeline_dir(teacher_dir, spec)  # its VAE decodes the previews
        self.shift = config.shift or spec.shift
        self.guidance = (
            config.guidance_scale if config.guidance_scale is not None else spec.guidance_scale
        )
        self.timesteps = timestep_table(config.num_steps, self.shift).tolist()
        self.bounds = phase_step_boundaries(config.num_steps, config.num_phases)
        self.execution = ExecutionConfig(
            dtype=config.dtype,
            recompute=config.recompute,
            fp8=config.fp8,
            activation_offload=config.activation_offload,
            sequence_parallel=config.uses_sequence_parallel,
        )

        self.teacher = self._load_teacher(
            *teacher_experts(teacher_dir, spec, config.teacher_low_noise, config.moe_boundary)
        )
        # the generator's starting weights when not the teacher's (frozen: the LoRA base or
        # what full experts and, with fake_init student, the fake models copy)
        self.student = (
            self._load(student_transformer(config.student)) if config.student else None
        )
        self.copied_experts: set[int] = set()  # full experts no longer their teacher
        self.generator = self._generator_experts()
        self.fakes: dict[int, VelocityModel | RoutedVelocity] = {}
        # (role, phase) -> DDP gradient buffers, optimizer, main params and EMA (optim.py)
        self.trained: dict[tuple[str, int], TrainedModel] = {}
        self.finished_ema: dict[int, list[Tensor]] = {}  # retired expert -> its fp32 EMA
        # retired expert -> its fp32 main params (on the CPU; without EMA, in bf16 compute)
        self.finished_main: dict[int, list[Tensor]] = {}

        self.conditions = (  # an online set loads its text encoder here
            open_conditions(config.conditions)
            if config.conditions
            else read_conditions(teacher_dir)
        )
        self.sampler = ConditionSampler(
            len(self.conditions), self.rank_batch, config.seed, self.dp_rank, self.dp_size
        )
        self.rng = torch.Generator().manual_seed(config.seed * 1_000_003 + self.dp_rank)
        self.state = Progress()
        self.writer = None
        self.stopped_early = False
        self.diverged: str | None = None  # why the run stopped without exporting
        self.levers = Levers(self)  # IDA, diversity, real critic, GAN (distill/levers.py)

    # --- rollouts ------------------------------------------------------------------------------

    def _randn(self, shape) -> Tensor:
        return torch.randn(shape, generator=self.rng).to(self.device)

    def _step_noise(self, t_to: float) -> Tensor | None:
        if self.config.step_noise == "deterministic" or t_to == 0.0:
            return None
        return self._randn((self.rank_batch, *self.latent_shape))

    def _expert_for_step(self, i: int) -> VelocityModel:
        phase = next(k for k in range(1, len(self.bounds)) if i < self.bounds[k])
        return self.generator[phase - 1]

    def _advance(self, model, x: Tensor, t_from: float, t_to: float, cond, noise) -> Tensor:
        t = torch.full((x.shape[0],), t_from, device=self.device)
        v = model.predict(x, t, cond, self.micro)
        return FLOW_MATCHING.denoise_step(x, v, t_from, t_to, noise=noise)

    def rollout(self, k: int, generator: bool = False) -> Rollout:
        """Draw conditions and noise; run the frozen experts and the gradient-free steps of
        phase k; stop at its graded steps (for a generator update, none before
        levers.min_graded_step)."""
        indices = next(self.sampler)
        cond = self.conditions.batch(indices).to(self.device)
        uncond = self.conditions.uncond(len(indices), like=cond).to(self.device)
        noise = x = self._randn((self.rank_batch, *self.latent_shape))
        first, end = self.bounds[k - 1], self.bounds[k]
        first += self.levers.min_graded_step(k) if generator else 0
        last = end
        if self.config.truncates:  # exit after a random step j of the phase, jumping to s
            last = int(torch.randint(first + 1, end + 1, (), generator=self.rng))
        t = self.timesteps
        graded_from = last - 1 if self.config.truncates else first
        for i in range(graded_from):
            x = self._advance(
                self._expert_for_step(i), x, t[i], t[i + 1], cond, self._step_noise(t[i + 1])
            )
        steps = [(t[i], t[i + 1]) for i in range(graded_from, last)]
        steps[-1] = (steps[-1][0], t[end])  # the last graded step lands on the phase boundary
        return replace(self.rollout_from(x, steps, cond, uncond, indices), noise=noise)

    def rollout_from(self, x: Tensor, steps, cond: Conditions, uncond: Conditions, indices):
        """A rollout whose graded `steps` start from x (re-noising noise drawn now); `indices`
        are the conditions' items."""
        noises = [self._step_noise(t_to) for _, t_to in steps]
        return Rollout(x, steps, noises, cond, uncond, indices)

    def _finish(self, model: VelocityModel, r: Rollout) -> Tensor:
        x = r.x
        for (t_from, t_to), noise in zip(r.steps, r.noises):
            x = self._advance(model, x, t_from, t_to, r.cond, noise)
        return x

    def _injection(self, k: int) -> tuple[Tensor, float]:
        """Noise-injection timesteps of phase k and its boundary s."""
        low, high = self.config.injection_range(k, self.shift)
        t = sample_timesteps(self.rank_batch, low, high, self.shift, generator=self.rng)
        return t.to(self.device), self.timesteps[self.bounds[k]]

    # --- updates ----------------------------------------------------------------------------

    def fake_update(self, k: int) -> dict:
        r = self.rollout(k)
        x_s = self._finish(self._expert(k), r)
        loss, norm, x_t, t = self._score_match(self._fake(k), ("fake", k), k, x_s, r)
        metrics = {"fake_loss": loss, "fake_grad_norm": norm}
        return metrics | self.levers.after_fake_update(k, x_t, t, r.cond)

    def _score_match(self, model, role: tuple[str, int], k: int, x_s: Tensor, r: Rollout):
        """One update of a fake model (`role`'s optimizer) on samples x_s of phase k's boundary
        s (rolled out by `r`, under its conditions): noised to t in the phase's interval, score
        matching within (s, 1) (Eq. 13; Eq. 4 where s = 0). Returns (loss, gradient norm, x_t,
        t)."""
        config = self.config
        t, s = self._injection(k)
        eps = self._randn(x_s.shape)
        x_t = ops.add_noise_from(x_s, eps, t, s)

        def loss_fn(v: Tensor, i: Tensor) -> Tensor:
            v, x, e = (generated_frames(a, r.cond) for a in (v, x_s[i], eps[i]))
            if s == 0.0:  # the last phase sees clean samples: plain flow matching (Eq. 4)
                return flow_matching_loss(v, x, e)
            return subinterval_flow_loss(v, x, e, t[i], s, max_weight=config.max_weight)

        trained = self._trained(*role)
        trained.zero_grad()
        loss = model.train(x_t, t, r.cond, loss_fn, self.micro)
        return loss, self._step(trained, role[0], r), x_t, t

    def generator_update(self, k: int) -> dict:
        """The DMD step (with the adversarial term, when on), the diversity and real-critic
        terms (levers), one optimizer step, then IDA."""
        config, expert, levers = self.config, self._expert(k), self.levers
        r = self.rollout(k, generator=True)
        trained = self._trained("generator", k)
        trained.zero_grad()
        metrics = {}
        if len(r.steps) == 1:
            loss = self._generator_step_last(k, expert, r, self._fake(k), metrics=metrics)
        else:
            loss = self._generator_step_through_all(k, expert, r, metrics)
        metrics |= levers.diversity(k, r)
        if config.real_critic_weight:
            critic, weight = levers.real_critic(k), config.real_critic_weight
            real = self._generator_step_last(k, expert, levers.real_rollout(k), critic, weight)
            metrics["real_critic_loss"] = real / weight
        grad_norm = self._step(trained, "generator", r)
        if math.isfinite(grad_norm):
            self.state.applied[k] = self.state.applied.get(k, 0) + 1
            if config.ema_decay is not None:
                trained.update_ema(config.ema_decay)
            levers.after_generator_step(k)
        return {"generator_loss": loss, "generator_grad_norm": grad_norm, **metrics}

    def _teacher_velocity(self, x_t: Tensor, t: Tensor, cond, uncond):
        """(conditional, unconditional or None without guidance) teacher velocities at x_t."""
        if self.guidance == 1.0:
            return self.teacher.predict(x_t, t, cond, self.micro), None
        # the guided pair as one batch of 2 x rank_batch, run micro_batch_size at a time
        both = torch.cat([x_t, x_t]), torch.cat([t, t]), Conditions.cat([cond, uncond])
        return self.teacher.predict(*both, self.micro).chunk(2)

    def _dmd_terms(self, k: int, x_s: Tensor, r: Rollout, fake):
        """Noise the generator output into the phase's interval and ask teacher and fake."""
        t, s = self._injection(k)
        x_t = ops.add_noise_from(x_s, self._randn(x_s.shape), t, s)
        v_cond, v_uncond = self._teacher_velocity(x_t, t, r.cond, r.uncond)
        v_fake = fake.predict(x_t, t, r.cond, self.micro)
        return x_t, t, s, v_cond, v_uncond, v_fake

    def _dmd_loss(self, cond, x_s, x_t, t, s, v_cond, v_uncond, v_fake) -> Tensor:
        """Eq. 11's loss over the frames the generator makes (a given first frame is left out)."""
        x_s, x_t, v_cond, v_fake = (generated_frames(a, cond) for a in (x_s, x_t, v_cond, v_fake))
        return dmd_generator_loss(
            x_s,
            v_cond,
            v_fake,
            t,
            s,
            v_teacher_uncond=None if v_uncond is None else generated_frames(v_uncond, cond),
            guidance_scale=self.guidance,
            normalize=self.config.normalize_gradient,
            x_t=x_t,
        )

    def _generator_step_last(self, k, expert, r: Rollout, fake, weight=1.0, metrics=None) -> float:
        """One graded step: find the DMD direction (teacher vs `fake`, weighted) with the step
        run forward-only, then run the step again inside the expert's forward-backward schedule
        call. With `metrics` (the main DMD step), the adversarial term joins (levers)."""
        (t_from, t_to), noise = r.steps[0], r.noises[0]
        x_s = self._finish(expert, r)
        x_t, t, s, v_cond, v_uncond, v_fake = self._dmd_terms(k, x_s, r, fake)
        gan = None if metrics is None else self.levers.adversarial(k, x_t, t, s, r.cond)
        if gan is not None:
            metrics["gan_generator_loss"] = gan.value

        def loss_fn(v: Tensor, i: Tensor) -> Tensor:
            x_out = FLOW_MATCHING.denoise_step(
                r.x[i], v, t_from, t_to, noise=None if noise is None else noise[i]
            )
            uncond = None if v_uncond is None else v_uncond[i]
            cond = r.cond.select(i)
            loss = self._dmd_loss(cond, x_out, x_t[i], t[i], s, v_cond[i], uncond, v_fake[i])
            loss = weight * loss
            return loss if gan is None else loss + gan.loss(x_out, i)

        t_in = torch.full((self.rank_batch,), t_from, device=self.device)
        return expert.train(r.x, t_in, r.cond, loss_fn, self.micro)

    def _generator_step_through_all(self, k: int, expert, r: Rollout, metrics: dict) -> float:
        """Backpropagation through every step of the phase (pipeline_parallel = 1)."""
        module = expert.module
        module.train()
        x = r.x
        for (t_from, t_to), noise in zip(r.steps, r.noises):
            t_in = torch.full((x.shape[0],), t_from, device=self.device)
            with pipeline.outside_schedules():
                out = module(**model_inputs(expert.arch, x.to(expert.dtype), t_in, r.cond))
            v = velocity_from_output(expert.arch, out, x).float()
            x = FLOW_MATCHING.denoise_step(x, v, t_from, t_to, noise=noise)
        x_t, t, s, v_cond, v_uncond, v_fake = self._dmd_terms(k, x.detach(), r, self._fake(k))
        loss = self._dmd_loss(r.cond, x, x_t, t, s, v_cond, v_uncond, v_fake)
        gan = self.levers.adversarial(k, x_t, t, s, r.cond)
        if gan is not None:
            metrics["gan_generator_loss"] = gan.value
            loss = loss + gan.loss(x, torch.arange(len(x), device=x.device))
        with pipeline.outside_schedules():
            pipeline.backward(loss, module)
        return loss.item()

    def _step(self, trained: TrainedModel, role: str, r: Rollout) -> float:
        """Average gradients over data-parallel ranks, clip, and step unless they are not
        finite (then the update is skipped, counted per role and reported with the batch's
        non-finite conditions; the norm is global, so every rank skips the same updates)."""
        norm = trained.step()
        in_a_row = self.state.skips_in_a_row
        in_a_row[role] = 0 if math.isfinite(norm) else in_a_row.get(role, 0) + 1
        if not math.isfinite(norm):
            skipped = self.state.skipped
            skipped[role] = skipped.get(role, 0) + 1
            conditions = metrics_log.nonfinite_conditions(r)  # collective: every rank skips
            if self.is_logger:
                tqdm.write(
                    f"{role} update skipped: non-finite gradient (norm {norm}), "
                    f"{skipped[role]} so far; "
                    + (
                        describe_nonfinite(conditions)
                        if conditions
                        else "the batch's conditions are finite"
                    )
                )
        return norm


    # --- the run ------------------------------------------------------------------------------

    @property
    def total_iterations(self) -> int:
        return self.config.num_phases * self.config.iterations_per_phase

    def shape_of(self, iteration: int) -> tuple[int, int, int, int]:
        """The latent shape iteration `iteration` trains at: drawn by latent_shape_weights from
        a generator seeded by the run's seed and the iteration, so every rank (and a resumed
        run) draws the same, whatever its data-parallel rank's random streams did."""
        if len(self.latent_shapes) == 1:
            return self.latent_shapes[0]
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 7919 * iteration)
        weights = torch.tensor(self.shape_weights, dtype=torch.float64)
        return self.latent_shapes[int(torch.multinomial(weights, 1, generator=generator))]

    def phase_of(self, iteration: int) -> int:
        if self.config.phase_order == "alternating":
            return iteration % self.config.num_phases + 1
        return iteration // self.config.iterations_per_phase + 1

    def train(self) -> dict:
        """Run (or continue) the distillation; returns the last logged metrics. SIGTERM or
        SIGUSR1 (a scheduler's preemption notice) ends it after the current iteration with a
        checkpoint; `stopped_early` then says so and --resume continues."""
        config, state = self.config, self.state
        if self.is_logger:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                str(self.run_dir / "tensorboard"), purge_step=state.iteration
            )
        window: list[dict] = []
        bar = tqdm(
            total=self.total_iterations,
            initial=state.iteration,
            desc=f"{config.algorithm} ({config.num_steps} steps, {config.num_phases} phases)",
            disable=not (self.show_progress and self.is_logger),
            mininterval=1.0,
        )
        last = {}
        with stop_on_signals() as stop_requested:
            while state.iteration < self.total_iterations:
                metrics = self._iteration()
                window.append(metrics)
                bar.update(1)
                bar.set_postfix(
                    phase=metrics["phase"],
                    gen=f"{metrics['generator_loss']:.3g}",
                    fake=f"{metrics['fake_loss']:.3g}",
                )
                done = state.iteration == self.total_iterations
                stop = agree(stop_requested())
                if state.iteration % config.log_every == 0 or done or stop:
                    last = metrics_log.log_window(self, window)
                    window = []
                if state.iteration % config.sample_every == 0 or done:
                    log_samples(self)
                diverged = metrics_log.divergence(self)
                if state.iteration % config.checkpoint_every == 0 or done or stop or diverged:
                    self.save_checkpoint()
                if stop or diverged:
                    self.stopped_early, self.diverged = stop, diverged
                    break
        bar.close()
        if not (self.stopped_early or self.diverged):
            self.diverged = metrics_log.untrained_experts(self)
        if not (self.stopped_early or self.diverged):
            self.export()
        if self.writer is not None:
            self.writer.close()
        return last

    def _iteration(self) -> dict:
        """fake_updates fake updates, then one generator update, in the phase due."""
        config, state = self.config, self.state
        k = self.phase_of(state.iteration)
        if config.phase_order == "sequential" and k != state.phase:
            self._retire_phase(state.phase)
            state.phase = k
        self.latent_shape = self.shape_of(state.iteration)
        start = time.perf_counter()
        fake = [self.fake_update(k) for _ in range(config.fake_updates)]
        metrics = {
            "phase": k,
            "shape": self.latent_shapes.index(self.latent_shape),  # index in latent_shapes
            **{key: sum(m[key] for m in fake) / len(fake) for key in fake[0]},
            **self.generator_update(k),
            "seconds": time.perf_counter() - start,
        }
        state.iteration += 1
        return metrics

    # --- sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Conditions) -> Tensor:
        """The N-step MoE generator from noise (the weights being trained)."""
        x, t = noise, self.timesteps
        renoise = torch.Generator().manual_seed(self.config.seed + 7)
        for i in range(self.config.num_steps):
            step_noise = None
            if self.config.step_noise == "renoise" and t[i + 1] > 0:
                step_noise = torch.randn(x.shape, generator=renoise).to(self.device)
            x = self._advance(self._expert_for_step(i), x, t[i], t[i + 1], cond, step_noise)
        return with_first_frame(x, cond)

    # --- checkpoints and export ---------------------------------------------------------------

    def export(self) -> Path:
        return export_generator(self)

    def save_checkpoint(self) -> Path:
        return resume.save(self)

    def load_checkpoint(self, path: Path) -> None:
        resume.restore(self, path)

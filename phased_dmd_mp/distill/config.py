"""The distillation run's one config: what to distill, how, and where it runs.

Load with `phased_dmd_mp.config.load_config(DistillConfig, path, overrides)`: unknown keys,
wrong types, bad ranges and inconsistent step/phase counts are `ConfigError`s naming the key.

Algorithms (paper section 2; docs/method.md):
  phased_dmd    N steps in K phases, one generator expert per phase, trained in sequence
                (earlier experts frozen), the fake model re-initialised from the teacher each
                phase and trained by subinterval score matching (Eq. 13; Eq. 4 in the last
                phase, where s = 0). Inside a phase of several steps the gradient flows through
                a random last step (`phase_gradient: sgts`, the paper's 4-step 2-phase runs,
                Fig. 1d) or through all of them (`all`).
  dmd           one step, one expert (Yin et al.).
  few_step_dmd  N steps, one expert, backpropagation through every step.
  dmd_sgts      N steps, one expert, stochastic gradient truncation (Huang et al.).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from phased_dmd_mp.losses import DEFAULT_MAX_WEIGHT
from phased_dmd_mp.parallel.layout import sequence_parallel_on
from phased_dmd_mp.schedule import injection_interval, phase_step_boundaries, timestep_table

Algorithm = Literal["phased_dmd", "dmd", "few_step_dmd", "dmd_sgts"]

# Keys a resumed run may change: run mechanics, which never change the trained numbers
# (optimizer_offload: bit for bit on CPU; on a GPU up to the last bit of some elements per
# step, distill/host_optimizer.py).
RESUMABLE_KEYS = frozenset(
    {
        "optimizer_offload",
        "activation_offload",
        "log_every",
        "sample_every",
        "checkpoint_every",
        "keep_last",
        "collective_timeout",
        "max_consecutive_skips",
    }
)


@dataclass(frozen=True)
class DistillConfig:
    # --- what to distill ---
    # Teacher directory (pretrain_teacher's or prepare's output): teacher.yaml, conditions/ and
    # the transformer, or the paths of the diffusers folders holding it.
    teacher: str = "runs/teacher"
    # Low-noise expert of a two-expert (Wan2.2) teacher, a diffusers transformer folder;
    # default: teacher.yaml's transformer_2.
    teacher_low_noise: str | None = None
    # Timestep t in (0, 1) at which a two-expert teacher switches from its high- to its
    # low-noise expert (0.875 Wan2.2 T2V, 0.9 I2V); default: teacher.yaml's boundary_ratio.
    moe_boundary: float | None = None
    conditions: str | None = None  # condition set directory; default: <teacher>/conditions
    # What the teacher is, for preflight before the teacher is on disk; a run checks that the
    # teacher directory agrees. A configs/models/ name (wan2.1_t2v_14b) or a YAML file's path.
    architecture: str | None = None
    # The teacher's latents [C, F, H, W] at the recipe's resolution (Wan 480 x 832 x 81:
    # [16, 21, 60, 104]); with architecture, what preflight plans with.
    latent_shape: tuple[int, int, int, int] | None = None
    # The generator experts' starting weights when not the teacher's: a diffusers transformer
    # folder, or a pipeline folder (its transformer/), e.g. Wan2.1-T2V-1.3B under a 14B
    # teacher. Any size (widths, layers, heads), but the teacher's latent space and
    # conditioning (latent channels, patch size, text width, image conditioning); the export
    # writes its architecture. Default: the teacher.
    student: str | None = None
    # What each phase's fake model starts from: the teacher (the paper's) or the student (a
    # fake of the student's size, as the official trainer's 1.3B-from-14B recipe).
    fake_init: Literal["teacher", "student"] = "teacher"
    # What the student is, for preflight before the student is on disk (as `architecture` for
    # the teacher); a run checks that the student folder agrees. A configs/models/ name
    # (wan2.1_t2v_1.3b) or a YAML file's path.
    student_architecture: str | None = None
    # Latent shapes [C, F, H, W] to train at, one per iteration (every sample of a batch the
    # same), drawn with latent_shape_weights (default: equal) from the iteration number, so
    # every rank and a resumed run draw alike. Image conditions keep the size they were
    # prepared at (a TI2V first frame: its grid). Default: teacher.yaml's latent_shape.
    latent_shapes: tuple[tuple[int, int, int, int], ...] = ()
    latent_shape_weights: tuple[float, ...] = ()  # how often each of latent_shapes is drawn
    # --- algorithm ---
    # phased_dmd (the paper's), or a baseline: dmd (one step), few_step_dmd (N steps,
    # backpropagation through all of them), dmd_sgts (N steps, stochastic gradient truncation).
    algorithm: Algorithm = "phased_dmd"
    num_steps: int = 4  # sampling steps N of the distilled generator
    num_phases: int = 2  # phases K, one generator expert each; must divide num_steps
    # Inside a phase of several steps, backpropagate through one random step (sgts, the
    # paper's 4-step 2-phase runs) or through all of them (all: memory grows with the steps).
    phase_gradient: Literal["sgts", "all"] = "sgts"
    # Where a phase ending at time s injects noise to score its output: the reverse nested
    # interval (s, 1) (the paper's) or its own steps' interval (disjoint: TDM's, an ablation).
    intervals: Literal["nested", "disjoint"] = "nested"
    # sequential: each phase trains to the end, earlier experts frozen (the paper's);
    # alternating: the phases take turns, one iteration each (LightX2V's schedule).
    phase_order: Literal["sequential", "alternating"] = "sequential"
    shift: float | None = None  # timestep shift of the student's steps; default: the teacher's
    # How a generator step moves its predicted x_0 to the next timestep: with the predicted
    # noise (deterministic, the Euler step) or with fresh noise (renoise, DMD2's sampler).
    step_noise: Literal["deterministic", "renoise"] = "deterministic"
    # [low, high] in shifted time t (the teacher's timestep / 1000, as moe_boundary): every
    # phase injects noise only inside it.
    t_range: tuple[float, float] = (0.02, 0.98)
    # One [low, high] per phase (exactly num_phases entries), in shifted time t like t_range:
    # phase k injects noise in its interval (intervals) within t_range and entry k, drawn
    # uniformly in unshifted time (method.md, section 3). Wan2.2's [[0.875, 1], [0, 1]] keeps
    # phase 1 above the teacher's boundary, on its high-noise expert; the bound is not derived
    # from moe_boundary: give the teacher's (0.9 for I2V). Default: no limit.
    phase_t_ranges: tuple[tuple[float, float], ...] = ()
    # Teacher CFG scale g in uncond + g (cond - uncond): 1 = no guidance (the convention
    # cond + g' (cond - uncond) has g' = g - 1); default: teacher.yaml's guidance_scale.
    guidance_scale: float | None = None
    normalize_gradient: bool = False  # DMD2's per-sample normalisation of the generator gradient
    max_weight: float = DEFAULT_MAX_WEIGHT  # cap of Eq. 13's weight 1 / sigma_{t|s}^2
    # --- optimisation ---
    iterations_per_phase: int = 200  # iterations (generator updates) per phase
    fake_updates: int = 5  # fake-model updates per generator update
    batch_size: int = 64  # samples per update, over all data-parallel ranks
    # Samples per forward and backward on each rank (gradient accumulation); divides the
    # rank's batch (batch_size / DP); default: the whole rank batch at once.
    micro_batch_size: int | None = None
    generator_lr: float = 1e-4  # AdamW learning rate of the generator experts
    fake_lr: float = 1e-4  # AdamW learning rate of the fake model
    betas: tuple[float, float] = (0.0, 0.999)  # AdamW betas of both (beta1 0, as in DMD2)
    weight_decay: float = 0.0  # AdamW weight decay of both
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    ema_decay: float | None = None  # EMA of the generator experts (the export uses it when set)
    # Generator experts as full copies of the teacher (full) or as LoRA adapters on its shared,
    # frozen weights (lora, the paper's: far less memory).
    generator_adapter: Literal["full", "lora"] = "full"
    lora_rank: int = 64  # rank of each LoRA adapter (the paper's 64)
    lora_alpha: float = 8.0  # an adapter adds (lora_alpha / lora_rank) B A x (the paper's 8)
    # --- quality levers beyond the paper (docs/method.md section 9), each off by default ---
    # Real latents (a latent set, data/real_data.py) for real_critic_weight and gan_weight;
    # default: <teacher>/real_data (pretrain_teacher writes the digits' or mixture's).
    real_data: str | None = None
    # IDA (implicit distribution alignment; LightX2V lightx2v_train's `dmd.ida`, from SenseFlow):
    # after each applied generator update, every weight of the fake expert that started from the
    # same teacher expert moves toward the generator's, fake <- (1 - w) fake + w generator
    # (LightX2V: w = 0.03, its decay 0.97). LoRA experts blend in merged.
    ida_weight: float = 0.0
    # Diversity loss (LightX2V lightx2v_train's `dmd.div_loss`, weight 0.05): phase 1's expert,
    # at the first step (t = 1, the rollout's noise), regresses its velocity toward the straight
    # line to a teacher anchor: the guided teacher run diversity_anchor_steps steps of a
    # diversity_teacher_steps-step sampler from the same noise. With it, phase 1's DMD gradient
    # never runs through the first step (needs 2+ steps in phase 1), as LightX2V does.
    diversity_loss_weight: float = 0.0
    diversity_teacher_steps: int = 40  # steps of the anchor's sampler (LightX2V's Wan2.2: 40)
    diversity_anchor_steps: int = 10  # its steps run to the anchor (LightX2V's Wan2.2: 10)
    # Real-data critic (LightX2V lightx2v_train's `fake_real_high` / `fake_real_low`, weight
    # 0.1): real latents noised to a fixed t, one jump of the phase's expert to its boundary s, a
    # second fake model per phase trained on those outputs only, and an extra DMD term of teacher
    # vs that critic at them, weighted real_critic_weight.
    real_critic_weight: float = 0.0
    # t per phase where real latents enter (phase k: t_{b_k} < t <= t_{b_{k-1}}, t < 1); default
    # the phase's first sampler step below t = 1 (LightX2V: its 750 and 500 of 1000, shift 7)
    real_critic_t: tuple[float, ...] = ()
    # Adversarial loss (DMD2; NVlabs FastGen and NeMo DFM's DMD branch, weight 0.03): a small
    # discriminator head on the fake model's intermediate features tells real latents from the
    # generator's, both noised to the phase's injection t; the generator gets gan_weight x the
    # non-saturating GAN loss through the fake model (frozen for it) into its output.
    gan_weight: float = 0.0
    # Fake-model layers (0-based) whose outputs feed the head; default the layers at 1/2 and
    # 3/4 of the depth and the last (FastGen on Wan's 30 layers: 15, 22, 29)
    gan_layers: tuple[int, ...] = ()
    # --- runtime ---
    tensor_parallel: int = 1  # GPUs each layer is split over (megatron tensor parallelism)
    # Pipeline stages the layers are split into; data parallel is the rest of the world,
    # world size / (tensor_parallel x pipeline_parallel x context_parallel).
    pipeline_parallel: int = 1
    # Split the token rows over the tensor-parallel ranks outside attention and the MLP
    # (megatron's sequence parallelism): each keeps 1 / tensor_parallel of a layer's input.
    # null: on where tensor_parallel > 1; true needs tensor_parallel > 1.
    sequence_parallel: bool | None = None
    # Ranks that split every layer's token rows, trading them for attention-head shards around
    # self-attention (Ulysses all-to-all); num_attention_heads must divide by tensor_parallel x
    # context_parallel. The ranks of one context-parallel group draw the same samples.
    context_parallel: int = 1
    dtype: Literal["float32", "bfloat16"] = "float32"  # weights the models compute with
    # With dtype bfloat16: float32 keeps fp32 main params, gradient buffers and Adam moments
    # (megatron's mixed precision); bfloat16 steps the bf16 weights themselves (pure bf16, needs
    # distributed_optimizer false), where small updates round away (distill/optim.py). Must be
    # float32 when dtype is float32.
    main_params_dtype: Literal["float32", "bfloat16"] = "float32"
    distributed_optimizer: bool = True  # ZeRO-1: main params and moments split over DP ranks
    # fp32 main params, Adam moments and EMA of the trained models in host memory (pinned),
    # stepped there by torch's fused CPU AdamW; the GPU keeps weights and gradient buffers
    # (distill/host_optimizer.py). Needs main_params_dtype float32; a resume may switch it.
    optimizer_offload: bool = False
    recompute: bool = False  # recompute each layer's activations in backward: less memory
    # With recompute: each layer's input, all that a recomputed layer keeps for backward, waits
    # in host memory (pinned) until the layer's backward (parallel/offload.py)
    activation_offload: bool = False
    # FP8 linears on FP8 GPUs: te (Transformer Engine) or torch (torch._scaled_mm; takes LoRA)
    fp8: Literal["off", "te", "torch"] = "off"
    # Fused loss kernels: where they support the inputs (auto), always (fused: an error says
    # why they cannot run) or never (reference: the pure-torch ops).
    kernels: Literal["auto", "fused", "reference"] = "auto"
    seed: int = 0  # of the noise, timesteps and conditions drawn (a stream per DP rank)
    # --- bookkeeping ---
    log_every: int = 10  # iterations between log lines and tensorboard points
    # Iterations between the fixed-seed sample grids (RUN/samples/iter_N.png, tensorboard) and
    # their diversity proxy
    sample_every: int = 100
    checkpoint_every: int = 100  # iterations between checkpoints (RUN/checkpoints/step-N)
    keep_last: int = 2  # checkpoints kept; older ones are deleted
    # --- cluster ---
    # Seconds a collective may wait for a rank before the job fails (a hung or lost rank):
    # torch.distributed's process group and megatron's groups. A lost node usually fails a
    # collective at once; a hung rank is found only after this timeout.
    collective_timeout: float = 600.0
    # Stop (checkpoint, exit non-zero, no export) after this many updates of one model in a row
    # were skipped for a non-finite loss or gradient: the run has diverged.
    max_consecutive_skips: int = 20

    def __post_init__(self):
        if self.algorithm == "dmd" and self.num_steps != 1:
            raise ValueError(
                f"algorithm dmd is one-step: num_steps must be 1, got {self.num_steps}"
            )
        if self.algorithm != "phased_dmd" and self.num_phases != 1:
            raise ValueError(
                f"algorithm {self.algorithm} trains one expert: num_phases must be 1, "
                f"got {self.num_phases}"
            )
        if any(d < 1 for shape in self.latent_shapes for d in shape):
            raise ValueError(f"latent_shapes must be positive, got {self.latent_shapes}")
        if self.latent_shape_weights and not self.latent_shapes:
            raise ValueError("latent_shape_weights needs latent_shapes (the shapes they weight)")
        if self.latent_shape_weights and (
            len(self.latent_shape_weights) != len(self.latent_shapes)
            or not all(w > 0 for w in self.latent_shape_weights)
        ):
            raise ValueError(
                f"latent_shape_weights needs one weight > 0 per latent shape "
                f"({len(self.latent_shapes)}), got {list(self.latent_shape_weights)}"
            )
        if self.fake_init == "student" and self.student is None:
            raise ValueError(
                "fake_init: student needs `student` (the transformer folder the generator "
                "starts from); without one the fake starts from the teacher"
            )
        if self.student_architecture is not None and self.student is None:
            raise ValueError(
                "student_architecture names the architecture of `student`, which is not set"
            )
        try:
            phase_step_boundaries(self.num_steps, self.num_phases)
        except ValueError as error:
            raise ValueError(f"num_steps / num_phases: {error}") from None
        if (
            self.phase_gradient == "all"
            and self.pipeline_parallel > 1
            and self.steps_with_gradient > 1
        ):
            raise ValueError(
                "backpropagating through several steps needs pipeline_parallel = 1 "
                "(use phase_gradient: sgts, or algorithm dmd_sgts)"
            )
        lo, hi = self.t_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"t_range must satisfy 0 <= low < high <= 1, got {self.t_range}")
        if self.phase_t_ranges and len(self.phase_t_ranges) != self.num_phases:
            raise ValueError(
                f"phase_t_ranges needs one range per phase ({self.num_phases}), "
                f"got {len(self.phase_t_ranges)}"
            )
        for lo, hi in self.phase_t_ranges:
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(
                    f"phase_t_ranges entries need 0 <= low < high <= 1, got {(lo, hi)}"
                )
        if self.moe_boundary is not None and not 0.0 < self.moe_boundary < 1.0:
            raise ValueError(f"moe_boundary must be in (0, 1), got {self.moe_boundary}")
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        for name in (
            "iterations_per_phase",
            "fake_updates",
            "batch_size",
            "tensor_parallel",
            "pipeline_parallel",
            "context_parallel",
            "log_every",
            "sample_every",
            "checkpoint_every",
            "keep_last",
            "max_consecutive_skips",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        sequence_parallel_on(self.sequence_parallel, self.tensor_parallel)
        if not self.collective_timeout > 0:
            raise ValueError(
                f"collective_timeout must be > 0 seconds, got {self.collective_timeout}"
            )
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if not (self.generator_lr > 0 and self.fake_lr > 0):
            raise ValueError("generator_lr and fake_lr must be > 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if self.grad_clip < 0 or self.weight_decay < 0 or not self.max_weight > 0:
            raise ValueError("grad_clip and weight_decay must be >= 0 and max_weight > 0")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.lora_rank < 1 or not self.lora_alpha > 0:
            raise ValueError(
                f"lora_rank must be >= 1 and lora_alpha > 0, got {self.lora_rank}, {self.lora_alpha}"
            )
        if self.generator_adapter == "lora" and self.fp8 == "te":
            raise ValueError(
                "LoRA experts need megatron's linears: use fp8 'torch' or 'off' with generator_adapter lora"
            )
        if self.main_params_dtype == "bfloat16" and self.dtype == "float32":
            raise ValueError("main_params_dtype bfloat16 needs dtype bfloat16")
        if self.main_params_dtype == "bfloat16" and self.distributed_optimizer:
            raise ValueError(
                "main_params_dtype bfloat16 keeps no fp32 main params to shard: "
                "set distributed_optimizer false"
            )
        if self.activation_offload and not self.recompute:
            raise ValueError(
                "activation_offload moves the layer inputs that recompute keeps: set recompute "
                "true or activation_offload false"
            )
        if self.optimizer_offload and self.main_params_dtype == "bfloat16":
            raise ValueError(
                "optimizer_offload moves fp32 main params to the host and main_params_dtype "
                "bfloat16 keeps none: set main_params_dtype float32 or optimizer_offload false"
            )
        for name in ("ida_weight", "diversity_loss_weight", "real_critic_weight", "gan_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.ida_weight < 1:
            raise ValueError(f"ida_weight must be < 1 (1 replaces the fake), got {self.ida_weight}")
        if not 1 <= self.diversity_anchor_steps <= self.diversity_teacher_steps:
            raise ValueError(
                "diversity_anchor_steps must be in [1, diversity_teacher_steps], got "
                f"{self.diversity_anchor_steps} of {self.diversity_teacher_steps}"
            )
        if self.diversity_loss_weight and self.steps_per_phase < 2:
            raise ValueError(
                "diversity_loss_weight needs 2+ steps in phase 1 (the first step learns from the "
                f"anchor, DMD from the later ones); got {self.steps_per_phase}"
            )
        if self.real_critic_t and len(self.real_critic_t) != self.num_phases:
            raise ValueError(
                f"real_critic_t needs one t per phase ({self.num_phases}), got "
                f"{len(self.real_critic_t)}"
            )
        if any(layer < 0 for layer in self.gan_layers):
            raise ValueError(f"gan_layers are 0-based layer indices, got {list(self.gan_layers)}")
        if (self.real_critic_weight or self.gan_weight) and len(self.latent_shapes) > 1:
            raise ValueError(
                "real_critic_weight and gan_weight compare with real latents of one shape: "
                "use one of latent_shapes with them"
            )
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")

    def injection_range(self, phase: int, shift: float) -> tuple[float, float]:
        """Where phase `phase` (1-based) injects noise, in shifted time: its interval
        (schedule.injection_interval) within t_range and its phase_t_ranges entry.

        Raises ValueError when they do not overlap."""
        low, high = injection_interval(
            phase, self.num_steps, self.num_phases, shift, self.intervals
        )
        lo, hi = self.t_range
        if self.phase_t_ranges:
            phase_lo, phase_hi = self.phase_t_ranges[phase - 1]
            lo, hi = max(lo, phase_lo), min(hi, phase_hi)
        if max(low, lo) >= min(high, hi):
            raise ValueError(
                f"phase {phase}'s noise-injection interval ({low:.4g}, {high:.4g}) does not "
                f"overlap t_range / phase_t_ranges ({lo:.4g}, {hi:.4g})"
            )
        return max(low, lo), min(high, hi)

    def real_critic_timestep(self, phase: int, shift: float) -> float:
        """Where phase `phase` (1-based) feeds real latents to its expert for the real-data
        critic: its real_critic_t entry, or its first sampler step below t = 1.

        Raises ValueError when the entry lies outside the phase's steps or no step is below 1."""
        table = timestep_table(self.num_steps, shift).tolist()
        bounds = phase_step_boundaries(self.num_steps, self.num_phases)
        first, end = bounds[phase - 1], bounds[phase]
        s, start = table[end], table[first]
        if not self.real_critic_t:
            below = [table[i] for i in range(first, end) if table[i] < 1.0]
            if not below:
                raise ValueError(
                    f"real_critic_weight: phase {phase}'s only step starts at t = 1 (pure noise), "
                    "where real latents carry nothing: set real_critic_t"
                )
            return below[0]
        t = self.real_critic_t[phase - 1]
        if not (s < t <= start and t < 1.0):
            raise ValueError(
                f"real_critic_t[{phase - 1}] = {t} must lie in phase {phase}'s steps "
                f"({s:.4g}, {min(start, 1.0):.4g}{']' if start < 1 else ')'}"
            )
        return t

    def gan_feature_layers(self, num_layers: int) -> tuple[int, ...]:
        """The fake-model layers feeding the discriminator head (gan_layers, or by default the
        layers at 1/2 and 3/4 of the depth and the last). Raises ValueError past the depth."""
        layers = self.gan_layers or (num_layers // 2, 3 * num_layers // 4, num_layers - 1)
        if max(layers) >= num_layers:
            raise ValueError(
                f"gan_layers {list(layers)}: the fake model has layers 0..{num_layers - 1}"
            )
        return tuple(sorted(set(layers)))

    @property
    def uses_sequence_parallel(self) -> bool:
        """`sequence_parallel` resolved: null means on where tensor_parallel > 1."""
        return sequence_parallel_on(self.sequence_parallel, self.tensor_parallel)

    @property
    def steps_per_phase(self) -> int:
        return self.num_steps // self.num_phases

    @property
    def steps_with_gradient(self) -> int:
        """How many sampler steps one generator update backpropagates through (at most)."""
        if self.algorithm in ("dmd_sgts",) or (
            self.algorithm == "phased_dmd" and self.phase_gradient == "sgts"
        ):
            return 1
        return self.steps_per_phase

    @property
    def truncates(self) -> bool:
        """Stochastic gradient truncation: each rollout ends at a random step of the phase."""
        return self.algorithm == "dmd_sgts" or (
            self.algorithm == "phased_dmd" and self.phase_gradient == "sgts"
        )

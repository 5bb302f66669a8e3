"""Memory of one rank of a distillation run, per phase, before any GPU time.

`estimate(plan)` adds up, for each phase and each distinct pipeline stage (first, middle,
last), what that rank holds at the peak of an iteration (fake updates, then the generator
update):

  parameters        every model's weights on the stage: the teacher (one or two experts),
                    a `student` (frozen: the model the experts start from), the generator
                    experts (full copies of phases 1..k in phase k, each made when its phase
                    first trains; or with LoRA the adapters of every expert on the teacher's,
                    or the student's, shared weights) and the phase's fake model (the teacher
                    experts its noise injection reaches, or the student with `fake_init:
                    student`), in the run's dtype
  gradients         fp32 DDP buffers (`main_grad`) of what the phase trains: the fake model
                    and the phase's expert (all its weights, or its adapter)
  main parameters   fp32 copies of the trained weights (bf16 runs), split over data-parallel
                    ranks with the distributed optimizer (ZeRO-1)
  optimizer states  Adam's exp_avg and exp_avg_sq of the trained weights (fp32; split alike)
  EMA               fp32 EMA of the phase's expert (split alike) and of finished experts
  activations       the largest DiT call of the iteration (`activations.py`): a training call
                    (layers x microbatches in flight + its peak), or a forward-only call (the
                    teacher on a guided pair of microbatches)
  buffers           the iteration's fp32 latents (rollout, noise, noised latents, teacher,
                    guided and fake velocities), the conditions and the pipeline's send and
                    receive buffers

and in host memory (`RankMemory.host`), per GPU:

  main parameters, optimizer states, EMA   with optimizer_offload, what the device then does
                    not hold (sharded alike), and the finished experts' EMA
  gradients in transit   with optimizer_offload, each trained role's two staging slots
                    (distill/host_optimizer.py: gradients in fp32, refreshed weights in bf16)
  activations       with activation_offload, every checkpointed layer input of the largest
                    training call (the device keeps the one layer being recomputed)

A student of another size than the teacher (`Plan.student_arch`) sizes the generator's
weights, states and training activations (and the fake's with `fake_init: student`); the
teacher's forward keeps its own. Sequence parallelism divides the per-token rows outside
attention and the MLP by TP, context parallelism every token feature by CP (activations.py).
Bytes per trained parameter follow `phased_dmd_mp/distill/optim.py`'s table; parameter counts
are exact (`parameters.py`). The result is in bytes; `Plan` says what is estimated;
`offload_traffic` the bytes offload moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from phased_dmd_mp.distill.config import DistillConfig
from phased_dmd_mp.distill.host_optimizer import CHUNK_ELEMENTS
from phased_dmd_mp.distill.models import experts_reached
from phased_dmd_mp.memory.activations import CallShape, activation_bytes
from phased_dmd_mp.memory.parameters import distinct_stages, stage_parameters
from phased_dmd_mp.models.config import QwenImageConfig, WanConfig
from phased_dmd_mp.schedule import phase_step_boundaries, timestep_table

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4
PARTS = ("parameters", "gradients", "main parameters", "optimizer states", "EMA",
         "activations", "buffers")  # fmt: skip
HOST_PARTS = ("main parameters", "optimizer states", "EMA", "gradients in transit",
              "activations")  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """A run to estimate: its config, the teacher architecture (both experts of a two-expert
    teacher share it), the latent shape [C, F, H, W], text tokens per sample and the world."""

    config: DistillConfig
    arch: WanConfig | QwenImageConfig
    latent_shape: tuple[int, int, int, int]
    text_tokens: int
    world_size: int
    shift: float
    two_expert_teacher: bool = False
    moe_boundary: float | None = None
    gpus_per_node: int = 8
    student_arch: WanConfig | QwenImageConfig | None = None  # the `student`'s, when set

    @property
    def generator_arch(self) -> WanConfig | QwenImageConfig:
        """What the generator experts are: the student, or the teacher."""
        return self.student_arch or self.arch

    @property
    def fake_arch(self) -> WanConfig | QwenImageConfig:
        """What the fake model is: the student with `fake_init: student`, else the teacher."""
        student_fake = self.student_arch is not None and self.config.fake_init == "student"
        return self.student_arch if student_fake else self.arch

    @property
    def tensor_parallel(self) -> int:
        return self.config.tensor_parallel

    @property
    def pipeline_parallel(self) -> int:
        return self.config.pipeline_parallel

    @property
    def context_parallel(self) -> int:
        return getattr(self.config, "context_parallel", 1)

    @property
    def sequence_parallel(self) -> bool:
        return getattr(self.config, "uses_sequence_parallel", False)

    @property
    def data_parallel(self) -> int:
        model_parallel = self.tensor_parallel * self.pipeline_parallel * self.context_parallel
        return self.world_size // model_parallel

    @property
    def rank_batch(self) -> int:
        return self.config.batch_size // self.data_parallel

    @property
    def micro_batch(self) -> int:
        return min(self.config.micro_batch_size or self.rank_batch, self.rank_batch)

    @property
    def tokens(self) -> int:
        """Image/video tokens per sample: latent frames x height x width over the patch."""
        _, frames, height, width = self.latent_shape
        patch = self.arch.patch_size
        pt, ph, pw = patch if isinstance(patch, tuple) else (1, patch, patch)
        return (frames // pt) * (height // ph) * (width // pw)


@dataclass
class RankMemory:
    """Bytes of one pipeline stage's ranks in one phase, by part (PARTS), with notes."""

    phase: int
    pp_rank: int
    parts: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)  # host memory per GPU, by HOST_PARTS

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())


def _trained_bytes(config: DistillConfig, data_parallel: int) -> tuple[dict, dict]:
    """Bytes per trained parameter by part (distill/optim.py's table): (device, host)."""
    dtype = config.dtype
    main_dtype = getattr(config, "main_params_dtype", "float32")
    shard = data_parallel if getattr(config, "distributed_optimizer", True) else 1
    if config.optimizer_offload:  # fp32 main params (a copy in fp32 too), moments, EMA on host
        host = {"main parameters": 4 / shard, "optimizer states": 8 / shard, "EMA": 4 / shard}
        return {"gradients": 4, "main parameters": 0, "optimizer states": 0, "EMA": 0}, host
    if dtype == "float32":
        device = {"gradients": 4, "main parameters": 0, "optimizer states": 8 / shard,
                  "EMA": 4 / shard}  # fmt: skip
    elif main_dtype == "bfloat16":  # pure bf16: bf16 gradients and moments, nothing sharded
        device = {"gradients": 2, "main parameters": 0, "optimizer states": 4, "EMA": 4}
    else:
        device = {"gradients": 4, "main parameters": 4 / shard, "optimizer states": 8 / shard,
                  "EMA": 4 / shard}  # fmt: skip
    return device, {}


def fake_experts(plan: Plan, phase: int) -> int:
    """How many teacher experts phase `phase`'s fake model copies: a two-expert teacher's
    experts that the phase's noise injection reaches (the trainer's rule); one student copy
    with `fake_init: student`."""
    if not plan.two_expert_teacher or plan.fake_arch is not plan.arch:
        return 1
    low, high = plan.config.injection_range(phase, plan.shift)
    return sum(experts_reached(low, high, plan.moe_boundary))


def lora_bases(plan: Plan) -> int:
    """Teacher experts that carry LoRA adapters: those owning a phase's first step (each gets
    num_phases adapters, as the trainer's `_generator_experts`); the student when there is one."""
    if not plan.two_expert_teacher or plan.student_arch is not None:
        return 1
    config = plan.config
    times = timestep_table(config.num_steps, plan.shift).tolist()
    starts = phase_step_boundaries(config.num_steps, config.num_phases)[:-1]
    return len({times[i] >= plan.moe_boundary for i in starts})


def _call_shape(plan: Plan) -> CallShape:
    return CallShape(plan.tokens, plan.text_tokens, plan.tensor_parallel,
                     plan.sequence_parallel, plan.context_parallel)  # fmt: skip


def _training_calls(plan: Plan, pp_rank: int) -> dict[str, tuple[int, int]]:
    """{training call: (bytes one layer keeps for backward, layer inputs kept at once)}."""
    config = plan.config
    shape, micro = _call_shape(plan), plan.micro_batch
    microbatches = plan.rank_batch // micro
    in_flight = min(plan.pipeline_parallel - pp_rank, microbatches)  # 1F1B warm-up depth
    calls = {}
    for role, adapter in (("fake", "full"), ("generator", config.generator_adapter)):
        arch = _role_arch(plan, role)
        layers = arch.num_layers // plan.pipeline_parallel
        kept = activation_bytes(arch, shape, micro, "layer", dtype=config.dtype, adapter=adapter,
                                recompute=config.recompute)  # fmt: skip
        steps = config.steps_with_gradient if role == "generator" else 1
        name = f"{role} training, {steps * in_flight} x {layers} layers x {micro} samples"
        calls[name] = kept, steps * in_flight * layers
    return calls


def _role_arch(plan: Plan, role: str) -> WanConfig | QwenImageConfig:
    return plan.fake_arch if role == "fake" else plan.generator_arch


def activations(plan: Plan, pp_rank: int) -> tuple[int, int, str]:
    """Peak activation bytes of the iteration's largest DiT call on stage pp_rank, the host
    bytes that call keeps there (activation_offload), and which call it is."""
    config, arch = plan.config, plan.arch
    shape, micro = _call_shape(plan), plan.micro_batch
    offload = config.activation_offload
    candidates = {}
    adapters = {"fake": "full", "generator": config.generator_adapter}
    for name, (kept, inputs) in _training_calls(plan, pp_rank).items():
        role = name.split()[0]
        peak = activation_bytes(_role_arch(plan, role), shape, micro, "train", dtype=config.dtype,
                                adapter=adapters[role], recompute=config.recompute)  # fmt: skip
        # offloaded: the device holds the one input being recomputed, the host the others
        on_device = min(inputs, 1) if offload else inputs
        candidates[name] = (on_device * kept + peak, (inputs - on_device) * kept)
    guided = 2 if (config.guidance_scale is None or config.guidance_scale != 1.0) else 1
    forward = activation_bytes(arch, shape, guided * micro, "forward", dtype=config.dtype)
    candidates[f"teacher forward, {guided * micro} samples"] = (forward, 0)
    name = max(candidates, key=lambda n: candidates[n][0])
    return *candidates[name], name


def offload_traffic(plan: Plan) -> dict[str, int]:
    """Bytes one GPU (first pipeline stage) moves between device and host per iteration
    (fake_updates fake updates, then a generator update) in the phase that moves most:
    optimizer offload's gradients down (fp32) and weights up (model dtype) per optimizer step,
    activation offload's layer inputs down and back up per training forward."""
    config = plan.config
    traffic = {"optimizer": 0, "activations": 0}
    shard = plan.data_parallel if config.distributed_optimizer else 1
    if config.optimizer_offload:
        per_element = FP32 + DTYPE_BYTES[config.dtype]
        for phase in range(1, config.num_phases + 1):
            fake, expert = _trained_elements(plan, phase, 0)
            moved = (config.fake_updates * fake + expert) / shard * per_element
            traffic["optimizer"] = max(traffic["optimizer"], round(moved))
    if config.activation_offload:
        shape, micro = _call_shape(plan), plan.micro_batch
        for role, adapter, calls in (("fake", "full", config.fake_updates),
                                     ("generator", config.generator_adapter,
                                      config.steps_with_gradient)):  # fmt: skip
            arch = _role_arch(plan, role)
            forwards = (plan.rank_batch // micro) * arch.num_layers // plan.pipeline_parallel
            kept = activation_bytes(arch, shape, micro, "layer", dtype=config.dtype,
                                    adapter=adapter, recompute=True)  # fmt: skip
            traffic["activations"] += 2 * calls * forwards * kept
    return traffic


def _trained_elements(plan: Plan, phase: int, pp_rank: int) -> tuple[int, int]:
    """Elements of the fake model and the expert phase `phase` trains on stage pp_rank."""
    config = plan.config
    lora = config.generator_adapter == "lora"
    layout = (plan.tensor_parallel, plan.pipeline_parallel, pp_rank, config.lora_rank * lora)
    expert = stage_parameters(plan.generator_arch, *layout)
    fake = stage_parameters(plan.fake_arch, *layout)
    return fake_experts(plan, phase) * fake.weights, expert.adapter if lora else expert.weights


def _in_transit(config: DistillConfig, elements: int, shard: int) -> int:
    """Host bytes of a trained role's two staging slots (distill/host_optimizer.py)."""
    owned = math.ceil(elements / shard)
    slots = min(2, math.ceil(owned / CHUNK_ELEMENTS))  # one chunk needs one slot
    weight = 0 if config.dtype == "float32" else DTYPE_BYTES[config.dtype]
    return slots * min(CHUNK_ELEMENTS, owned) * (FP32 + weight)


def buffers(plan: Plan, pp_rank: int) -> int:
    """The iteration's latent-sized fp32 tensors, the conditions and pipeline send/receive
    buffers."""
    latent = math.prod(plan.latent_shape) * plan.rank_batch * FP32
    # generator update: rollout x, x_s, noise, x_t, teacher cond + uncond, fake velocity, and
    # the guided pair's concatenated inputs and output (2 x each)
    latents = 11 * latent
    text_width = (
        plan.arch.text_dim if isinstance(plan.arch, WanConfig) else plan.arch.joint_attention_dim
    )
    conditions = 4 * plan.rank_batch * plan.text_tokens * text_width * FP32  # cond, uncond, pair
    pipeline = 0
    if plan.pipeline_parallel > 1:
        tokens = math.ceil(plan.tokens / plan.context_parallel)
        if plan.sequence_parallel:
            tokens = math.ceil(tokens / plan.tensor_parallel)
        rows = tokens + plan.text_tokens + 8
        hidden = max(plan.arch.hidden_size, plan.generator_arch.hidden_size)
        pipeline = 2 * rows * plan.micro_batch * hidden * DTYPE_BYTES[plan.config.dtype]
    return latents + conditions + pipeline


def estimate(plan: Plan) -> list[RankMemory]:
    """RankMemory of every phase x distinct pipeline stage. Sequential phases hold one phase's
    fake model and trained states at a time; `phase_order: alternating` holds all of them."""
    config, arch = plan.config, plan.arch
    dtype_bytes = DTYPE_BYTES[config.dtype]
    per_trained, per_trained_host = _trained_bytes(config, plan.data_parallel)
    shard = plan.data_parallel if config.distributed_optimizer else 1
    lora = config.generator_adapter == "lora"
    teacher_experts = 2 if plan.two_expert_teacher else 1
    result = []
    student = plan.student_arch is not None
    for pp_rank in distinct_stages(plan.pipeline_parallel):
        # (one cached count per architecture: the adapter's rank does not change the weights)
        layout = (plan.tensor_parallel, plan.pipeline_parallel, pp_rank, config.lora_rank * lora)
        stage = stage_parameters(arch, *layout)  # the teacher's (each expert's)
        generator = stage_parameters(plan.generator_arch, *layout)
        fake_stage = stage_parameters(plan.fake_arch, *layout)
        act, act_host, act_note = activations(plan, pp_rank)
        phases = range(1, config.num_phases + 1)
        for phase in phases:
            fakes = fake_experts(plan, phase)
            expert = generator.adapter if lora else generator.weights
            experts_trained = 1
            if config.phase_order == "alternating":  # every phase's fake and expert at once
                fakes, experts_trained = sum(fake_experts(plan, k) for k in phases), len(phases)
            # the teacher, and the frozen student the experts start from
            weights = teacher_experts * stage.weights + student * generator.weights
            if lora:  # num_phases adapters on each base owning a phase (teacher expert, student)
                adapters = lora_bases(plan) * config.num_phases
                weights += adapters * generator.adapter
            else:  # full copies, each made when its phase first trains (distill/trainer.py)
                copies = len(phases) if config.phase_order == "alternating" else phase
                weights += copies * generator.weights
            weights += fakes * fake_stage.weights
            trained = fakes * fake_stage.weights + experts_trained * expert
            parts = {"parameters": weights * dtype_bytes}
            for part in ("gradients", "main parameters", "optimizer states"):
                parts[part] = round(trained * per_trained[part])
            parts["EMA"] = 0
            host = {part: 0 for part in HOST_PARTS}
            if config.ema_decay is not None:  # trained experts' (sharded), finished ones' (full)
                finished = 0 if config.phase_order == "alternating" else phase - 1
                where, per = (host, per_trained_host) if config.optimizer_offload else (parts, per_trained)
                where["EMA"] = round(experts_trained * expert * per["EMA"])
                where["EMA"] += finished * expert * FP32
            if config.optimizer_offload:
                for part in ("main parameters", "optimizer states"):
                    host[part] = round(trained * per_trained_host[part])
                roles = [fakes * fake_stage.weights] if config.phase_order != "alternating" else [
                    fake_experts(plan, k) * fake_stage.weights for k in phases]  # fmt: skip
                roles += [expert] * experts_trained
                host["gradients in transit"] = sum(_in_transit(config, n, shard) for n in roles)
            parts["activations"] = act
            host["activations"] = act_host
            parts["buffers"] = buffers(plan, pp_rank)
            memory = RankMemory(phase, pp_rank, parts, host=host)
            memory.notes["activations"] = act_note
            experts_held = (
                f"{lora_bases(plan) * config.num_phases} adapters x {generator.adapter / 1e6:.3g}M"
                if lora
                else f"{copies} expert copies x {generator.weights / 1e9:.3g}B"
            )
            memory.notes["parameters"] = (
                f"per rank: teacher {teacher_experts} x {stage.weights / 1e9:.3g}B, "
                + (f"student {generator.weights / 1e9:.3g}B, " if student else "")
                + f"{experts_held}, fake {fakes} x {fake_stage.weights / 1e9:.3g}B"
            )
            result.append(memory)
    return result

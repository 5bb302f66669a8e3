"""Mixed precision, gradient reduction, the optimizer and the EMA of each trained model, done
with megatron-core's machinery (megatron's own recipe for bf16 training).

A `TrainedModel` is one role's trainable parameters (phase k's fake model: every parameter of
its copy; generator expert k: all of a full copy, or LoRA adapter k of the shared base) as a
megatron model chunk in `DistributedDataParallel` (contiguous gradient buffers: backward adds
each parameter's gradient into its `main_grad`, `finish_grad_sync` averages them over the
data-parallel ranks) with an optimizer from `get_megatron_optimizer` (torch AdamW inside where
Transformer Engine / apex are absent). `DistillConfig.dtype` and `main_params_dtype` pick:

  bf16 mixed  dtype bfloat16, main_params_dtype float32 (the default for bfloat16): bf16 weights
              for compute; gradients accumulated and reduced in fp32 buffers; fp32 main
              parameters and fp32 Adam moments (`Float16OptimizerWithFloat16Params`, or
              `DistributedOptimizer` when sharded) step, then cast back into the bf16 weights.
  bf16 pure   dtype bfloat16, main_params_dtype bfloat16: AdamW steps the bf16 weights with bf16
              gradients and bf16 moments (`FP32Optimizer` on bf16 parameters; megatron's clip
              asserts fp32 gradients, so this mode scales the bf16 ones by the same formula).
              At distillation learning rates most updates round away (two updates at lr 2e-6
              move the generator 31% as far as fp32 does, tests/test_distill_precision.py);
              kept only as an explicit choice for comparison.
  fp32        dtype float32: weights, gradients and moments in fp32 (`FP32Optimizer`, or
              `DistributedOptimizer` when sharded, whose main parameters are then views of the
              weights).

Sharding (`distributed_optimizer`, on by default, active where data_parallel > 1) is megatron's
ZeRO-1: each data-parallel rank keeps main parameters and Adam moments for 1/D of the elements,
gradients are reduce-scattered instead of all-reduced and the updated weights all-gathered.

Bytes per trained parameter on each rank (D data-parallel ranks; what the preflight planner
adds up for a role; frozen models, e.g. the teacher, finished experts and the shared base under
LoRA adapters, hold only their weights: 2 B in bf16, 4 B in fp32):

  part                              fp32   fp32 sharded   bf16 mixed   bf16 mixed sharded   bf16 pure
  weights                             4         4              2               2                2
  gradient buffer (main_grad)         4         4              4               4                2
  fp32 main parameters                -         -              4             4 / D              -
  Adam exp_avg + exp_avg_sq           8       8 / D            8             8 / D              4
  total per trained parameter        16     8 + 8 / D         18          6 + 12 / D            8
  EMA (generator, with ema_decay)     4       4 / D            4             4 / D              4

(Sharded, megatron aligns each parameter in its buffers to 64 elements and pads the buffer to a
multiple of D: nothing at real sizes, ~10% for the tests' tiny models.)

The EMA is fp32 and follows the main parameters (sharded alike); a finished expert's EMA is
gathered to full fp32 tensors (4 B per parameter on every rank) when its phase retires.

Checkpoints (`state_dict`) hold full fp32 tensors per trained parameter (main parameters, Adam
moments, EMA) plus the step count, independent of the data-parallel size and of sharding, so a
sharded run's state loads into an unsharded one and back; the runner still refuses another
data-parallel size because each rank's random streams are part of an exact resume. On disk, per
trained parameter and model-parallel rank (data-parallel rank 0 writes): 4 main + 8 moments
(+ 4 EMA), next to the runner's copy of the weights (2 bf16 / 4 fp32); whole tensors are gathered
one parameter at a time, so saving adds one fp32 parameter's worth of memory.

Optimizer offload (`optimizer_offload`, `offload=True`): the fp32 main parameters, Adam moments
and EMA live in host memory and step there (distill/host_optimizer.py), sharded alike; the device
keeps the weights and the gradient buffer (2 + 4 B per trained parameter in bf16 mixed, 4 + 4 in
fp32), the host 12 (+ 4 EMA) per parameter this rank updates. The state (and so the checkpoint)
is the same as without offload, which a resume may switch on or off. On a CPU device both paths
step with torch's fused AdamW kernel, so they agree bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from itertools import chain

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer import (
    DistributedOptimizer,
    Float16OptimizerWithFloat16Params,
    OptimizerConfig,
    get_megatron_optimizer,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from torch import Tensor, nn

from phased_dmd_mp.distill.host_optimizer import HostOptimizer
from phased_dmd_mp.parallel import pipeline
from phased_dmd_mp.parallel.cpu_compat import cuda_calls_on_cpu
from phased_dmd_mp.parallel.offload import HOST

MAIN_PARAMS_DTYPES = ("float32", "bfloat16")


class _TrainedChunk(MegatronModule):
    """A role's trained parameters as the model chunk megatron's DDP and optimizer take (the
    parameters stay those of the DiT that computes with them)."""

    def __init__(self, config: TransformerConfig, parameters: list[nn.Parameter]):
        super().__init__(config)
        self.trained = nn.ParameterList(parameters)


class TrainedModel:
    """Megatron DDP + optimizer over `parameters` (see the module docstring for precisions).

    Use per update: `zero_grad()`, forward-backward (gradients land in fp32 `main_grad`
    buffers through DDP's hooks, also when the DiT is called directly), `step()`. With
    `offload`, main parameters, moments and EMA are host tensors stepped by `HostOptimizer`.
    """

    def __init__(
        self,
        parameters: list[nn.Parameter],
        config: TransformerConfig,
        *,
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        grad_clip: float,
        main_params_dtype: str,
        shard: bool,
        offload: bool = False,
    ):
        if main_params_dtype not in MAIN_PARAMS_DTYPES:
            raise ValueError(
                f"main_params_dtype must be one of {MAIN_PARAMS_DTYPES}, got {main_params_dtype!r}"
            )
        self.parameters = parameters
        self.grad_clip = grad_clip
        # megatron's DDP and distributed optimizer work over data x context parallel ranks
        self.dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.sharded = shard and dist.get_world_size(self.dp_group) > 1
        half = parameters[0].dtype == torch.bfloat16
        mixed = half and main_params_dtype == "float32"
        self.pure_bf16 = half and not mixed
        if half and not mixed and self.sharded:
            raise ValueError(
                "main_params_dtype bfloat16 keeps no fp32 main parameters to shard: set "
                "distributed_optimizer false or main_params_dtype float32"
            )
        if offload and self.pure_bf16:
            raise ValueError(
                "optimizer_offload moves fp32 main parameters to the host and main_params_dtype "
                "bfloat16 keeps none: set main_params_dtype float32 or optimizer_offload false"
            )
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=mixed or not half, use_distributed_optimizer=self.sharded
        )
        optimizer_config = OptimizerConfig(
            optimizer="adam",
            lr=lr,
            min_lr=lr,
            weight_decay=weight_decay,
            adam_beta1=betas[0],
            adam_beta2=betas[1],
            clip_grad=grad_clip,
            bf16=mixed,
            params_dtype=parameters[0].dtype,
            use_distributed_optimizer=self.sharded,
        )
        with cuda_calls_on_cpu():
            self.ddp = DistributedDataParallel(
                config, ddp_config, _TrainedChunk(config, parameters)
            )
            if offload:
                self.optimizer, self.host = None, HostOptimizer(
                    parameters, self.ddp, sharded=self.sharded, lr=lr, betas=betas,
                    weight_decay=weight_decay,
                )  # fmt: skip
                self.main = self.host.main
            else:
                # config_overrides={}: weight decay on every parameter, as torch's AdamW does
                chained = get_megatron_optimizer(optimizer_config, [self.ddp], config_overrides={})
                (self.optimizer,), self.host = chained.chained_optimizers, None
                _fused_adamw_on_cpu(self.optimizer.optimizer)
                self.main = self._main_params()
        self.steps = 0  # successful optimizer steps (Adam's step count)
        self.ema: list[Tensor | None] | None = None  # fp32, like `self.main`

    def _main_params(self) -> list[tuple[Tensor, int, int] | None]:
        """Per trained parameter: (the tensor the optimizer steps, start, end) with start:end
        the part of the flattened parameter it holds on this rank (None: no part)."""
        opt = self.optimizer
        if isinstance(opt, DistributedOptimizer):
            models = chain(*opt.model_float16_groups, *opt.model_fp32_groups)
            mains = chain(*opt.shard_fp32_from_float16_groups, *opt.shard_fp32_groups)
            found = {}
            for model, main in zip(models, mains):
                piece = opt._get_model_param_range_map(model)["param"]
                found[model] = (main, piece.start, piece.end)
        elif isinstance(opt, Float16OptimizerWithFloat16Params):
            models = chain(*opt.float16_groups, *opt.fp32_from_fp32_groups)
            mains = chain(*opt.fp32_from_float16_groups, *opt.fp32_from_fp32_groups)
            found = {model: (main, 0, model.numel()) for model, main in zip(models, mains)}
        else:  # FP32Optimizer: the weights themselves step
            found = {p: (p, 0, p.numel()) for g in opt.optimizer.param_groups for p in g["params"]}
        return [found.get(p) for p in self.parameters]

    # --- one update ----------------------------------------------------------------------

    def zero_grad(self) -> None:
        with cuda_calls_on_cpu():
            self.ddp.zero_grad_buffer()
            if self.optimizer is not None:
                self.optimizer.zero_grad()

    def _clip_coefficient(self, norm: float) -> float:
        """megatron's clip_grad_by_total_norm_fp32: grad_clip / (norm + 1e-6) where < 1."""
        if self.grad_clip <= 0:
            return 1.0
        return min(1.0, self.grad_clip / (norm + 1.0e-6))

    def step(self) -> float:
        """Finalise the gradients (pipeline.finish_grad_sync: the average over data-parallel
        ranks, fp32, a reduce-scatter when sharded; the sequence-parallel sums over TP),
        clip them to `grad_clip` (global L2 norm over all model-parallel ranks) and step.
        Returns the norm before clipping; a non-finite norm skips the step (nothing changes)."""
        pipeline.finish_grad_sync(self.ddp)
        with cuda_calls_on_cpu():
            if self.host is not None:
                norm = self.host.grad_norm()
                if not math.isfinite(norm):
                    return norm
                self.host.step(self._clip_coefficient(norm))
                self.steps += 1
                return norm
            self.optimizer.prepare_grads()
            norm = self.optimizer.get_grad_norm()
            if not math.isfinite(norm):
                return norm
            if self.grad_clip > 0:  # scales by grad_clip / (norm + 1e-6) where that is < 1
                parameters = self.optimizer.get_parameters()
                if self.pure_bf16:  # megatron's clip asserts fp32 gradients; same formula
                    scale = self._clip_coefficient(norm)
                    if scale < 1.0:
                        torch._foreach_mul_(
                            [p.grad for p in parameters if p.grad is not None], scale
                        )
                else:
                    clip_grad_by_total_norm_fp32(parameters, self.grad_clip, norm)
            self.optimizer.step_with_ready_grads()
        self.steps += 1
        return norm

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """ema <- decay ema + (1 - decay) main, in fp32 (the first call copies main)."""
        if self.ema is None:
            self.ema = [None if m is None else self._copy(m[0]) for m in self.main]
            return
        for average, main in zip(self.ema, self.main):
            if average is not None:
                average.lerp_(main[0].detach().float(), 1.0 - decay)

    @torch.no_grad()
    def blend(self, targets: list[Tensor | None], weight: float) -> None:
        """main <- (1 - weight) main + weight target for every trained parameter with a target
        (a whole tensor of the parameter's shape; None leaves it), then the weights follow the
        main parameters as after a step (cast; all-gathered when sharded: collective over the
        data-parallel group). The IDA lever (distill/levers.py); Adam's moments stay."""
        for main, target in zip(self.main, targets, strict=True):
            if main is None or target is None:
                continue
            tensor, start, end = main
            piece = target.detach().reshape(-1)[start:end].view_as(tensor)
            tensor.lerp_(piece.to(tensor.dtype), weight)
        with cuda_calls_on_cpu():
            mixed = (DistributedOptimizer, Float16OptimizerWithFloat16Params)
            if isinstance(self.optimizer, mixed):  # FP32Optimizer: main params are the weights
                self.optimizer._copy_main_params_to_model_params()
            if isinstance(self.optimizer, DistributedOptimizer):
                for chunk in self.optimizer.model_chunks:
                    chunk.start_param_sync()

    def tensors(self) -> list[Tensor]:
        """What this role holds on this rank: weights, gradient (and, sharded, parameter)
        buffers, main parameters, Adam moments and EMA; `storage_bytes` counts them."""
        held = list(self.parameters)
        for buffer in self.ddp.buffers:
            held += [b for b in (buffer.grad_data, buffer.param_data) if b is not None]
        if self.host is not None:
            held += self.host.tensors()
        else:
            state = self.optimizer.optimizer.state
            for main in self.main:
                if main is not None:
                    held += [main[0], *(v for v in state.get(main[0], {}).values() if v.dim())]
        return held + [e for e in self.ema or [] if e is not None]

    def _copy(self, tensor: Tensor) -> Tensor:
        """An fp32 copy of `tensor` where this role keeps its state: the host with offload."""
        if self.host is not None:
            return HOST.copy_of(tensor.detach(), torch.float32)
        return tensor.detach().float().clone()

    # --- whole tensors -------------------------------------------------------------------

    def _full(self, pieces: list[Tensor | None]) -> list[Tensor]:
        """Whole fp32 tensors, one per trained parameter, from this rank's pieces (collective
        over the data-parallel group when sharded: the pieces are disjoint, so a sum of zeros
        elsewhere assembles them exactly)."""
        whole = []
        for p, main, piece in zip(self.parameters, self.main, pieces):
            if not self.sharded:
                whole.append(piece.detach().float().clone().view(p.shape))
                continue
            flat = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            if main is not None:
                flat[main[1] : main[2]] = piece.detach().view(-1)
            dist.all_reduce(flat, group=self.dp_group)
            whole.append(flat.view(p.shape))
        return whole

    def full_ema(self) -> list[Tensor] | None:
        """The EMA as whole fp32 tensors (collective when sharded; on the host with offload),
        or None before any."""
        if self.ema is None:
            return None
        whole = self._full(self.ema)
        return whole if self.host is None else [HOST.copy_of(t) for t in whole]

    def _state(self, main: Tensor) -> dict:
        if self.host is not None:
            return self.host.state(main)
        return self.optimizer.optimizer.state[main]

    def full_main_params(self) -> list[Tensor]:
        """The main parameters as whole fp32 tensors (collective when sharded): in bf16 mixed
        precision what training learned, of which the bf16 weights are the rounding."""
        return self._full([None if m is None else m[0] for m in self.main])

    @torch.no_grad()
    def set_main_params(self, values: list[Tensor]) -> None:
        """Start from `values` (whole tensors, one per trained parameter, e.g. the fp32 weights
        a bf16 copy was rounded from): this rank's main-parameter pieces take them and the
        weights their cast. Call before the first step (the Adam moments are left alone)."""
        for i, (p, main) in enumerate(zip(self.parameters, self.main, strict=True)):
            p.copy_(values[i].view_as(p))
            if main is not None:
                main[0].copy_(self._piece(values, i, main))

    @staticmethod
    def _piece(values: list[Tensor], i: int, main) -> Tensor:
        """Parameter i's part held on this rank, shaped and typed as its main tensor."""
        tensor, start, end = main
        return values[i].reshape(-1)[start:end].to(tensor.dtype).view_as(tensor).clone()

    def _moments(self, key: str) -> list[Tensor | None]:
        return [None if m is None else self._state(m[0])[key] for m in self.main]

    def state_dict(self) -> dict:
        """Whole fp32 main parameters, Adam moments and EMA per trained parameter, and the step
        count: the same for every data-parallel size and sharding (collective when sharded)."""
        stepped = self.steps > 0
        return {
            "steps": self.steps,
            "main_params": self.full_main_params(),
            "exp_avg": self._full(self._moments("exp_avg")) if stepped else None,
            "exp_avg_sq": self._full(self._moments("exp_avg_sq")) if stepped else None,
            "ema": self.full_ema(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output (saved at any data-parallel size) into this rank's
        pieces and the weights; bit-exact, as the weights are the casts of the main values."""
        self.steps = state["steps"]
        inner = None if self.optimizer is None else self.optimizer.optimizer
        for i, (p, main) in enumerate(zip(self.parameters, self.main)):
            p.copy_(state["main_params"][i].view_as(p))
            if main is None:
                continue
            main[0].copy_(self._piece(state["main_params"], i, main))
            moments = None
            if self.steps:
                moments = (self._piece(state[key], i, main) for key in ("exp_avg", "exp_avg_sq"))
            if moments is not None and self.host is not None:
                self.host.load_state(main[0], self.steps, *moments)
            elif moments is not None:
                exp_avg, exp_avg_sq = moments
                inner.state[main[0]] = {
                    "step": torch.tensor(float(self.steps), dtype=torch.float32),
                    "exp_avg": exp_avg,
                    "exp_avg_sq": exp_avg_sq,
                }
        self.ema = None
        if state["ema"] is not None:
            self.ema = [
                None if m is None else self._copy(state["ema"][i].reshape(-1)[m[1] : m[2]])
                for i, m in enumerate(self.main)
            ]
            if not self.sharded:
                self.ema = [e.view_as(p) for e, p in zip(self.ema, self.parameters)]


def _fused_adamw_on_cpu(optimizer) -> None:
    """On a CPU device, torch's fused AdamW kernel: the one optimizer_offload's host step runs,
    so offload on or off steps alike, bit for bit (torch's default there, the single-tensor
    loop, rounds differently). Devices with CUDA keep megatron's choice."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if type(optimizer) is torch.optim.AdamW and all(p.device.type == "cpu" for p in parameters):
        for group in optimizer.param_groups:
            group["fused"], group["foreach"] = True, False


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    return sum(
        {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values()
    )


@contextlib.contextmanager
def parameters_holding(parameters: list[Tensor], values: list[Tensor]):
    """The parameters' data are `values` (their own dtype, e.g. the fp32 main parameters of
    bf16 weights; moved to the parameter's device, as host-offloaded ones are not) for the
    duration of the block; nothing runs a forward or steps then. The original storage
    (megatron's buffers included) is back afterwards."""
    kept = [p.data for p in parameters]
    for p, value in zip(parameters, values, strict=True):
        p.data = value.to(p.device).view(p.shape)
    try:
        yield
    finally:
        for p, data in zip(parameters, kept):
            p.data = data

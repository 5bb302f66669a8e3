"""The DiTs of a distillation run as velocity fields, on any tensor/pipeline/data-parallel layout.

Every model (teacher, fake, generator expert) is this rank's pipeline stage of a megatron-core
DiT. `VelocityModel.predict` runs it forward-only through megatron's schedule and hands the
velocity to every pipeline rank (the next model starts on the first stage); `train` runs a
forward-backward schedule call with a loss on the velocity and leaves data-parallel averaged
gradients in `.grad`. So the DMD chain (generator -> noise -> teacher and fake -> target) is a
sequence of schedule calls, one per model, as DESIGN.md prescribes; at pipeline_parallel = 1 the
schedules reduce to plain calls and the same code runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from phased_dmd_mp.conditioning import Conditions, model_inputs, velocity_from_output
from phased_dmd_mp.models.dit import DiTStage
from phased_dmd_mp.models.lora import adapter_parameters, merged_state_dict, set_active_adapter
from phased_dmd_mp.parallel import pipeline

# loss_fn(velocity of the selected samples, their indices in the batch) -> mean loss over them
LossFn = Callable[[Tensor, Tensor], Tensor]


def _is_last_stage() -> bool:
    return parallel_state.is_pipeline_last_stage()


def _from_last_stage(tensor: Tensor | None, shape, dtype, device) -> Tensor:
    """`tensor` (present on the last pipeline stage) on every stage."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(
        tensor.contiguous(),
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return tensor


class VelocityModel:
    """One DiT (this rank's stage) as v(x [B, C, F, H, W], t [B], conditions); with `adapter`,
    that LoRA adapter of a shared base (None: the base itself, e.g. the teacher)."""

    def __init__(self, module: DiTStage, adapter: int | None = None):
        self.module, self.adapter = module, adapter
        self.arch = module.arch
        self.has_lora = getattr(module, "lora_config", None) is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    def parameters(self) -> list[Tensor]:
        """What this model trains: its adapter, or every parameter that requires grad."""
        if self.adapter is not None:
            return adapter_parameters(self.module, self.adapter)
        return [p for p in self.module.parameters() if p.requires_grad]

    def base_state(self) -> dict[str, Tensor]:
        """The weights without any adapter (what a copy of this model starts from)."""
        if self.has_lora:
            return merged_state_dict(self.module, None)
        return {k: v for k, v in self.module.state_dict().items() if isinstance(v, Tensor)}

    def weights(self) -> dict[str, Tensor]:
        """This rank's weights in our naming, the adapter (if any) merged in."""
        if self.adapter is not None:
            return merged_state_dict(self.module, self.adapter)
        return self.base_state()

    def _activate(self) -> None:
        if self.has_lora:
            set_active_adapter(self.module, self.adapter)

    def _inputs(self, x: Tensor, t: Tensor, cond: Conditions) -> dict:
        return model_inputs(self.arch, x.to(self.dtype), t, cond)

    @torch.no_grad()
    def predict(self, x: Tensor, t: Tensor, cond: Conditions) -> Tensor:
        """The velocity at (x, t) in float32, on every pipeline rank."""
        self._activate()
        self.module.eval()
        (output,) = pipeline.forward(self.module, [self._inputs(x, t, cond)]) or (None,)
        v = None if output is None else velocity_from_output(self.arch, output, x)
        return _from_last_stage(v, x.shape, self.dtype, x.device).float()

    def train(
        self, x: Tensor, t: Tensor, cond: Conditions, loss_fn: LossFn, micro_batch_size: int
    ) -> float:
        """Accumulate the gradient of loss_fn(velocity), a mean over the batch, into `.grad`
        (this rank's; the trainer averages over data-parallel ranks). Returns the loss value on
        every rank. The batch runs in equal microbatches of at most micro_batch_size."""
        self._activate()
        self.module.train()
        batch = x.shape[0]
        micro = max(d for d in range(1, min(micro_batch_size, batch) + 1) if batch % d == 0)
        microbatches = []
        for start in range(0, batch, micro):
            index = torch.arange(start, start + micro, device=x.device)
            microbatches.append((self._inputs(x[index], t[index], cond.select(index)), index))

        def loss(output: Tensor, index: Tensor) -> Tensor:
            return loss_fn(velocity_from_output(self.arch, output, x[index]).float(), index)

        losses = pipeline.forward_backward(self.module, microbatches, loss)
        value = torch.stack(losses).mean() if losses else None
        return float(_from_last_stage(value, (), torch.float32, x.device))


def average_gradients(parameters: list[Tensor]) -> None:
    """Mean of each parameter's gradient over the data-parallel group. A missing gradient (an
    MoE expert that saw no sample) counts as zero at every data-parallel size, one process
    included, so clipping and the optimizer treat it alike whatever the layout."""
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    group = parallel_state.get_data_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return
    grads = [p.grad for p in parameters]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class RoutedVelocity:
    """A two-expert model split at a boundary timestep (Wan2.2: high noise at t >= boundary)."""

    def __init__(self, high: VelocityModel, low: VelocityModel, boundary: float):
        self.high, self.low, self.boundary = high, low, boundary

    def parameters(self) -> list[Tensor]:
        return self.high.parameters() + self.low.parameters()

    def _split(self, t: Tensor) -> list[tuple[VelocityModel, Tensor]]:
        is_high = t >= self.boundary
        return [
            (self.high, is_high.nonzero().squeeze(1)),
            (self.low, (~is_high).nonzero().squeeze(1)),
        ]

    def predict(self, x: Tensor, t: Tensor, cond: Conditions) -> Tensor:
        v = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for model, index in self._split(t):
            if len(index):
                v[index] = model.predict(x[index], t[index], cond.select(index))
        return v

    def train(self, x, t, cond, loss_fn: LossFn, micro_batch_size: int) -> float:
        """Each expert's part weighted by its share of the batch, so the sum is the batch mean."""
        total = 0.0
        for model, index in self._split(t):
            if not len(index):
                continue
            share = len(index) / x.shape[0]

            def part_loss(v, local, index=index, share=share):
                return share * loss_fn(v, index[local])

            total += model.train(
                x[index], t[index], cond.select(index), part_loss, micro_batch_size
            )
        return total

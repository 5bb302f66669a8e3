"""The DiTs of a distillation run as velocity fields, on any tensor/pipeline/data-parallel layout.

Every model (teacher, fake, generator expert) is this rank's pipeline stage of a megatron-core
DiT. `VelocityModel.predict` runs it forward-only through megatron's schedule and hands the
velocity to every pipeline rank (the next model starts on the first stage); `train` runs a
forward-backward schedule call with a loss on the velocity and leaves the gradients in the
trained parameters' fp32 `main_grad` buffers (distill/optim.py averages them over data-parallel
ranks and steps). Both run a batch in microbatches of micro_batch_size samples, so no forward
sees more than that many. So the DMD chain (generator -> noise -> teacher and fake -> target) is
a sequence of schedule calls, one per model; at pipeline_parallel = 1 the
schedules reduce to plain calls and the same code runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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
    that LoRA adapter of a shared base (None: the base itself, e.g. the teacher). `source`: the
    folder its (base) weights were loaded from, whose stored dtypes and, for LoRA, stored values
    the export starts from (distill/export.py)."""

    def __init__(self, module: DiTStage, adapter: int | None = None, source: Path | None = None):
        self.module, self.adapter, self.source = module, adapter, source
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
    def predict(
        self, x: Tensor, t: Tensor, cond: Conditions, micro_batch_size: int | None = None
    ) -> Tensor:
        """The velocity at (x, t) in float32, on every pipeline rank. The batch runs in pieces of
        micro_batch_size samples (default: all at once): the equal pieces as the microbatches
        of one forward-only schedule call, a smaller remainder in a second call."""
        self._activate()
        self.module.eval()
        batch = x.shape[0]
        micro = min(micro_batch_size or batch, batch)
        whole = batch - batch % micro
        starts = [(start, micro) for start in range(0, whole, micro)]
        velocities = []
        for group in (starts, [(whole, batch - whole)] if whole < batch else []):
            if not group:
                continue
            pieces = [torch.arange(start, start + size, device=x.device) for start, size in group]
            outputs = pipeline.forward(
                self.module, [self._inputs(x[i], t[i], cond.select(i)) for i in pieces]
            )
            velocities += [
                velocity_from_output(self.arch, o, x[i]) for o, i in zip(outputs, pieces)
            ]
        v = torch.cat(velocities) if velocities else None
        return _from_last_stage(v, x.shape, self.dtype, x.device).float()

    def train(
        self, x: Tensor, t: Tensor, cond: Conditions, loss_fn: LossFn, micro_batch_size: int
    ) -> float:
        """Accumulate the gradient of loss_fn(velocity), a mean over the batch, into the
        parameters' gradients (megatron DDP's fp32 `main_grad` for trained ones; the optimizer
        step averages them over data-parallel ranks). Returns the loss value on
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
        # megatron's schedule divides each microbatch's loss by their number in place (also the
        # value it reports): the sum is the batch mean
        value = torch.stack(losses).sum() if losses else None
        return float(_from_last_stage(value, (), torch.float32, x.device))


    def input_gradient(
        self, x: Tensor, t: Tensor, cond: Conditions, micro_batch_size: int
    ) -> Tensor:
        """The gradient [B, ...] (float32, every pipeline rank) with respect to x of the side
        losses this model's feature taps add in its forward (distill/discriminator.py), by a
        forward-backward schedule call whose own loss is zero; the parameters are held out
        of the backward, so nothing lands in their gradients."""
        self._activate()
        self.module.eval()
        leaf = x.detach().to(self.dtype).requires_grad_()
        batch = x.shape[0]
        micro = max(d for d in range(1, min(micro_batch_size, batch) + 1) if batch % d == 0)
        microbatches = []
        for start in range(0, batch, micro):
            index = torch.arange(start, start + micro, device=x.device)
            inputs = model_inputs(self.arch, leaf[index], t[index], cond.select(index))
            microbatches.append((inputs, index))
        trained = [p for p in self.module.parameters() if p.requires_grad]
        try:
            for p in trained:
                p.requires_grad_(False)
            pipeline.forward_backward(self.module, microbatches, lambda out, _: out.sum() * 0.0)
        finally:
            for p in trained:
                p.requires_grad_(True)
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        return _from_first_stage(grad.float(), x.device)


def _from_first_stage(tensor: Tensor, device) -> Tensor:
    """`tensor` as the first pipeline stage holds it, on every stage."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    dist.broadcast(
        tensor.contiguous(),
        src=parallel_state.get_pipeline_model_parallel_first_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return tensor


def experts_reached(low: float, high: float, boundary: float) -> tuple[bool, bool]:
    """(high-noise, low-noise): which experts of a model routed at `boundary` (t >= boundary
    goes to the high-noise expert) see timesteps drawn in the open interval (low, high)."""
    return high > boundary, low < boundary


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

    def predict(
        self, x: Tensor, t: Tensor, cond: Conditions, micro_batch_size: int | None = None
    ) -> Tensor:
        v = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for model, index in self._split(t):
            if len(index):
                v[index] = model.predict(x[index], t[index], cond.select(index), micro_batch_size)
        return v

    def input_gradient(self, x, t, cond, micro_batch_size: int) -> Tensor:
        grad = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for model, index in self._split(t):
            if len(index):
                grad[index] = model.input_gradient(
                    x[index], t[index], cond.select(index), micro_batch_size
                )
        return grad

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

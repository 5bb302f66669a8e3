"""Run a DiT stage through megatron-core's pipeline schedules, with data parallelism on top.

`forward_backward` runs 1F1B over the pipeline stages (or no pipelining at PP = 1) for a list
of microbatches; `forward` is the forward-only schedule (frozen teacher, frozen experts) and
returns the outputs on the last stage. `data_parallel` wraps a stage in megatron's DDP, whose
`finish_grad_sync()` averages gradients over the data-parallel group. On a CPU-only torch all
three run under `cpu_compat.cuda_calls_on_cpu`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_pg_size
from torch import Tensor, nn

from phased_dmd_mp.models.dit import DiTStage
from phased_dmd_mp.parallel.cpu_compat import cuda_calls_on_cpu, model_code_outside_shim

Inputs = dict  # keyword arguments of the stage's forward

__all__ = ["data_parallel", "forward", "forward_backward", "stage_of"]


def stage_of(model: nn.Module) -> DiTStage:
    """The DiT stage inside wrappers such as megatron's DDP."""
    while not isinstance(model, DiTStage):
        model = model.module
    return model


def data_parallel(stage: DiTStage) -> DistributedDataParallel:
    """Wrap `stage` in megatron's DDP: gradients land in each parameter's `main_grad` (float32
    buffers) and `finish_grad_sync()` averages them over the data-parallel group."""
    with cuda_calls_on_cpu():
        return DistributedDataParallel(
            stage.config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True),
            stage,
        )


def _run(model, microbatches: list[tuple[Inputs, Any]], loss_fn, forward_only: bool) -> list:
    if not microbatches:
        raise ValueError("no microbatches to run")
    stage = stage_of(model)
    rows = {stage.rows(**inputs).total for inputs, _ in microbatches}
    if len(rows) != 1:
        raise ValueError(
            f"microbatches of one schedule call must have the same shapes (rows {sorted(rows)})"
        )
    first = microbatches[0][0]
    batch = next(v for v in first.values() if isinstance(v, Tensor)).shape[0]

    tensor_parallel = get_pg_size(stage.pg_collection.tp)

    def step(data_iterator, module):
        inputs, context = next(data_iterator)
        # Tensor-parallel mappings inside the model allocate on CUDA: they need the shim.
        outside = model_code_outside_shim() if tensor_parallel == 1 else contextlib.nullcontext()
        with outside:
            output = module(**inputs)
        if loss_fn is None:
            return output, None

        def reduce(output: Tensor):
            loss = loss_fn(output, context)
            return loss, {"loss": loss.detach()}

        return output, reduce

    schedule = get_forward_backward_func()
    with cuda_calls_on_cpu():
        return schedule(
            forward_step_func=step,
            data_iterator=iter(microbatches),
            model=[model],
            num_microbatches=len(microbatches),
            seq_length=rows.pop(),
            micro_batch_size=batch,
            forward_only=forward_only,
        )


def forward_backward(
    model: nn.Module,
    microbatches: list[tuple[Inputs, Any]],
    loss_fn: Callable[[Tensor, Any], Tensor],
) -> list[Tensor]:
    """Forward and backward of every microbatch, given as (forward kwargs, loss context):
    gradients accumulate into the parameters (or DDP's `main_grad`) as the gradient of the
    mean of `loss_fn(output, context)` over microbatches. Every stage gets every microbatch
    (non-first stages read only its shapes). Returns the losses on the last pipeline stage,
    [] on the others."""
    return [r["loss"] for r in _run(model, microbatches, loss_fn, forward_only=False)]


def forward(model: nn.Module, microbatches: list[Inputs]) -> list[Tensor]:
    """Forward-only schedule: the outputs of every microbatch on the last stage, [] elsewhere."""
    return _run(model, [(inputs, None) for inputs in microbatches], None, forward_only=True)

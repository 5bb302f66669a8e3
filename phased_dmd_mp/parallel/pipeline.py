"""Run a DiT stage through megatron-core's pipeline schedules, with data parallelism on top.

`forward_backward` runs 1F1B over the pipeline stages (or no pipelining at PP = 1) for a list
of microbatches; `forward` is the forward-only schedule (frozen teacher, frozen experts) and
returns the outputs on the last stage. `data_parallel` wraps a stage in megatron's DDP and
`finish_grad_sync` finalises its gradients after backward: the average over data (x context)
parallel ranks, and the sequence-parallel sums over TP (parallel/sequence.py). On a CPU-only
torch they run under `cpu_compat.cuda_calls_on_cpu`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import (
    _allreduce_non_tensor_model_parallel_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_pg_size
from torch import Tensor, nn

from phased_dmd_mp.models.dit import DiTStage
from phased_dmd_mp.parallel.cpu_compat import cuda_calls_on_cpu, model_code_outside_shim

Inputs = dict  # keyword arguments of the stage's forward

__all__ = [
    "backward",
    "data_parallel",
    "finish_grad_sync",
    "forward",
    "forward_backward",
    "outside_schedules",
    "stage_of",
]


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


def finish_grad_sync(model: DistributedDataParallel) -> None:
    """After backward: DDP's average of `main_grad` over the data x context parallel ranks
    (each context-parallel rank holds its rows' share, and the schedules scaled the loss by
    CP), then under sequence parallelism the sum over TP of the parameters tagged
    `sequence_parallel` (megatron's finalize_model_grads does both; its other steps tie
    language-model embeddings, which DiTs do not have)."""
    with cuda_calls_on_cpu():
        model.finish_grad_sync()
        _allreduce_non_tensor_model_parallel_grads([model], model.config)


@contextlib.contextmanager
def outside_schedules():
    """Context for model calls outside the schedules (several chained forwards, then
    `backward`): on a CPU-only torch, megatron's mappings inside the model find their buffers
    on the CPU as they do inside the schedules."""
    with cuda_calls_on_cpu(), model_code_outside_shim():
        yield


def backward(loss: Tensor, stage: DiTStage) -> None:
    """Backward of a loss computed outside the schedules, scaled as megatron's schedules scale
    theirs: by the context-parallel size (call it inside `outside_schedules`)."""
    (loss * get_pg_size(stage.pg_collection.cp)).backward()


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

    context_parallel = get_pg_size(stage.pg_collection.cp)
    # megatron divides the rows of the tensor stages exchange by CP (and by TP under sequence
    # parallelism), as if every row were split; ours are local token rows plus whole
    # conditioning rows, counted by `rows`: give it their product.
    seq_length = rows.pop() * context_parallel
    if stage.config.sequence_parallel:
        seq_length *= get_pg_size(stage.pg_collection.tp)

    def step(data_iterator, module):
        inputs, context = next(data_iterator)
        # The model asks for CUDA only through torch.cuda.current_device(), which the shim
        # answers outside its (per-op, slow) factory redirection too.
        with model_code_outside_shim():
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
            seq_length=seq_length,
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
    each divided by the number of microbatches (as megatron's schedule reports them), [] on
    the other stages."""
    results = _run(model, microbatches, loss_fn, forward_only=False)
    # The schedule scales each loss by CP in place, the reported value included (megatron's
    # models return their rows' share of the loss; ours the whole loss on every CP rank).
    context_parallel = get_pg_size(stage_of(model).pg_collection.cp)
    return [r["loss"] / context_parallel for r in results]


def forward(model: nn.Module, microbatches: list[Inputs]) -> list[Tensor]:
    """Forward-only schedule: the outputs of every microbatch on the last stage, [] elsewhere."""
    return _run(model, [(inputs, None) for inputs in microbatches], None, forward_only=True)

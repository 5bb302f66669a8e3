"""Process groups: torch.distributed plus megatron-core's tensor/pipeline/context/data parallel
groups.

One entry point, `initialize(tensor_parallel, pipeline_parallel, context_parallel=1)`. Under torchrun it joins the
job from the environment; run as a plain process it starts a world of one, so the same model
code (megatron's parallel linears need a process group even at TP=1) runs in a notebook.
NCCL on GPU, gloo on CPU: the CPU path is the same code CI exercises.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.parallel.layout import check_sizes, data_parallel_size

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


def initialize(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    *,
    context_parallel: int = 1,
    backend: str | None = None,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
) -> ProcessGroupCollection:
    """Join (or start) the process group and build megatron's model-parallel groups.

    Context parallelism uses megatron's own groups (`get_context_parallel_group`; its DDP
    reduces gradients over data x context parallel ranks). Data parallelism is what is left:
    world_size / (tensor_parallel * pipeline_parallel * context_parallel).
    Calling it again with the same sizes is a no-op; with other sizes it is an error.
    `timeout` bounds every collective of the default group and of megatron's groups: a rank
    that hangs fails the job after it (DistillConfig.collective_timeout).
    """
    check_sizes(tensor_parallel, pipeline_parallel, context_parallel)
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    data_parallel_size(dist.get_world_size(), tensor_parallel, pipeline_parallel, context_parallel)
    wanted = (tensor_parallel, pipeline_parallel, context_parallel)
    if parallel_state.model_parallel_is_initialized():
        current = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_context_parallel_world_size(),
        )
        if current != wanted:
            raise ConfigError(
                f"model parallel groups already exist with (tensor, pipeline, context) = "
                f"{current}, not {wanted}; call destroy() first"
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_parallel,
            pipeline_parallel,
            context_parallel_size=context_parallel,
            # megatron builds timedelta(minutes=...): a fraction keeps a timeout in seconds
            distributed_timeout_minutes=timeout.total_seconds() / 60,
        )
    return process_groups()


def ensure_initialized() -> ProcessGroupCollection:
    """The current groups, or a world of one if nothing was initialized yet."""
    if not parallel_state.model_parallel_is_initialized():
        return initialize(1, 1)
    return process_groups()


def process_groups() -> ProcessGroupCollection:
    return ProcessGroupCollection.use_mpu_process_groups(
        ["tp", "pp", "dp", "dp_cp", "cp", "embd", "pos_embd"]
    )


def destroy() -> None:
    """Tear down megatron's groups and torch.distributed (tests and notebooks)."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

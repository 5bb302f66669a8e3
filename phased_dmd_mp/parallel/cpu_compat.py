"""Run megatron-core's pipeline schedules, p2p communication and DDP on a CPU-only torch.

Those code paths allocate with `device="cuda"` / `torch.cuda.current_device()` and call
`torch.cuda.synchronize()` even when the process group is gloo. `cuda_calls_on_cpu()` redirects
exactly these: factory calls asking for a CUDA device get the CPU, `current_device()` answers
the CPU device (so `device=torch.cuda.current_device()` lands there even where the factory
redirection is off: inside autograd's backward, where megatron's sequence-parallel mappings
allocate their gathers and reduce-scatters), and `synchronize()` is a no-op, as CPU ops are
synchronous. Megatron's optimizers also pick a parameter's role by its type name
(`param.type() in ['torch.cuda.BFloat16Tensor', ...]` builds the fp32 main copy), so inside the
context a CPU tensor answers `type()` with the CUDA name of its dtype. With a CUDA device present
it does nothing, so GPU runs use megatron unchanged.
This module is the only place the CPU path touches megatron's behaviour.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare ordinal means a CUDA device to torch
    if isinstance(device, (str, torch.device)):
        return torch.device(device).type == "cuda"
    return False


class _CudaFactoriesOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)  # a type query such as 'torch.BFloat16Tensor'
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_calls_on_cpu():
    """Context in which megatron's CUDA-only allocations and syncs run on the CPU (no-op on
    machines with CUDA)."""
    if torch.cuda.is_available():
        yield
        return
    with (
        mock.patch.object(torch.cuda, "current_device", lambda: torch.device("cpu")),
        mock.patch.object(torch.cuda, "synchronize", lambda device=None: None),
        _CudaFactoriesOnCpu(),
    ):
        yield


@contextlib.contextmanager
def model_code_outside_shim():
    """Inside `cuda_calls_on_cpu`: run model code that never asks for CUDA (ours at tensor
    parallel 1; megatron's TP mappings do allocate on CUDA) without the shim's Python call per
    torch op, which otherwise doubles the CPU step of a small model."""
    if not isinstance(torch.overrides._get_current_function_mode(), _CudaFactoriesOnCpu):
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield


def recompute_contexts() -> tuple[
    contextlib.AbstractContextManager, contextlib.AbstractContextManager
]:
    """`context_fn` of torch's non-reentrant checkpoint: (forward, recompute) contexts. The
    recompute replays a layer inside backward, where the shim's mode is off (a mode is popped
    while it handles a call, here autograd's backward), so a layer that ran under the shim
    (tensor parallel > 1: megatron's gather allocates on CUDA) replays under it again."""
    shimmed = isinstance(torch.overrides._get_current_function_mode(), _CudaFactoriesOnCpu)
    return contextlib.nullcontext(), _CudaFactoriesOnCpu() if shimmed else contextlib.nullcontext()

"""Peak memory of a piece of work, measured: CUDA's allocator statistics on a GPU, and on CPU an
exact count of the bytes of live tensor storages.

CPU has no allocator statistics, so `LiveTensorBytes` counts storages itself. It starts from
every tensor alive when it is entered (found through the garbage collector: parameters,
their gradients, optimizer states, DDP buffers), then, as a TorchDispatchMode, sees the output of
every operator (autograd's backward included) and adds each new storage's `nbytes`; a weak
reference on each storage subtracts it when it is freed. The peak is therefore the largest sum
of live storage bytes, the quantity `torch.cuda.max_memory_allocated` reports on a GPU minus the
caching allocator's rounding and kernel workspaces. Tensors of the host arena
(`parallel.offload.HOST`: what optimizer and activation offload move to host memory) are host
memory, not the device's, and are not counted: on a CPU-only machine too, the count is what a
GPU would hold (`HOST.live_bytes()` counts the arena). Not seen: memory a C++ kernel allocates and
frees inside one operator, and tensors made outside torch's dispatcher while it is active
(e.g. `torch.from_numpy`).

    with peak_memory(device) as peak:
        distiller._iteration()
    peak.bytes  # the measured peak
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from phased_dmd_mp.parallel.offload import HOST


class LiveTensorBytes(TorchDispatchMode):
    """Live and peak bytes of tensor storages on `device` ("cpu" by default) while active."""

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        self.live = 0
        self.peak = 0
        self._storages: dict[int, weakref.ref] = {}  # data_ptr -> weak reference

    def _add(self, tensor: torch.Tensor) -> None:
        if tensor.device != self.device or tensor.is_meta or HOST.allocating or HOST.holds(tensor):
            return
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        known = self._storages.get(pointer)
        if known is not None and known() is not None:
            return
        nbytes = storage.nbytes()

        def freed(_, pointer=pointer, nbytes=nbytes):
            self.live -= nbytes
            self._storages.pop(pointer, None)

        self._storages[pointer] = weakref.ref(storage, freed)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __enter__(self):
        gc.collect()
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor):
                # A gradient made by autograd has no Python object until `.grad` is read, so
                # the garbage collector does not list it: reach it through its parameter.
                for tensor in (obj, obj.grad, getattr(obj, "main_grad", None)):
                    if tensor is not None:
                        with contextlib.suppress(RuntimeError, NotImplementedError):
                            self._add(tensor)
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._add(item)
        return out


class _Peak:
    bytes: int = 0


@contextlib.contextmanager
def peak_memory(device: str | torch.device = "cpu"):
    """Measure the peak memory on `device` of the block: `torch.cuda.max_memory_allocated`
    on CUDA (reset on entry), `LiveTensorBytes` on CPU. The result is in `.bytes` after it."""
    device = torch.device(device)
    result = _Peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.bytes = torch.cuda.max_memory_allocated(device)
        return
    with LiveTensorBytes(device) as tracker:
        yield result
    result.bytes = tracker.peak

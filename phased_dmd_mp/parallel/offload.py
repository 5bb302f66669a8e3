"""Host memory for what a GPU need not hold, and the copies that move it there and back.

`HOST` is the arena every offloaded tensor is allocated from (`optimizer_offload`: fp32 main
parameters, Adam moments, the EMA and the gradients in transit; `activation_offload`: each
checkpointed layer input). Its tensors are in pinned (page-locked) memory where CUDA exists, so
copies to and from the GPU run asynchronously on a side stream (`CopyStream`) while the GPU
computes; on a CPU-only machine they are ordinary memory and every copy is synchronous, the same
code with the streams left out. `saved_tensors_on_host` moves what autograd saves for backward there and back.
The arena knows its tensors (`HOST.holds`), which is how
memory is accounted on a machine whose "device" is the CPU too: `memory.measure.LiveTensorBytes`
counts device bytes without them and `HOST.live_bytes()` counts them, so what offload moves off
the device is measured in CI as on a GPU.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch
from torch import Tensor


class HostArena:
    """Allocates host tensors (pinned where CUDA exists) and keeps count of them."""

    def __init__(self):
        self._live: dict[int, tuple[weakref.ref, int]] = {}  # data_ptr -> (storage, bytes)
        self._state = threading.local()
        self._bytes = 0  # live bytes, and their peak since `reset_peak`
        self.peak = 0

    @property
    def allocating(self) -> bool:
        """True while `empty` allocates (LiveTensorBytes sees the allocation before `holds`)."""
        return getattr(self._state, "allocating", False)

    def empty(self, shape, dtype: torch.dtype) -> Tensor:
        """An uninitialised host tensor of `shape` and `dtype`, pinned where CUDA exists."""
        self._state.allocating = True
        try:
            tensor = torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())
        finally:
            self._state.allocating = False
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        nbytes = storage.nbytes()
        if nbytes:

            def freed(_, pointer=pointer, nbytes=nbytes):
                self._live.pop(pointer, None)
                self._bytes -= nbytes

            self._live[pointer] = (weakref.ref(storage, freed), nbytes)
            self._bytes += nbytes
            self.peak = max(self.peak, self._bytes)
        return tensor

    def copy_of(self, tensor: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A host copy of `tensor` (cast to `dtype`), made synchronously."""
        return self.empty(tensor.shape, dtype or tensor.dtype).copy_(tensor)

    def holds(self, tensor: Tensor) -> bool:
        """Whether `tensor`'s storage was allocated by this arena (and is alive)."""
        if tensor.device.type != "cpu" or tensor.is_meta:
            return False
        entry = self._live.get(tensor.untyped_storage().data_ptr())
        return entry is not None and entry[0]() is not None

    def live_bytes(self) -> int:
        """Bytes of the arena's live tensors."""
        return self._bytes

    def reset_peak(self) -> None:
        """Start `peak` (the largest `live_bytes` seen) from now."""
        self.peak = self._bytes


HOST = HostArena()


class CopyStream:
    """A side stream for copies between `device` and the host, so they overlap the compute
    stream; on a CPU device copies are synchronous and this does nothing.

    Inside `use()`, work runs on the side stream after everything the current stream issued
    before; `record()` marks the work issued so far; `wait_host(mark)` blocks the host until it is
    done; `join(mark)` makes the compute stream wait for it (no host block)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @contextlib.contextmanager
    def use(self):
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield

    def record(self):
        return None if self.stream is None else self.stream.record_event()

    def keep_alive(self, tensor: Tensor) -> None:
        """`tensor` (on the device) is read by this stream: the caching allocator must not
        reuse its memory until the stream's work so far is done."""
        if self.stream is not None and tensor.device.type == "cuda":
            tensor.record_stream(self.stream)

    @staticmethod
    def wait_host(mark) -> None:
        if mark is not None:
            mark.synchronize()

    def join(self, mark) -> None:
        if mark is not None:
            torch.cuda.current_stream(self.device).wait_event(mark)


_COPY_STREAMS: dict[torch.device, CopyStream] = {}


def copy_stream(device: torch.device) -> CopyStream:
    """The process's copy stream for `device` (one per device, made on first use)."""
    device = torch.device(device)
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = CopyStream(device)
    return _COPY_STREAMS[device]


@contextlib.contextmanager
def saved_tensors_on_host(device: torch.device):
    """Inside, every tensor autograd saves for backward is copied into the host arena (on a
    GPU asynchronously, on the copy stream; the device memory is released once the copy is
    done) and copied back when backward needs it (on the compute stream, after that copy).

    The distillation's DiTs use it around each recomputed layer (`activation_offload`), where
    the only tensor saved is the layer's input: torch's non-reentrant checkpoint saves its
    inputs under the hooks in force and everything inside the layer under its own."""
    copies = copy_stream(device)

    def pack(tensor: Tensor):
        host = HOST.empty(tensor.shape, tensor.dtype)
        with copies.use():
            host.copy_(tensor.detach(), non_blocking=True)
            copies.keep_alive(tensor)
            mark = copies.record()
        return tensor.device, host, mark

    def unpack(packed) -> Tensor:
        device, host, mark = packed
        copies.join(mark)
        return host.to(device, non_blocking=True)  # the host tensor itself on a CPU device

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield

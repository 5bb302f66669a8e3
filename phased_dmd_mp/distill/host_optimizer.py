"""AdamW on the host for a trained model whose gradients megatron's DDP keeps on the device
(`DistillConfig.optimizer_offload`; used by distill/optim.py's `TrainedModel`).

What stays on the device: the weights (bf16 or fp32) and DDP's fp32 gradient buffers, reduced
over the data-parallel ranks as without offload (all-reduce; reduce-scatter when sharded).
What lives in host memory (`parallel.offload.HOST`, pinned where CUDA exists): the fp32 main
parameters, both Adam moments and the step count of every element this rank updates (all of
them, or its 1/D share with `distributed_optimizer`: megatron's own ranges, from
`DistributedOptimizer._build_gbuf_range_map` over the same buffers), and two staging slots for
gradients and refreshed weights in transit.

A step (after DDP's reduction):
  1. the global gradient norm, computed on the device by megatron's `get_grad_norm_fp32` over
     the same gradients, in the same order and process group as megatron's optimizer, so it is
     the same number bit for bit; a non-finite norm skips the step;
  2. per chunk of whole parameters (about `CHUNK_ELEMENTS`, in the gradient buffer's order):
     gradients device -> host into a staging slot, scaled by grad_clip / (norm + 1e-6) where
     that is < 1 (megatron's formula), the chunk's torch AdamW (`fused=True`, torch's fused CPU
     kernel) steps the host main parameters, which are cast to the weights' dtype and copied
     back into the device weights (host -> device). On a GPU the copies run on a side stream:
     chunk i + 1's gradients come down while the host steps chunk i, whose weights go up while it
     steps chunk i + 1; the compute stream waits for the last upload before the next forward;
  3. with `distributed_optimizer`, DDP's all-gather of the updated weights (megatron's
     `start_param_sync`), as megatron's DistributedOptimizer does.

Megatron's own offload (`HybridDeviceOptimizer`, `optimizer_cpu_offload`) is not used: it needs
CUDA streams and, in its precision-aware path, Transformer Engine, so it could never run in CI;
this class is the same scheme (torch's fused CPU AdamW on pinned fp32 copies) in one code path
that a CPU-only machine runs with the copies synchronous.

Equality with the device step: without offload, a CPU-only machine steps with the same fused
kernel (`TrainedModel` selects it), so offload on or off gives bit-identical weights, moments and
checkpoints there, and a resume may switch it (tests/test_optimizer_offload.py). On a GPU the
device step is megatron's (Transformer Engine's FusedAdam, or torch's CUDA AdamW), the same
formula in another kernel: results may differ in the last bit of some elements per step (on
CPU, torch's single-tensor and fused AdamW differ in 405 of 100,003 elements after 5 steps, by at
most 2.4e-7); a resume that switches offload starts from the exact saved state either way.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import DistributedOptimizer
from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared
from torch import Tensor, nn

from phased_dmd_mp.parallel.offload import HOST, CopyStream

CHUNK_ELEMENTS = 1 << 26  # 64 Mi elements: 256 MiB of fp32 gradients per staging slot
ADAM_EPS = 1e-8  # megatron's OptimizerConfig.adam_eps, what the device step uses


def owned_ranges(parameters: list[nn.Parameter], ddp, sharded: bool) -> list[tuple]:
    """Per DDP-buffer parameter, in the buffer's order: (parameter, start, end), the part of the
    flattened parameter this rank updates (all of it unless sharded: megatron's ranges)."""
    order = []
    for buffer in ddp.buffers:
        if not sharded:
            order += [(p, 0, p.numel()) for p in buffer.param_index_map]
            continue
        (buckets,) = DistributedOptimizer._build_gbuf_range_map(buffer).values()
        for bucket in buckets:
            for p, ranges in bucket["param_map"].items():
                order.append((p, ranges["param"].start, ranges["param"].end))
    known = {id(p) for p in parameters}
    return [entry for entry in order if id(entry[0]) in known]


class HostOptimizer:
    """Host fp32 main parameters + torch AdamW (fused) for `parameters`, whose gradients are in
    `ddp`'s buffers (module docstring). `main[i]`: (host tensor, start, end) of parameter i, or
    None when this rank updates no part of it; the host tensor has the parameter's shape when
    whole, else is flat."""

    def __init__(
        self,
        parameters: list[nn.Parameter],
        ddp,
        *,
        sharded: bool,
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        chunk_elements: int | None = None,
    ):
        self.parameters = parameters
        self.sharded = sharded
        self.ddp = ddp
        self.device = parameters[0].device
        chunk_elements = chunk_elements or CHUNK_ELEMENTS
        order = owned_ranges(parameters, ddp, sharded)
        index = {id(p): i for i, p in enumerate(parameters)}
        self.main: list[tuple[Tensor, int, int] | None] = [None] * len(parameters)
        for p, start, end in order:
            piece = p.detach().reshape(-1)[start:end]
            if not sharded:
                piece = piece.view(p.shape)
            self.main[index[id(p)]] = (HOST.copy_of(piece, torch.float32), start, end)
        # megatron's gradient-norm inputs: its optimizer's parameter order (the parameters as
        # given unsharded; the buffers' order sharded), without shared or TP-duplicate ones
        norm_order = order if sharded else [(p, *self.main[index[id(p)]][1:]) for p in parameters
                                            if self.main[index[id(p)]] is not None]  # fmt: skip
        self._norm_inputs = [
            (p, start, end)
            for p, start, end in norm_order
            if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)
        ]
        self.norm_group = (
            parallel_state.get_intra_distributed_optimizer_instance_group()
            if sharded
            else parallel_state.get_model_parallel_group()
        )
        # chunks of whole parameters in the buffer's order, each with its own AdamW
        self.chunks: list[list[int]] = []
        size = 0
        for p, start, end in order:
            if not self.chunks or size + (end - start) > chunk_elements and size:
                self.chunks.append([])
                size = 0
            self.chunks[-1].append(index[id(p)])
            size += end - start
        self.optimizers = []
        for chunk in self.chunks:
            mains = [self.main[i][0] for i in chunk]
            optimizer = torch.optim.AdamW(
                mains, lr=lr, betas=betas, eps=ADAM_EPS, weight_decay=weight_decay, fused=True
            )
            for main in mains:  # allocated now, in the arena: host memory is known up front
                optimizer.state[main] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": HOST.empty(main.shape, torch.float32).zero_(),
                    "exp_avg_sq": HOST.empty(main.shape, torch.float32).zero_(),
                }
            self.optimizers.append(optimizer)
        self._optimizer_of = {
            id(self.main[i][0]): opt for chunk, opt in zip(self.chunks, self.optimizers) for i in chunk
        }  # fmt: skip
        largest = max(
            (sum(self.main[i][0].numel() for i in chunk) for chunk in self.chunks), default=0
        )
        weight_dtype = parameters[0].dtype
        self._slots = [
            {
                "grads": HOST.empty((largest,), torch.float32),
                "weights": None
                if weight_dtype == torch.float32
                else HOST.empty((largest,), weight_dtype),
                "uploaded": None,  # the mark of this slot's last upload
            }
            for _ in range(min(2, len(self.chunks)))
        ]
        self.copies = CopyStream(self.device)

    # --- the step ------------------------------------------------------------------------------

    def grad_norm(self) -> float:
        """The global L2 norm of the reduced gradients (megatron's, bit for bit)."""
        grads = [p.main_grad.view(-1)[start:end] for p, start, end in self._norm_inputs]
        return get_grad_norm_fp32(grads, grad_stats_parallel_group=self.norm_group)

    def _views(self, chunk: list[int], flat: Tensor) -> list[Tensor]:
        views, offset = [], 0
        for i in chunk:
            numel = self.main[i][0].numel()
            views.append(flat[offset : offset + numel].view(self.main[i][0].shape))
            offset += numel
        return views

    def _download(self, k: int):
        """Issue chunk k's gradients device -> host into its slot; returns the mark."""
        chunk, slot = self.chunks[k], self._slots[k % len(self._slots)]
        with self.copies.use():
            for i, grad in zip(chunk, self._views(chunk, slot["grads"])):
                p, start, end = self.parameters[i], *self.main[i][1:]
                source = p.main_grad.view(-1)[start:end].view(grad.shape)
                grad.copy_(source, non_blocking=True)
                self.copies.keep_alive(source)
            return self.copies.record()

    def _upload(self, k: int) -> None:
        """Cast chunk k's host main parameters into the weights' dtype and issue host -> device."""
        chunk, slot = self.chunks[k], self._slots[k % len(self._slots)]
        mains = [self.main[i][0] for i in chunk]
        staged = mains
        if slot["weights"] is not None:
            self.copies.wait_host(slot["uploaded"])  # the slot's previous upload has left
            staged = self._views(chunk, slot["weights"])
            torch._foreach_copy_(staged, mains)
        with self.copies.use():
            for i, value in zip(chunk, staged):
                p, start, end = self.parameters[i], *self.main[i][1:]
                target = p.detach().view(-1)[start:end].view(value.shape)
                target.copy_(value, non_blocking=True)
            slot["uploaded"] = self.copies.record()

    @torch.no_grad()
    def step(self, clip_coefficient: float) -> None:
        """Step every chunk with its gradients times `clip_coefficient` (1: no clipping) and
        refresh the device weights (all-gathered when sharded)."""
        if not self.chunks:
            return self._sync_weights()
        for slot in self._slots:  # the last step's uploads read the host tensors changed now
            self.copies.wait_host(slot["uploaded"])
        downloaded = self._download(0)
        for k, (chunk, optimizer) in enumerate(zip(self.chunks, self.optimizers)):
            slot = self._slots[k % len(self._slots)]
            self.copies.wait_host(downloaded)
            grads = self._views(chunk, slot["grads"])
            if k + 1 < len(self.chunks):  # the other slot's gradients were stepped already
                downloaded = self._download(k + 1)
            if clip_coefficient < 1.0:
                torch._foreach_mul_(grads, clip_coefficient)
            for i, grad in zip(chunk, grads):
                self.main[i][0].grad = grad
            optimizer.step()
            for i in chunk:
                self.main[i][0].grad = None
            self._upload(k)
        self._sync_weights()

    def _sync_weights(self) -> None:
        for slot in self._slots:
            self.copies.join(slot["uploaded"])
        if self.sharded:
            self.ddp.start_param_sync()

    # --- state ---------------------------------------------------------------------------------

    def state(self, main: Tensor) -> dict:
        """AdamW's state of a host main tensor: step, exp_avg, exp_avg_sq."""
        return self._optimizer_of[id(main)].state[main]

    @torch.no_grad()
    def load_state(self, main: Tensor, steps: int, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
        state = self.state(main)
        state["step"].fill_(float(steps))
        state["exp_avg"].copy_(exp_avg.view_as(main))
        state["exp_avg_sq"].copy_(exp_avg_sq.view_as(main))

    def tensors(self) -> list[Tensor]:
        """The host tensors: main parameters, moments, staging slots."""
        held = []
        for main in self.main:
            if main is not None:
                state = self.state(main[0])
                held += [main[0], state["exp_avg"], state["exp_avg_sq"]]
        for slot in self._slots:
            held += [t for t in (slot["grads"], slot["weights"]) if t is not None]
        return held

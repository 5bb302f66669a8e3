"""Sequence parallelism (megatron's, within the tensor-parallel group) and context parallelism
(Ulysses, over megatron's context-parallel group) of the DiTs: which token rows each rank holds
and the collectives that move them, all megatron-core's mappings.

A DiT stage embeds its inputs whole on every rank, `SequenceShards.scatter` keeps this rank's
token rows, the layers and the output head work on them, and `gather` assembles the whole output
on every rank. A model's inputs and outputs are therefore the same on every layout, and nothing
outside the models knows about the split. Pipeline stages send their local token rows.

Sequence parallelism (`ExecutionConfig.sequence_parallel`, T tensor-parallel ranks): outside
attention and the MLP each rank holds S / T rows. A column-parallel linear all-gathers the rows
before its matmul (keeping only its own for backward) and reduce-scatters the input gradient; a
row-parallel linear reduce-scatters its partial products instead of all-reducing them; both move
the bytes of one all-reduce, so sequence parallelism costs no extra communication. Parameters
that act on local rows only (norm affines, row-parallel biases, Wan's modulation table, the
head, LoRA factors on local rows) then hold the gradient of their rows: they are tagged
`param.sequence_parallel = True` and summed over TP after backward (megatron's finalize step,
`parallel.pipeline.finish_grad_sync`). Conditioning rows that every rank holds whole and that
meet only local rows (the adaLN modulation, the timestep embedding at the head) sum their
gradients over TP where they meet them (`conditioning`).

Context parallelism (C ranks of megatron's CP group, orthogonal to TP): each rank holds S / C
rows (S / (C T) with sequence parallelism) through the whole layer. Around self-attention an
all-to-all trades them for head shards, [S / C, b, h, d] -> [S, b, h / C, d] (`heads`), the core
attention sees the whole sequence for h / C heads, and a second all-to-all trades back (`rows`).
Cross-attention needs none: local queries attend to the whole text. Each rank's gradients are
its rows' share: megatron's schedules scale the loss by C and its DDP averages over data x
context parallel ranks, which together sum the shares over CP and average over DP.

Padding: a sequence that T x C does not divide gets zero rows at its end. They never enter
attention (`heads` drops them before the core attention, `rows` restores them after) and
`gather` drops them, so they reach no loss: outputs and gradients are exactly one process's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    all_to_all,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.utils import get_pg_rank, get_pg_size
from torch import Tensor, nn


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    """x [n, ...] with zero rows appended up to `rows`."""
    missing = rows - x.shape[0]
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, missing)) if missing else x


@dataclass(frozen=True)
class SequenceShards:
    """How a sequence of `tokens` rows is split on this rank (module docstring).

    tokens: whole sequence length S (rows of [S, b, ...] tensors).
    tp_group / cp_group: megatron's tensor- and context-parallel groups.
    tensor_parallel: ranks the rows split over within the TP group (its size with sequence
        parallelism, else 1); context_parallel: the CP group's size.
    """

    tokens: int
    tp_group: object
    cp_group: object
    tensor_parallel: int
    context_parallel: int

    @classmethod
    def of(cls, tokens: int, tp_group, cp_group, sequence_parallel: bool) -> SequenceShards:
        tensor_parallel = get_pg_size(tp_group) if sequence_parallel else 1
        return cls(tokens, tp_group, cp_group, tensor_parallel, get_pg_size(cp_group))

    @property
    def parts(self) -> int:
        return self.tensor_parallel * self.context_parallel

    @property
    def padded(self) -> int:
        """S rounded up to a multiple of T x C."""
        return -(-self.tokens // self.parts) * self.parts

    @property
    def local_rows(self) -> int:
        """Rows this rank holds outside attention and the MLP."""
        return self.padded // self.parts

    @property
    def chunk_rows(self) -> int:
        """Rows of this rank's context-parallel chunk: what a column-parallel linear returns."""
        return self.padded // self.context_parallel

    def scatter(self, x: Tensor) -> Tensor:
        """Whole rows x [S, ...] -> this rank's [local_rows, ...]: the CP chunk (its gradient
        is this chunk's share, zero elsewhere), then megatron's split over TP (whose backward
        all-gathers the TP ranks' rows of the chunk). A copy, not a view, so that the whole
        tensor is freed (megatron's clone_scatter_output_in_embedding)."""
        if self.parts == 1:
            return x
        x = _pad_rows(x, self.padded)
        if self.context_parallel > 1:
            start = get_pg_rank(self.cp_group) * self.chunk_rows
            x = x[start : start + self.chunk_rows]
        if self.tensor_parallel > 1:
            x = scatter_to_sequence_parallel_region(x, group=self.tp_group)
        return x.clone()

    def gather(self, x: Tensor) -> Tensor:
        """This rank's rows x [local_rows, ...] -> the whole [S, ...] on every rank (padding
        dropped). Everything after it (the loss) is computed alike on every rank, so backward
        keeps this rank's rows of the gradient (megatron's gather with
        tensor_parallel_output_grad=False)."""
        if self.parts == 1:
            return x
        if self.tensor_parallel > 1:
            x = gather_from_sequence_parallel_region(
                x, tensor_parallel_output_grad=False, group=self.tp_group
            )
        if self.context_parallel > 1:
            x = gather_from_sequence_parallel_region(
                x, tensor_parallel_output_grad=False, group=self.cp_group
            )
        return x[: self.tokens]

    def conditioning(self, *xs: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Rows every rank holds whole and that meet only local rows (the adaLN modulation, the
        head's timestep embedding), each [rows, ...] with the same trailing shape: with
        sequence parallelism each TP rank's gradient is its rows' share, summed over TP here in
        one all-reduce (megatron's copy-to-TP-region: identity forward). Context-parallel
        shares are summed with the parameters'."""
        if self.tensor_parallel > 1:
            joined = copy_to_tensor_model_parallel_region(torch.cat(xs), group=self.tp_group)
            xs = joined.split([x.shape[0] for x in xs])
        return xs[0] if len(xs) == 1 else tuple(xs)

    def heads(self, x: Tensor) -> Tensor:
        """A column-parallel linear's output split into heads, x [chunk_rows, b, h, d] -> the
        whole sequence for h / C of them, [S, b, h / C, d]: Ulysses' all-to-all over CP, then
        the padding rows dropped (so no key masks are needed)."""
        if self.context_parallel > 1:
            group, cp = self.cp_group, self.context_parallel
            pieces = x.unflatten(2, (cp, -1)).movedim(2, 0)  # [C, rows, b, h / C, d]
            x = all_to_all(group, pieces.flatten(0, 1))  # row chunks of every rank, in order
        return x[: self.tokens] if self.parts > 1 else x

    def rows(self, x: Tensor) -> Tensor:
        """Inverse of `heads` for the attention output x [S, b, h / C * d] -> [chunk_rows, b,
        h * d], ready for the row-parallel output projection."""
        if self.parts == 1:
            return x
        x = _pad_rows(x, self.padded)
        if self.context_parallel > 1:
            cp = self.context_parallel
            pieces = all_to_all(self.cp_group, x)  # [C * rows, b, h / C * d], by head group
            x = pieces.unflatten(0, (cp, -1)).movedim(0, 2).flatten(2)
        return x


def mark_sequence_parallel(config, *parts: nn.Module | nn.Parameter | None) -> None:
    """Tag the parameters of `parts` (modules or parameters; None is skipped) as acting on
    local rows only (megatron's attribute), so that under sequence parallelism their gradients
    are summed over TP after backward."""
    if not config.sequence_parallel:
        return
    for part in parts:
        if isinstance(part, nn.Parameter):
            part.sequence_parallel = True
        elif part is not None:
            for param in part.parameters():
                param.sequence_parallel = True

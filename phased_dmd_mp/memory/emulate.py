"""One rank of a tensor x pipeline parallel layout, emulated in a single process.

`rank_groups(tp, tp_rank, pp, pp_rank)` are process groups that only answer `size()` and
`rank()`, which is all megatron-core and our models read while building a stage, so
`build(arch, execution, rank_groups(...))` on the meta device gives that rank's exact
parameter shapes without any process group of that size. `emulated_collectives()` lets such a
stage also run (on small real tensors, to measure what it keeps for backward): collectives on
these groups do nothing, which leaves every shape right and the values meaningless.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import mappings


class EmulatedGroup:
    """A process group of `size` ranks seen from rank `rank`; it communicates nothing."""

    def __init__(self, size: int, rank: int):
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not in a group of {size}")
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def rank_groups(tp: int, tp_rank: int, pp: int, pp_rank: int) -> ProcessGroupCollection:
    """The groups of the rank (tp_rank, pp_rank) of a tp x pp layout (one data-parallel rank)."""
    groups = ProcessGroupCollection()
    groups.tp, groups.pp = EmulatedGroup(tp, tp_rank), EmulatedGroup(pp, pp_rank)
    for name in ("dp", "dp_cp", "cp", "embd", "pos_embd"):
        setattr(groups, name, EmulatedGroup(1, 0))
    return groups


class _Done:
    def wait(self) -> None:
        pass


@contextlib.contextmanager
def emulated_collectives():
    """All-reduce, all-gather, reduce-scatter and broadcast on `EmulatedGroup`s do nothing
    (the output buffers keep whatever they held; collectives on real groups run)."""
    # megatron's mappings keep their own references to the all-gather / reduce-scatter
    targets = [(dist, name) for name in ("all_reduce", "all_gather_into_tensor", "broadcast")]
    targets += [(mappings, "dist_all_gather_func"), (mappings, "dist_reduce_scatter_func")]

    def patched(original):
        def call(*args, group=None, **kwargs):
            if isinstance(group, EmulatedGroup) or any(isinstance(a, EmulatedGroup) for a in args):
                return _Done()  # what async_op=True callers wait on
            return original(*args, group=group, **kwargs)

        return call

    with contextlib.ExitStack() as stack:
        for module, name in targets:
            stack.enter_context(mock.patch.object(module, name, patched(getattr(module, name))))
        yield

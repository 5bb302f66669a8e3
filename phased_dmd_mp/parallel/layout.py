"""What must divide what when a DiT runs over tensor, pipeline, context and data parallel ranks.

The one home of these rules. The converter (`models/convert.py`), the model build
(`models/config.py` `megatron_config`), the process groups (`parallel/state.py`) and the
distillation runner all call them, and so can a planning tool: every function takes plain
numbers and an architecture config (`WanConfig` / `QwenImageConfig`, read from a config.json
without building anything) and raises `phased_dmd_mp.config.ConfigError` with one line naming
the quantity, its value and the divisor.

    check_layout(arch, tensor_parallel=2, pipeline_parallel=2, world_size=8, batch_size=64,
                 micro_batch_size=4)  # -> Layout(tensor_parallel=2, pipeline_parallel=2,
                                      #           data_parallel=2, rank_batch_size=32,
                                      #           context_parallel=1)

Tensor parallelism splits every attention and MLP linear of a layer, megatron style (column-
parallel in, row-parallel out), and each rank must hold an equal, whole share:
  num_attention_heads  q/k/v and their projections are split by whole heads (the fused q/k/v
                       rows are ordered per head, models/convert.py), so a rank holds heads / TP;
                       context parallelism splits them again around attention (Ulysses: an
                       all-to-all trades sequence shards for head shards), so heads / (TP x CP)
  hidden_size          Wan's q/k RMSNorm across heads, the cross-attention q and k/v, and
                       Qwen-Image's 6 x hidden modulation linears split the hidden width
  ffn_dim              the MLP's first linear (column) and second (row) split the FFN width
Sequence parallelism (megatron's, `sequence_parallel`) splits the token rows over the TP ranks
outside attention and the MLP; it needs tensor_parallel > 1 and is on by default there. Context
parallelism splits the token rows over context_parallel ranks of their own. Token counts need
not divide: the sequence is padded to a multiple of TP x CP (parallel/sequence.py).
Pipeline parallelism gives each stage num_layers / PP whole layers. Data parallelism is what
is left of the world, world_size / (TP x PP x CP); each data-parallel rank draws
batch_size / DP samples per update (the CP ranks of one group draw the same ones) and runs
them in equal microbatches of micro_batch_size.
"""

from __future__ import annotations

from dataclasses import dataclass

from phased_dmd_mp.config import ConfigError


def require_divisible(quantity: str, value: int, divisor_name: str, divisor: int) -> None:
    """ConfigError unless `divisor` divides `value` (both named in the message)."""
    if value % divisor:
        raise ConfigError(
            f"{quantity} = {value} is not divisible by {divisor_name} = {divisor}; every rank "
            "must hold an equal share"
        )


def check_sizes(tensor_parallel: int, pipeline_parallel: int, context_parallel: int = 1) -> None:
    """Parallel sizes are positive integers."""
    for name, value in (
        ("tensor_parallel", tensor_parallel),
        ("pipeline_parallel", pipeline_parallel),
        ("context_parallel", context_parallel),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def tensor_parallel_splits(arch) -> dict[str, int]:
    """{name: size} of every dimension of `arch` that tensor parallelism splits."""
    return {
        "num_attention_heads": arch.num_attention_heads,
        "hidden_size": arch.hidden_size,
        "ffn_dim": arch.ffn_dim,
    }


def check_model(
    arch, tensor_parallel: int, pipeline_parallel: int, context_parallel: int = 1
) -> None:
    """`arch` splits evenly into TP x PP shards (heads, hidden and FFN widths by TP, layers by
    PP) and its heads again over CP (heads by TP x CP)."""
    check_sizes(tensor_parallel, pipeline_parallel, context_parallel)
    for name, size in tensor_parallel_splits(arch).items():
        if name == "num_attention_heads" and context_parallel > 1:
            require_divisible(
                name,
                size,
                "tensor_parallel x context_parallel",
                tensor_parallel * context_parallel,
            )
        else:
            require_divisible(name, size, "tensor_parallel", tensor_parallel)
    require_divisible("num_layers", arch.num_layers, "pipeline_parallel", pipeline_parallel)


def sequence_parallel_on(sequence_parallel: bool | None, tensor_parallel: int) -> bool:
    """Whether sequence parallelism runs: None means on where tensor_parallel > 1; True at
    tensor_parallel = 1 is a ConfigError (there is no tensor-parallel group to split over)."""
    if sequence_parallel is None:
        return tensor_parallel > 1
    if sequence_parallel and tensor_parallel == 1:
        raise ConfigError(
            "sequence_parallel: true needs tensor_parallel > 1 (it splits the token rows over "
            "the tensor-parallel ranks), got tensor_parallel = 1; use context_parallel to split "
            "the sequence without tensor parallelism"
        )
    return bool(sequence_parallel)


def data_parallel_size(
    world_size: int, tensor_parallel: int, pipeline_parallel: int, context_parallel: int = 1
) -> int:
    """world_size / (TP x PP x CP), the data-parallel size."""
    check_sizes(tensor_parallel, pipeline_parallel, context_parallel)
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    names = "tensor_parallel x pipeline_parallel"
    if context_parallel > 1:
        names += " x context_parallel"
    model_parallel = tensor_parallel * pipeline_parallel * context_parallel
    require_divisible("world size", world_size, names, model_parallel)
    return world_size // model_parallel


def rank_batch_size(batch_size: int, data_parallel: int, micro_batch_size: int | None) -> int:
    """Samples per data-parallel rank and update: batch_size / DP, which must split into equal
    microbatches of micro_batch_size (None: one microbatch)."""
    require_divisible("batch_size", batch_size, "the data-parallel size", data_parallel)
    rank_batch = batch_size // data_parallel
    if micro_batch_size is not None:
        require_divisible(
            f"the batch per data-parallel rank (batch_size / {data_parallel})",
            rank_batch,
            "micro_batch_size",
            micro_batch_size,
        )
    return rank_batch


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    rank_batch_size: int | None  # None when no batch size was given
    context_parallel: int = 1


def check_layout(
    arch=None,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    context_parallel: int = 1,
    sequence_parallel: bool | None = None,
    world_size: int | None = None,
    batch_size: int | None = None,
    micro_batch_size: int | None = None,
) -> Layout:
    """Every rule above that the given quantities make checkable; `world_size` None means a
    world of exactly TP x PP x CP ranks."""
    check_sizes(tensor_parallel, pipeline_parallel, context_parallel)
    sequence_parallel_on(sequence_parallel, tensor_parallel)
    if arch is not None:
        check_model(arch, tensor_parallel, pipeline_parallel, context_parallel)
    if world_size is None:
        world_size = tensor_parallel * pipeline_parallel * context_parallel
    data_parallel = data_parallel_size(
        world_size, tensor_parallel, pipeline_parallel, context_parallel
    )
    rank_batch = None
    if batch_size is not None:
        rank_batch = rank_batch_size(batch_size, data_parallel, micro_batch_size)
    return Layout(tensor_parallel, pipeline_parallel, data_parallel, rank_batch, context_parallel)

"""torchrun worker: run DiT stages on TP x PP x CP x DP layouts and compare with single-process
references written by tests/test_parallel_dit.py.

    torchrun --nproc_per_node=N tests/parallel/dit_worker.py REF.pt ... --layouts tp2-sp cp2

A layout names its sizes and switches: tpN, ppN, cpN (1 where absent), sp (sequence
parallelism); data parallelism is the rest of the ranks. The layouts run one after another in
the same processes. Each reference holds the architecture, whole-model weights, a batch of
samples with loss weights, and the single-process outputs, loss and weight gradients. Every
rank builds its stage, loads its shard, runs megatron's schedules over its data-parallel share
of the samples (one sample per microbatch), finalises gradients as the runner does (DDP's
average, the sequence-parallel sums) and checks outputs (last stage) and its own gradient shard.
Mismatches are collected, not raised, so that no rank leaves the others waiting in a collective;
the exit code is non-zero if there was any.
"""

import argparse
import datetime
import re
import sys

import torch
from megatron.core import parallel_state

from phased_dmd_mp.models import build, load_whole_state_dict, save_checkpoint
from phased_dmd_mp.models.config import ExecutionConfig
from phased_dmd_mp.models.convert import MODEL_KINDS, shard
from phased_dmd_mp.parallel import pipeline
from phased_dmd_mp.parallel.state import destroy, initialize


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


MISMATCHES: list[str] = []


def check(name: str, actual, expected, tolerance: float) -> None:
    error = relative_error(actual, expected)
    if not error < tolerance:
        MISMATCHES.append(f"{name}: relative error {error:.2e} >= {tolerance:.0e}")


def parse_layout(layout: str) -> dict:
    """'tp2-cp2-sp' -> {'tp': 2, 'pp': 1, 'cp': 2, 'sp': True}."""
    sizes = dict(re.findall(r"(tp|pp|cp)(\d+)", layout))
    sizes = {k: int(sizes.get(k, 1)) for k in ("tp", "pp", "cp")}
    return {**sizes, "sp": "sp" in layout.split("-")}


def run_reference(path: str, groups, layout: dict, save: str | None) -> None:
    tp, pp = layout["tp"], layout["pp"]
    reference = torch.load(path, weights_only=False)
    arch = MODEL_KINDS[reference["model"]](**reference["arch"])
    execution = ExecutionConfig(recompute=reference["recompute"], sequence_parallel=layout["sp"])
    stage = build(arch, execution, groups, init_weights=False)
    load_whole_state_dict(stage, reference["weights"])
    path = f"{path} [{'-'.join(f'{k}{v}' for k, v in layout.items())}]"

    dp, dp_rank = groups.dp.size(), groups.dp.rank()
    samples = reference["samples"]  # list of (inputs, loss weight), one sample each
    share = len(samples) // dp
    mine = list(range(dp_rank * share, (dp_rank + 1) * share))
    last_stage = groups.pp.rank() == pp - 1

    outputs = pipeline.forward(stage, [samples[i][0] for i in mine])
    if last_stage:
        for i, output in zip(mine, outputs):
            check(f"{path} forward output {i}", output, reference["outputs"][i], 1e-5)

    model = pipeline.data_parallel(stage)
    model.zero_grad_buffer()
    losses = pipeline.forward_backward(
        model,
        [samples[i] for i in mine],
        loss_fn=lambda output, weight: (output * weight).sum(),
    )
    pipeline.finish_grad_sync(model)
    if last_stage:
        for i, loss in zip(mine, losses):
            # the schedule reports each microbatch loss divided by the number of microbatches
            check(f"{path} loss {i}", loss * len(mine), reference["losses"][i], 1e-5)

    expected = shard(reference["grads"], arch, tp, pp)[(groups.tp.rank(), groups.pp.rank())]
    for name, param in stage.named_parameters():
        check(f"{path} grad {name}", param.main_grad, expected[name], 1e-5)
    if save:
        save_checkpoint(stage, save)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", nargs="+", required=True, help="e.g. tp2 tp2-sp cp2")
    parser.add_argument("--save", help="save the first reference's model of the first layout")
    parser.add_argument("references", nargs="+")
    args = parser.parse_args()
    torch.manual_seed(0)
    for number, text in enumerate(args.layouts):
        layout = parse_layout(text)
        timeout = datetime.timedelta(seconds=120)
        groups = initialize(layout["tp"], layout["pp"], context_parallel=layout["cp"],
                            timeout=timeout)  # fmt: skip
        for index, path in enumerate(args.references):
            save = args.save if index == 0 and number == 0 else None
            run_reference(path, groups, layout, save)
        parallel_state.destroy_model_parallel()  # the next layout builds its own groups
    rank = torch.distributed.get_rank()
    destroy()
    for mismatch in MISMATCHES:
        print(f"rank {rank}: {mismatch}", file=sys.stderr)
    return 1 if MISMATCHES else 0


if __name__ == "__main__":
    sys.exit(main())

"""torchrun worker: LoRA adapters on TP x PP x CP layouts (with and without sequence
parallelism) against single-process references written by tests/test_models_lora.py.

    torchrun --nproc_per_node=N tests/parallel/lora_worker.py REF.pt --save DIR --layouts tp2 pp2

Layouts are named as in dit_worker.py (tp2-cp2-sp: TP = 2 x CP = 2 with sequence parallelism).
For each layout (one after the other in the same processes) every rank builds its stage, loads
its shard of the base weights, adds the adapters (checking that their initial A's are the
reference's: the init does not depend on the layout), loads its shard of each adapter, and runs
megatron's schedules with adapter 1 active: outputs on the last stage and the finalised
gradients of both adapters (adapter 0 unused: zero) are compared with the reference. Then
`save_lora` writes adapter 1 to DIR/<layout>/<reference name>, for the test to compare.
Mismatches are collected, not raised, so that no rank leaves the others in a collective.
"""

import argparse
import datetime
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state

from dit_worker import parse_layout

from phased_dmd_mp.models import ExecutionConfig, build, load_whole_state_dict
from phased_dmd_mp.models.convert import MODEL_KINDS
from phased_dmd_mp.models.lora import (
    adapter_parameters,
    add_lora,
    load_lora_state_dict,
    lora_state_dict,
    save_lora,
    set_active_adapter,
    shard_lora,
)
from phased_dmd_mp.parallel import pipeline
from phased_dmd_mp.parallel.state import destroy, initialize

MISMATCHES: list[str] = []


def check(name: str, actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    difference = (actual.float() - expected.float()).norm()
    error = (difference / expected.float().norm().clamp_min(1e-30)).item()
    if not error < tolerance:
        MISMATCHES.append(f"{name}: relative error {error:.2e} >= {tolerance:.0e}")


def run_reference(path: str, groups, layout: str, save: Path) -> None:
    sizes = parse_layout(layout)
    tp, pp = sizes["tp"], sizes["pp"]
    reference = torch.load(path, weights_only=False)
    arch = MODEL_KINDS[reference["model"]](**reference["arch"])
    execution = ExecutionConfig(sequence_parallel=sizes["sp"])
    stage = build(arch, execution, pg_collection=groups, init_weights=False)
    load_whole_state_dict(stage, reference["base"])
    add_lora(stage, **reference["lora"])
    ranks = (groups.tp.rank(), groups.pp.rank())

    initial = shard_lora(reference["initial"], arch, tp, pp)[ranks]
    for key, tensor in lora_state_dict(stage, 0).items():
        if not torch.equal(tensor, initial[key]):
            MISMATCHES.append(f"{path} initial {key} differs from the single-process init")
    for adapter, whole in enumerate(reference["adapters"]):
        load_lora_state_dict(stage, adapter, shard_lora(whole, arch, tp, pp)[ranks])
    set_active_adapter(stage, 1)

    samples = reference["samples"]
    last_stage = groups.pp.rank() == pp - 1
    outputs = pipeline.forward(stage, [inputs for inputs, _ in samples])
    if last_stage:
        for i, output in enumerate(outputs):
            check(f"{path} {layout} output {i}", output, reference["outputs"][i], 1e-5)

    model = pipeline.data_parallel(stage)
    model.zero_grad_buffer()
    pipeline.forward_backward(model, samples, lambda output, weight: (output * weight).sum())
    pipeline.finish_grad_sync(model)
    expected = shard_lora(reference["grads"], arch, tp, pp)[ranks]
    names = list(lora_state_dict(stage, 1))
    for name, param in zip(names, adapter_parameters(stage, 1)):
        check(f"{path} {layout} grad {name}", param.main_grad, expected[name], 1e-5)
    if any(param.main_grad.any() for param in adapter_parameters(stage, 0)):
        MISMATCHES.append(f"{path}: the inactive adapter 0 got gradients")
    save_lora(stage, 1, save / layout / Path(path).stem)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", nargs="+", required=True, help="e.g. tp2 pp2 tp2-sp cp2")
    parser.add_argument("--save", type=Path, required=True)
    parser.add_argument("references", nargs="+")
    args = parser.parse_args()
    torch.manual_seed(0)
    for layout in args.layouts:
        sizes = parse_layout(layout)
        timeout = datetime.timedelta(seconds=120)
        groups = initialize(sizes["tp"], sizes["pp"], context_parallel=sizes["cp"],
                            timeout=timeout)  # fmt: skip
        for path in args.references:
            run_reference(path, groups, layout, args.save)
        parallel_state.destroy_model_parallel()  # the next layout builds its own groups
    rank = torch.distributed.get_rank()
    destroy()
    for mismatch in MISMATCHES:
        print(f"rank {rank}: {mismatch}", file=sys.stderr)
    return 1 if MISMATCHES else 0


if __name__ == "__main__":
    sys.exit(main())

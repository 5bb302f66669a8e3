"""torchrun worker: IDA's blend across tensor-parallel shards and a sharded optimizer.

    torchrun --nproc_per_node=4 tests/parallel/levers_worker.py TEACHER OUT

TP = 2 x DP = 2, bf16 with fp32 main parameters sharded over the data-parallel ranks (megatron's
DistributedOptimizer): after one fake and one generator update, IDA must leave every rank's
whole fp32 main parameters of the fake at (1 - w) before + w generator (this rank's TP shard of
the generator's weights) and the fake's weights at their bf16 cast, on both data-parallel ranks.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1]))
from distill_helpers import QUICK

from phased_dmd_mp.config import load_config
from phased_dmd_mp.distill.config import DistillConfig
from phased_dmd_mp.distill.trainer import Distiller

WEIGHT = 0.25


def main() -> None:
    teacher, out = sys.argv[1:]
    overrides = [
        f"teacher={teacher}", *QUICK, "num_steps=4", "tensor_parallel=2", "dtype=bfloat16",
        f"ida_weight={WEIGHT}",
    ]  # fmt: skip
    d = Distiller(load_config(DistillConfig, None, overrides), Path(out), progress=False)
    assert d.dp_size == 2 and d._trained("fake", 1).sharded
    d.fake_update(1)
    d.generator_update(1)
    fake, trained = d._fake(1), d._trained("fake", 1)
    before = trained.state_dict()["main_params"]  # whole fp32 tensors (gathered over DP)
    generator = dict(d.generator[0].module.named_parameters())
    d.levers.after_generator_step(1)
    after = trained.state_dict()["main_params"]
    names = [name for name, _ in fake.module.named_parameters()]
    moved = 0
    for name, old, new in zip(names, before, after, strict=True):
        target = generator[name].detach().float()
        torch.testing.assert_close(new, (1 - WEIGHT) * old + WEIGHT * target, rtol=1e-6, atol=1e-7)
        weight = dict(fake.module.named_parameters())[name]
        assert torch.equal(weight, new.to(weight.dtype)), name
        moved += int(not torch.equal(target, old))
    assert moved > 0
    print(f"rank {dist.get_rank()}: IDA blend exact over {len(names)} parameters", flush=True)


if __name__ == "__main__":
    main()

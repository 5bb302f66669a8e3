"""torchrun worker: three updates of a tiny bf16 DiT through distill/optim.py's TrainedModel,
the batch split over the data-parallel ranks, and resumes from saved state.

    torchrun --nproc_per_node=N tests/parallel/optim_worker.py OUT SHARD [OTHER_RESULT]

Every rank builds the same model and batch (seeded); rank r trains on its 1/N of the batch
(SHARD: "shard" for megatron's DistributedOptimizer). Rank 0 writes OUT/result.pt with, per run,
the state_dict (whole fp32 main params and moments), the weights, the gradient norms and the
bytes the role holds per trained parameter: "straight" (three updates), "resumed" (a fresh model
restored from straight's state after two updates, then the third) and, given OTHER_RESULT (a
result.pt of another data-parallel size), "from_other" (restored from that run's state).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1]))
from distill_helpers import TINY_WAN

from phased_dmd_mp.conditioning import Conditions
from phased_dmd_mp.distill.models import VelocityModel
from phased_dmd_mp.distill.optim import TrainedModel, storage_bytes
from phased_dmd_mp.models import ExecutionConfig, build
from phased_dmd_mp.parallel.state import destroy, initialize

BATCH, UPDATES = 4, 3


def held_bytes_per_parameter(trained: TrainedModel) -> float:
    """Bytes of the role's weights, gradient buffers, main params and Adam moments (and EMA)."""
    return storage_bytes(trained.tensors()) / sum(p.numel() for p in trained.parameters)


def run(shard: bool, resume_from: dict | None = None, offload: bool = False) -> dict:
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    module = build(TINY_WAN, ExecutionConfig(dtype="bfloat16"))
    model = VelocityModel(module)
    data = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 1, 1, 8, 8, generator=data)
    t = torch.rand(BATCH, generator=data)
    cond = Conditions(text=torch.randn(BATCH, 3, TINY_WAN.text_dim, generator=data))
    target = torch.randn(BATCH, 1, 1, 8, 8, generator=data)
    mine = torch.arange(rank * BATCH // size, (rank + 1) * BATCH // size)
    trained = TrainedModel(
        model.parameters(), module.config, lr=1e-3, betas=(0.0, 0.999), weight_decay=0.01,
        grad_clip=1.0, main_params_dtype="float32", shard=shard, offload=offload,
    )  # fmt: skip

    def loss_fn(v, index):
        return (v - target[mine][index]).square().mean()

    norms, first, after_two = [], 0, None
    if resume_from is not None:
        trained.load_state_dict(resume_from["after_two"])
        norms, first = resume_from["norms"][:2], 2
    for update in range(first, UPDATES):
        trained.zero_grad()
        model.train(x[mine], t[mine], cond.select(mine), loss_fn, micro_batch_size=1)
        norms.append(trained.step())
        if update == 1:
            after_two = trained.state_dict()
    return {
        "state": trained.state_dict(),
        "norms": norms,
        "after_two": after_two,
        "bytes_per_parameter": held_bytes_per_parameter(trained),
        "weights": [p.detach().clone() for p in trained.parameters],
    }


def main() -> None:
    out, shard, *other = sys.argv[1:]
    initialize(1, 1)
    shard = shard == "shard"
    result = {"straight": run(shard)}
    result["resumed"] = run(shard, result["straight"])
    if other:
        other = torch.load(other[0], weights_only=False)["straight"]
        result["from_other"] = run(shard, other)
    if dist.get_rank() == 0:
        torch.save(result, Path(out) / "result.pt")
    destroy()


if __name__ == "__main__":
    main()

"""torchrun worker: the discriminator head under tensor parallelism with sequence parallelism
(tokens split over the TP ranks) and context parallelism (over the CP ranks).

    torchrun --nproc_per_node=4 tests/parallel/head_worker.py

TP = 2 x CP = 2: each rank holds a quarter of a layer's token rows and its TP shard of the head.
Its logits, the gradient with respect to its rows and its shard's parameter gradients must equal
those of the whole head (the seeded whole tensors) on all rows in one process.
"""

import sys
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

sys.path.insert(0, str(Path(__file__).parents[2]))
from phased_dmd_mp.distill.discriminator import LAYER_NORM_EPS, DiscriminatorHead, _whole
from phased_dmd_mp.parallel.cpu_compat import cuda_calls_on_cpu

ROWS, BATCH, HIDDEN = 8, 3, 16


def main() -> None:
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(2, 1, context_parallel_size=2)
    tp = parallel_state.get_tensor_model_parallel_group()
    cp = parallel_state.get_context_parallel_group()
    tp_rank, cp_rank = dist.get_rank(tp), dist.get_rank(cp)
    h = torch.randn(ROWS, BATCH, HIDDEN, generator=torch.Generator().manual_seed(0))
    head = DiscriminatorHead(
        HIDDEN, (0,), 1, 7, "t", tp_group=tp, cp_group=cp, sequence_parallel=True
    )
    with torch.no_grad():  # non-zero biases, so their gradients and shards are tested too
        head.b1[0].fill_(0.1 * (tp_rank + 1))
        head.b2[0].fill_(0.3)
    local = h.chunk(2)[cp_rank].chunk(2)[tp_rank].clone().requires_grad_()
    # Inside autograd's backward the shim's factory redirection is off and megatron's
    # sequence-parallel reduce-scatter allocates at torch.cuda.current_device(): the CPU here.
    cpu = mock.patch.object(torch.cuda, "current_device", lambda: torch.device("cpu"))
    with cuda_calls_on_cpu(), cpu:  # as the tap runs it: the rows' gradient, then training
        logits = head.logits(0, local)
        loss = F.softplus(-logits).sum()
        (rows_grad,) = torch.autograd.grad(loss, local, retain_graph=True)
        torch.autograd.backward(loss)
    W1 = _whole((HIDDEN, HIDDEN), 7, "t/layer0/W1", HIDDEN**-0.5).requires_grad_()
    w2 = _whole((1, HIDDEN), 7, "t/layer0/w2", HIDDEN**-0.5).requires_grad_()
    b1 = torch.cat([torch.full((HIDDEN // 2,), 0.1), torch.full((HIDDEN // 2,), 0.2)])
    b1.requires_grad_()
    whole = h.clone().requires_grad_()
    x = F.layer_norm(whole, (HIDDEN,), eps=LAYER_NORM_EPS)
    reference = (F.silu(F.linear(x, W1, b1)).mean(0) @ w2.T).squeeze(-1) + 0.3
    F.softplus(-reference).sum().backward()
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows_grad, whole.grad.chunk(2)[cp_rank].chunk(2)[tp_rank])
    torch.testing.assert_close(head.W1[0].grad, W1.grad.chunk(2, 0)[tp_rank])
    torch.testing.assert_close(head.b1[0].grad, b1.grad.chunk(2)[tp_rank])
    torch.testing.assert_close(head.w2[0].grad, w2.grad.chunk(2, 1)[tp_rank])
    print(f"rank {dist.get_rank()}: head exact under SP and CP", flush=True)


if __name__ == "__main__":
    main()

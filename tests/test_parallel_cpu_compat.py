"""The CPU shim for megatron's CUDA-only schedule code: inside the context CUDA allocations and
syncs land on the CPU, outside it nothing changes."""

import pytest
import torch

from phased_dmd_mp.parallel.cpu_compat import cuda_calls_on_cpu

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the shim is a no-op where CUDA exists"
)


def test_cuda_allocations_and_syncs_run_on_cpu_inside_the_context():
    with cuda_calls_on_cpu():
        assert torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
        device = torch.cuda.current_device()
        assert torch.empty((2, 3), device=device, requires_grad=True).device.type == "cpu"
        assert torch.tensor([1, 2], device=torch.device("cuda", 0)).device.type == "cpu"
        torch.cuda.synchronize()
        # megatron's optimizers choose fp32 main copies by the CUDA type name
        assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1).type(torch.bfloat16).dtype == torch.bfloat16
        # CPU requests are left alone.
        assert torch.ones(2, device="cpu").sum().item() == 2


def test_nothing_changes_outside_the_context():
    with cuda_calls_on_cpu():
        pass
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")
    with pytest.raises((RuntimeError, AssertionError)):
        torch.cuda.current_device()
    assert torch.zeros(1).type() == "torch.FloatTensor"


def test_megatron_allocations_in_backward_land_on_the_cpu():
    """The shim's factory redirection is off inside autograd's backward (a mode is popped while
    it handles a call); megatron's sequence-parallel mappings allocate there with
    device=torch.cuda.current_device(), which must still answer the CPU."""

    class Gather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            buffer = torch.empty(grad.shape, dtype=grad.dtype, device=torch.cuda.current_device())
            return buffer.copy_(grad) * 2

    x = torch.randn(3, requires_grad=True)
    with cuda_calls_on_cpu():
        Gather.apply(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))


def test_activation_recompute_inside_backward_runs_under_the_shim():
    """Recompute replays a layer inside backward, where the shim's mode is off: a layer that
    allocates on CUDA (megatron's tensor-parallel gather, e.g. Qwen-Image's modulation at TP > 1)
    must still land on the CPU. Caught by the Qwen-Image recipe rehearsal at TP=2."""
    from phased_dmd_mp.parallel import fp8

    def layer(x):
        gathered = torch.empty(x.shape, dtype=x.dtype, device=torch.cuda.current_device())
        return gathered.copy_(x) * x

    x = torch.randn(3, requires_grad=True)
    with cuda_calls_on_cpu():
        fp8.checkpoint("off", layer, x).sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())

"""Fused kernels (phased_dmd_mp._C via phased_dmd_mp.ops) against the pure-torch reference.

Accuracy rule (as flash-attention's tests): measured against a float64 oracle computed from the
same (rounded) inputs, the fused result's error is at most about twice the reference's own error
in the same precision.
"""

import os
import shutil
import zlib

import pytest
import torch

from phased_dmd_mp import losses, ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd sizes exercise the scalar (unvectorised) paths and chunk tails; 4096 * 9 crosses chunks.
SHAPES = [(3,), (4, 7), (2, 3, 5, 7), (3, 1000), (2, 4096 * 9 + 5), (5, 64)]
CUDA = (
    torch.cuda.is_available() and ops.unsupported_reason((torch.zeros(1, device="cuda"),)) is None
)
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")),
]


def _randn(shape, dtype, device, generator):
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(
        device=device, dtype=dtype
    )


def _timesteps(batch, generator, device):
    s = torch.full((batch,), 0.625, dtype=torch.float64)
    t = s + (1 - s) * torch.rand(batch, generator=generator, dtype=torch.float64)
    t[0] = s[0]  # t = s: sigma_{t|s} = 0, the clamp is active
    if batch > 1:
        t[1] = s[1] + 1e-5  # clamp still active, sigma tiny
    return t.to(device), s.to(device)


def _within_twice_reference_error(fused, reference, oracle, dtype):
    """max |fused - oracle| <= 2 max |reference - oracle| + one unit in the last place of the
    largest value (the floor keeps single roundings on tiny inputs from deciding the test)."""
    fused_error = (fused.double() - oracle).abs().max().item()
    reference_error = (reference.double() - oracle).abs().max().item()
    ulp = torch.finfo(dtype).eps * oracle.abs().max().item()
    assert fused_error <= 2 * reference_error + ulp, (fused_error, reference_error, ulp)


def _oracle_inputs(*tensors):
    return [x.detach().double() for x in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("loss_fn", [losses.subinterval_flow_loss, losses.subinterval_x0_loss])
def test_subinterval_loss_matches_reference(device, dtype, shape, loss_fn):
    generator = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{shape}".encode()))
    pred, x_s, eps = (_randn(shape, dtype, device, generator) for _ in range(3))
    t, s = _timesteps(shape[0], generator, device)
    results = {}
    for backend in ("reference", "fused"):
        p = pred.clone().requires_grad_(True)
        loss = loss_fn(p, x_s, eps, t, s, reduction="none", backend=backend)
        upstream = torch.linspace(0.5, 1.5, shape[0], device=device)  # per-sample dL/dloss
        (grad,) = torch.autograd.grad((loss * upstream).sum(), p)
        results[backend] = (loss, grad)
    p64 = _oracle_inputs(pred)[0].requires_grad_(True)
    oracle = loss_fn(p64, *_oracle_inputs(x_s, eps), t, s, reduction="none", backend="reference")
    (oracle_grad,) = torch.autograd.grad((oracle * upstream.double()).sum(), p64)
    assert results["fused"][1].dtype == dtype
    # The loss is accumulated and returned in float32 whatever the data dtype.
    _within_twice_reference_error(
        results["fused"][0], results["reference"][0], oracle, torch.float32
    )
    _within_twice_reference_error(results["fused"][1], results["reference"][1], oracle_grad, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_noising_matches_reference(device, dtype, shape):
    generator = torch.Generator().manual_seed(1)
    x_s, eps = (_randn(shape, dtype, device, generator) for _ in range(2))
    t, s = _timesteps(shape[0], generator, device)
    fused = ops.add_noise_from(x_s, eps, t, s, backend="fused")
    reference = ops.add_noise_from(x_s, eps, t, s, backend="reference")
    oracle = ops.add_noise_from(*_oracle_inputs(x_s, eps), t, s, backend="reference")
    assert fused.dtype == dtype
    _within_twice_reference_error(fused, reference, oracle, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_dmd_generator_loss_matches_reference(device, dtype, shape, guided, normalize):
    generator = torch.Generator().manual_seed(2)
    x_s, teacher, uncond, fake, x_t = (_randn(shape, dtype, device, generator) for _ in range(5))
    t, s = _timesteps(shape[0], generator, device)
    t = t + 0.05  # DMD samples t > s
    kwargs = {"normalize": normalize, "x_t": x_t if normalize else None}
    if guided:
        kwargs.update(v_teacher_uncond=uncond, guidance_scale=3.5)
    results = {}
    for backend in ("reference", "fused"):
        x = x_s.clone().requires_grad_(True)
        loss = losses.dmd_generator_loss(x, teacher, fake, t, s, backend=backend, **kwargs)
        (grad,) = torch.autograd.grad(loss, x)
        results[backend] = (loss, grad)
    x64 = _oracle_inputs(x_s)[0].requires_grad_(True)
    oracle_kwargs = dict(kwargs)
    for key in ("x_t", "v_teacher_uncond"):
        if oracle_kwargs.get(key) is not None:
            oracle_kwargs[key] = oracle_kwargs[key].double()
    oracle = losses.dmd_generator_loss(
        x64, *_oracle_inputs(teacher, fake), t, s, backend="reference", **oracle_kwargs
    )
    (oracle_grad,) = torch.autograd.grad(oracle, x64)
    assert results["fused"][1].dtype == dtype
    _within_twice_reference_error(
        results["fused"][0], results["reference"][0], oracle, torch.float32
    )
    # The fused gradient is g rounded to the data dtype, then scaled: one rounding more than the
    # reference's, which the one-ulp floor absorbs.
    _within_twice_reference_error(results["fused"][1], results["reference"][1], oracle_grad, dtype)


def test_gradcheck_through_the_fused_ops():
    generator = torch.Generator().manual_seed(3)
    pred, x_s, eps = (torch.randn(3, 5, generator=generator, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.6, 0.8, 1.0], dtype=torch.float64)
    s = torch.full((3,), 0.5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda p: losses.subinterval_flow_loss(
            p, x_s, eps, t, s, reduction="none", backend="fused"
        ),
        (pred.clone().requires_grad_(True),),
    )
    assert torch.autograd.gradcheck(
        lambda a, b: ops.add_noise_from(a, b, t, s, backend="fused"),
        (x_s.clone().requires_grad_(True), eps.clone().requires_grad_(True)),
    )
    # (The DMD generator loss is a stop-gradient surrogate: its gradient is g by construction,
    # not the derivative of its value, so gradcheck does not apply; the parity test checks g.)


def test_torch_compile_traces_the_fused_loss_without_graph_breaks():
    generator = torch.Generator().manual_seed(4)
    pred, x_s, eps = (torch.randn(4, 64, generator=generator) for _ in range(3))
    t, s = torch.tensor([0.6, 0.7, 0.8, 0.9]), torch.full((4,), 0.5)

    def step(p):
        return losses.subinterval_flow_loss(p, x_s, eps, t, s, backend="fused")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    p_eager, p_compiled = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    step(p_eager).backward()
    compiled(p_compiled).backward()
    torch.testing.assert_close(p_compiled.grad, p_eager.grad)


def test_backend_selection():
    x = torch.randn(2, 3)
    assert ops.use_fused("auto", (x,)) and not ops.use_fused("reference", (x,))
    with ops.use_kernel_backend("reference"):
        assert ops.kernel_backend() == "reference" and not ops.use_fused(None, (x,))
    assert ops.kernel_backend() == "auto"
    # int data: auto falls back to the reference, fused says why it cannot run.
    ints = torch.ones(2, 3, dtype=torch.int32)
    assert not ops.use_fused("auto", (ints,))
    with pytest.raises(RuntimeError, match="dtype torch.int32"):
        ops.use_fused("fused", (ints,))
    with pytest.raises(RuntimeError, match="several dtypes"):
        ops.use_fused("fused", (x, x.double()))
    with pytest.raises(ValueError, match="kernel backend"):
        ops.set_kernel_backend("fast")


def test_fused_loss_refuses_gradients_it_does_not_compute():
    pred, x_s, eps = (torch.randn(2, 3) for _ in range(3))
    x_s.requires_grad_(True)  # the fused loss differentiates v_pred only
    with pytest.raises(RuntimeError, match="constant requires grad"):
        losses.subinterval_flow_loss(pred, x_s, eps, 0.9, 0.5, backend="fused")
    # auto: the reference runs and does propagate to x_s
    loss = losses.subinterval_flow_loss(pred, x_s, eps, 0.9, 0.5)
    loss.backward()
    assert x_s.grad is not None


def test_cuda_kernels_are_built_wherever_nvcc_is():
    from phased_dmd_mp import _C

    wanted = os.environ.get("PHASED_DMD_CUDA", "AUTO").upper()
    if wanted == "OFF":
        pytest.skip("PHASED_DMD_CUDA=OFF: the build was asked to skip CUDA")
    assert _C.built_with_cuda == (shutil.which("nvcc") is not None)


@pytest.mark.parametrize("op", ["subinterval", "dmd"])
def test_fused_gradient_is_written_once_and_never_overwritten_while_held(op):
    """The forward pass writes the gradient; backward hands that very buffer to autograd when
    the upstream gradient is 1 and rescales it otherwise. Reused CPU buffers are taken only
    once nothing holds them: a gradient the caller keeps stays intact."""
    generator = torch.Generator().manual_seed(5)
    a, b, c = (torch.randn(4, 3000, generator=generator) for _ in range(3))
    t, s = torch.tensor([0.6, 0.7, 0.8, 0.9]), torch.full((4,), 0.5)

    def grad_of(backend, scale=1.0):
        x = a.clone().requires_grad_(True)
        if op == "subinterval":
            loss = losses.subinterval_flow_loss(x, b, c, t, s, backend=backend)
        else:
            loss = losses.dmd_generator_loss(x, b, c, t, s, backend=backend)
        (scale * loss).backward()
        return x.grad

    kept = [grad_of("fused") for _ in range(3)]
    assert len({g.data_ptr() for g in kept}) == 3  # held results never share memory
    expected = grad_of("reference")
    for g in kept:
        torch.testing.assert_close(g, expected)
    pointer = kept[0].data_ptr()
    del kept
    assert grad_of("fused").data_ptr() == pointer  # a buffer nothing holds is reused as it is
    torch.testing.assert_close(grad_of("fused", scale=-2.5), -2.5 * expected)


def test_a_stale_extension_falls_back_with_the_rebuild_command(monkeypatch):
    from phased_dmd_mp.ops import backend

    class Stale:  # a _C built from older sources: no abi_version, old kernel signatures
        built_with_cuda = False

    monkeypatch.setattr(backend, "extension", lambda: Stale())
    x = torch.randn(2, 3)
    assert "stale build" in backend.unsupported_reason((x,))
    assert not ops.use_fused("auto", (x,))
    with pytest.raises(RuntimeError, match="build_ext --inplace"):
        ops.use_fused("fused", (x,))

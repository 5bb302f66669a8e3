"""The fused C++ subinterval loss against the pure-torch reference (the oracle)."""

import pytest
import torch

from phased_dmd_mp.losses import subinterval_flow_loss, subinterval_x0_loss
from phased_dmd_mp.ops import fused_subinterval_loss

REFERENCE = {"velocity": subinterval_flow_loss, "x0": subinterval_x0_loss}


def _inputs(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pred, x_s, eps = (torch.randn(shape, generator=generator, dtype=dtype) for _ in range(3))
    batch = shape[0]
    s = torch.full((batch,), 0.625)
    t = s + (1 - s) * torch.rand(batch, generator=generator)
    t[0] = s[0]  # the clamp's corner: sigma_{t|s} = 0
    return pred, x_s, eps, t, s


@pytest.mark.parametrize("prediction", ["velocity", "x0"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape", [(7,), (7, 33), (4, 3, 5, 6)])
def test_fused_matches_reference_value_and_gradient(prediction, dtype, tol, shape):
    pred, x_s, eps, t, s = _inputs(shape, dtype)
    pred_ref = pred.clone().requires_grad_(True)
    pred_fused = pred.clone().requires_grad_(True)
    reference = REFERENCE[prediction](pred_ref, x_s, eps, t, s, reduction="none")
    fused = fused_subinterval_loss(
        pred_fused, x_s, eps, t, s, prediction=prediction, reduction="none"
    )
    torch.testing.assert_close(fused, reference.to(dtype), rtol=tol, atol=tol)
    weights = torch.rand(shape[0], dtype=dtype)  # non-uniform upstream gradient
    (grad_ref,) = torch.autograd.grad((reference * weights).sum(), pred_ref)
    (grad_fused,) = torch.autograd.grad((fused * weights).sum(), pred_fused)
    torch.testing.assert_close(grad_fused, grad_ref, rtol=tol, atol=tol)


def test_fused_gradcheck_and_scalar_timesteps():
    pred, x_s, eps, _, _ = _inputs((3, 4), torch.float64)
    pred.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda p: fused_subinterval_loss(p, x_s, eps, 0.9, 0.5, reduction="none"), (pred,)
    )
    torch.testing.assert_close(
        fused_subinterval_loss(pred, x_s, eps, 0.9, 0.5),
        subinterval_flow_loss(pred, x_s, eps, 0.9, 0.5),
    )


def test_fused_accepts_non_contiguous_inputs():
    pred, x_s, eps, t, s = _inputs((6, 8), torch.float32)
    strided = [x.t().contiguous().t() for x in (pred, x_s, eps)]  # same values, transposed strides
    assert not any(x.is_contiguous() for x in strided)
    torch.testing.assert_close(
        fused_subinterval_loss(*strided, t, s), subinterval_flow_loss(pred, x_s, eps, t, s)
    )


def test_fused_rejects_bad_inputs():
    pred, x_s, eps, t, s = _inputs((4, 3), torch.float32)
    with pytest.raises(TypeError, match="float32/float64"):
        fused_subinterval_loss(pred.bfloat16(), x_s, eps, t, s)
    with pytest.raises(ValueError, match="one \\(B, ...\\) shape"):
        fused_subinterval_loss(pred, x_s[:, :2], eps, t, s)
    with pytest.raises(ValueError, match="t and s"):
        fused_subinterval_loss(pred, x_s, eps, t[:2], s[:2])

"""Fused ops: autograd wrappers around phased_dmd_mp._C, interchangeable with phased_dmd_mp.losses."""

from phased_dmd_mp.ops.subinterval_loss import fused_subinterval_loss

__all__ = ["fused_subinterval_loss"]

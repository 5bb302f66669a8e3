"""Which implementation the losses use: fused kernels (phased_dmd_mp._C) or the pure-torch reference.

    auto       fused kernels where they support the inputs (CPU or CUDA; float32, float64,
               bfloat16, float16), the reference elsewhere (the default)
    fused      fused kernels or a clear error saying why they cannot run
    reference  always the pure-torch reference (the test oracle)

Set it per call (`backend=` on the loss functions), per block (`with use_kernel_backend(...)`),
process-wide (`set_kernel_backend`) or from the environment (PHASED_DMD_KERNELS).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Literal, get_args

import torch
from torch import Tensor

Backend = Literal["auto", "fused", "reference"]
BACKENDS: tuple[str, ...] = get_args(Backend)
FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ABI_VERSION = 2  # csrc/bindings.cpp's abi_version, which this Python code calls


def _checked(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    return name  # type: ignore[return-value]


_default: Backend = _checked(os.environ.get("PHASED_DMD_KERNELS", "auto"))


def set_kernel_backend(name: Backend) -> None:
    global _default
    _default = _checked(name)


def kernel_backend() -> Backend:
    return _default


@contextlib.contextmanager
def use_kernel_backend(name: Backend) -> Iterator[None]:
    global _default
    previous, _default = _default, _checked(name)
    try:
        yield
    finally:
        _default = previous


def extension():
    """phased_dmd_mp._C, or None if it was not built."""
    try:
        from phased_dmd_mp import _C
    except ImportError:
        return None
    return _C


def unsupported_reason(data: tuple[Tensor, ...], constants: tuple[Tensor, ...] = ()) -> str | None:
    """Why the fused kernels cannot take these inputs, or None if they can.

    `data` are the element-wise inputs (one dtype, one device); `constants` are those among them
    the fused ops do not differentiate (they must not require grad).
    """
    ext = extension()
    if ext is None:
        return "phased_dmd_mp._C is not built (install the package with `pip install -e .`)"
    if getattr(ext, "abi_version", 1) != ABI_VERSION:
        return (
            f"phased_dmd_mp._C is a stale build (kernel ABI {getattr(ext, 'abi_version', 1)}, "
            f"this code needs {ABI_VERSION}): rebuild it with `pip install -e .` or "
            "`python setup.py build_ext --inplace`"
        )
    device, dtype = data[0].device, data[0].dtype
    if any(x.device != device for x in data):
        return f"inputs are on several devices: {sorted({str(x.device) for x in data})}"
    if any(x.dtype != dtype for x in data):
        return f"inputs have several dtypes: {sorted({str(x.dtype) for x in data})}"
    if dtype not in FUSED_DTYPES:
        return f"dtype {dtype} is not one of {[str(d) for d in FUSED_DTYPES]}"
    if device.type == "cuda" and not ext.built_with_cuda:
        return "phased_dmd_mp._C was built without CUDA (no nvcc at build time)"
    if device.type not in ("cpu", "cuda"):
        return f"device type {device.type!r} has no fused kernels"
    if any(x.requires_grad for x in constants):
        return "an input the fused op treats as constant requires grad"
    return None


_warned_missing_extension = False


def use_fused(
    backend: Backend | None, data: tuple[Tensor, ...], constants: tuple[Tensor, ...] = ()
) -> bool:
    """Resolve `backend` (None: the process default) for these inputs."""
    global _warned_missing_extension
    backend = _checked(backend or _default)
    if backend == "reference":
        return False
    reason = unsupported_reason(data, constants)
    if reason is None:
        return True
    if backend == "fused":
        raise RuntimeError(f"fused kernels cannot run these inputs: {reason}")
    if reason.startswith("phased_dmd_mp._C") and not _warned_missing_extension:
        _warned_missing_extension = True
        warnings.warn(f"{reason}; using the pure-torch reference losses", stacklevel=3)
    return False

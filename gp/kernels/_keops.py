"""``K(X, Z) @ V`` with KeOps symbolic (lazy) tensors, for RBF and Matérn kernels.

KeOps compiles the reduction ``sum_j k(x_i, z_j) V_j`` into one GPU kernel that never
stores a block of kernel entries, and differentiates it symbolically. ``pykeops`` is an
optional dependency: it is imported only when this backend is called, never at import time.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._fastpath import Stationary

__all__ = ["INSTALL_HINT", "keops_matvec"]

INSTALL_HINT = (
    "install it with `pip install pykeops` (KeOps compiles its kernels at first use and "
    "needs a C++ compiler, plus the CUDA toolkit for GPU tensors)"
)


def _lazy_tensor_class() -> type:
    try:
        from pykeops.torch import LazyTensor
    except ImportError as err:
        raise ImportError(
            "kernel_matvec(..., backend='keops') needs the optional package pykeops, which "
            f"could not be imported ({err}); {INSTALL_HINT}, or use backend='torch'"
        ) from err
    return LazyTensor


def keops_matvec(spec: Stationary, X: Tensor, Z: Tensor, V: Tensor) -> Tensor:
    """``K(X, Z) @ V`` for a supported stationary kernel, reduced by KeOps.

    Parameters
    ----------
    spec : Stationary
        The kernel, from :func:`gp.kernels._fastpath.stationary_spec`.
    X : Tensor, shape (..., n, d)
    Z : Tensor, shape (..., m, d)
    V : Tensor, shape (..., m, k)

    Returns
    -------
    Tensor, shape (*batch, n, k)
        ``batch`` is the broadcast of the batch shapes of the inputs and the kernel.
    """
    LazyTensor = _lazy_tensor_class()
    center = Z.mean(dim=-2, keepdim=True).detach()
    scale = spec.lengthscale.reciprocal()
    if spec.family == "matern":
        scale = scale * math.sqrt(2.0 * spec.nu)
    Xs, Zs = (X - center) * scale, (Z - center) * scale
    Vs = V if spec.outputscale is None else V * spec.outputscale[..., None, None]
    batch = torch.broadcast_shapes(Xs.shape[:-2], Zs.shape[:-2], Vs.shape[:-2])
    # KeOps wants every operand with the same number of (contiguous) batch dimensions
    Xs = Xs.expand(*batch, *Xs.shape[-2:]).contiguous()
    Zs = Zs.expand(*batch, *Zs.shape[-2:]).contiguous()
    Vs = Vs.expand(*batch, *Vs.shape[-2:]).contiguous()
    x_i = LazyTensor(Xs.unsqueeze(-2))  # (*batch, n, 1, d)
    z_j = LazyTensor(Zs.unsqueeze(-3))  # (*batch, 1, m, d)
    v_j = LazyTensor(Vs.unsqueeze(-3))  # (*batch, 1, m, k)
    sq = ((x_i - z_j) ** 2).sum(-1)
    if spec.family == "rbf":
        k_ij = (-0.5 * sq).exp()
    else:  # s = sqrt(2 nu) |x - z| / lengthscale; k = p(s) exp(-s)
        s = sq.sqrt()
        k_ij = (-s).exp()
        if spec.nu == 1.5:
            k_ij = (1.0 + s) * k_ij
        elif spec.nu == 2.5:
            k_ij = (1.0 + s + sq / 3.0) * k_ij
    return (k_ij * v_j).sum(dim=len(batch) + 1)

"""Exact discretisation of a stationary LTI SDE on an irregular time grid."""

from __future__ import annotations

import torch
from torch import Tensor

from .sde import LTISDE

__all__ = ["discretise"]


def discretise(sde: LTISDE, dt: Tensor) -> tuple[Tensor, Tensor]:
    """Transition matrices and process-noise covariances for steps ``dt``.

    For a step ``Delta >= 0`` the exact discrete-time model is
    ``x(t + Delta) = A x(t) + q``, ``q ~ N(0, Q)``, with

    .. math::

        A = e^{F \\Delta}, \\qquad Q = P_\\infty - A P_\\infty A^\\top

    (the stationary shortcut: no integral is needed because the process starts at ``Pinf``).
    All matrix exponentials are computed in one batched ``torch.linalg.matrix_exp`` over the
    distinct step lengths. ``Delta = 0`` gives ``A = I`` and ``Q = 0`` exactly (repeated
    timestamps); ``Q`` is symmetrised. When ``dt`` requires grad every step keeps its own
    (differentiable) matrix exponential, so derivatives in the times exist at ``Delta = 0``
    too.

    Parameters
    ----------
    sde : LTISDE
        State dimension ``d``.
    dt : Tensor, shape (k,)
        Non-negative, finite step lengths.

    Returns
    -------
    A : Tensor, shape (k, d, d)
    Q : Tensor, shape (k, d, d)

    Notes
    -----
    In float32, ``Q`` for steps much shorter than the kernel's lengthscale suffers from
    cancellation (``Pinf - A Pinf A^T`` of two nearly equal matrices); use float64 for such
    grids.
    """
    if dt.dim() != 1:
        raise ValueError(f"dt must have shape (k,), got {tuple(dt.shape)}")
    dt = dt.to(dtype=sde.dtype, device=sde.device)
    d = sde.state_dim
    if dt.numel() == 0:
        empty = sde.F.new_zeros(0, d, d)
        return empty, empty
    differentiable = torch.is_grad_enabled() and dt.requires_grad
    if differentiable:  # torch.unique has no derivative
        unique, inverse = dt, torch.arange(dt.shape[0], device=dt.device)
    else:
        unique, inverse = torch.unique(dt, return_inverse=True)
    A_unique = torch.linalg.matrix_exp(unique[:, None, None] * sde.F)  # (u, d, d)
    Q_unique = sde.Pinf - A_unique @ sde.Pinf @ A_unique.mT
    Q_unique = 0.5 * (Q_unique + Q_unique.mT)
    zero = unique == 0
    # exact identity / zero for repeated timestamps (expm(0) = I already; the mask would cut
    # the derivative in dt at 0, so steps that require grad keep the general formula)
    if not differentiable and bool(zero.any()):
        eye = torch.eye(d, dtype=sde.dtype, device=sde.device)
        A_unique = torch.where(zero[:, None, None], eye, A_unique)
        Q_unique = torch.where(zero[:, None, None], torch.zeros_like(Q_unique), Q_unique)
    return A_unique[inverse], Q_unique[inverse]

"""Exact discretisation of a stationary LTI SDE on an irregular time grid."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .sde import LTISDE

__all__ = ["discretise"]


#: Steps with ``nu Delta`` up to this (``nu = ||F||_1 + ||F||_inf``) get ``Q`` from its Taylor
#: series; longer steps use the stationary form (see :func:`discretise`).
SERIES_MAX_STEP = 2.0


def discretise(sde: LTISDE, dt: Tensor) -> tuple[Tensor, Tensor]:
    """Transition matrices and process-noise covariances for steps ``dt``.

    For a step ``Delta >= 0`` the exact discrete-time model is
    ``x(t + Delta) = A x(t) + q``, ``q ~ N(0, Q)``, with ``A = e^{F Delta}`` and

    .. math::

        Q = \\int_0^\\Delta e^{F s} G e^{F^\\top s}\\, ds = P_\\infty - A P_\\infty A^\\top,
        \\qquad G = L Q_c L^\\top .

    The stationary form on the right subtracts two nearly equal matrices when the step is
    short (``Q = O(Delta)`` while ``Pinf = O(1)``): its absolute error ``eps ||Pinf||`` is a
    large relative error in ``Q`` (visible in float32 posteriors), and ``Q`` can come out
    indefinite. Short steps, ``nu Delta <= 2`` with
    ``nu = ||F||_1 + ||F||_inf``, therefore integrate the Taylor series of the integrand term
    by term (its ``k``-th derivative at ``s = 0`` is the ``k``-fold Lyapunov operator of
    ``G``):

    .. math::

        Q = \\sum_{k \\ge 0} \\frac{\\Delta^{k+1}}{(k+1)!} C_k, \\qquad C_0 = G, \\quad
        C_{k+1} = F C_k + C_k F^\\top,

    a sum without cancellation at leading order. With ``||C_k||_1 <= nu^k ||G||_1`` the tail
    after ``K`` terms is at most ``Delta ||G||_1 (nu Delta)^K e^{nu Delta} / (K + 1)!``; ``K``
    is the smallest number of terms that makes this ``<= eps ||G||_1 Delta / 4`` at
    ``nu Delta = 2``. The ``C_k`` do not depend on ``Delta``, so the series costs
    ``O(K d^3)`` once plus ``O(K d^2)`` per distinct step. Longer steps keep the stationary
    form, where ``A Pinf A^T`` is no longer close to ``Pinf``. :func:`gp.statespace.matern_sde`
    builds the Matérn kernels in balanced coordinates (entries ``O(lam)`` and ``O(s^2)``),
    which keeps ``expm`` accurate for lengthscales from far below to far above the steps.

    The matrix exponentials are computed by one batched ``torch.linalg.matrix_exp`` over the
    distinct step lengths per independent block (``sde.blocks``: the components of a sum),
    so that a fast component does not cost a slow one its accuracy through a shared
    scaling-and-squaring. ``Delta = 0`` gives ``A = I`` and ``Q = 0`` exactly (repeated
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
    A_unique, Q_unique = _blockwise(sde, unique)
    zero = unique == 0
    # exact identity / zero for repeated timestamps (expm(0) = I already; the mask would cut
    # the derivative in dt at 0, so steps that require grad keep the general formula)
    if not differentiable and bool(zero.any()):
        eye = torch.eye(d, dtype=sde.dtype, device=sde.device)
        A_unique = torch.where(zero[:, None, None], eye, A_unique)
        Q_unique = torch.where(zero[:, None, None], torch.zeros_like(Q_unique), Q_unique)
    return A_unique[inverse], Q_unique[inverse]


def series_terms(dtype: torch.dtype, max_step: float = SERIES_MAX_STEP) -> int:
    """Number ``K`` of Taylor terms of ``Q`` for ``nu Delta <= max_step`` in ``dtype``.

    The smallest ``K`` with ``x^K e^x / (K + 1)! <= eps / 4`` at ``x = max_step``.
    """
    eps = torch.finfo(dtype).eps
    K, term = 1, max_step / 2.0  # x^K / (K + 1)! at K = 1
    while term * math.exp(max_step) > eps / 4:
        K += 1
        term *= max_step / (K + 1)
    return K


def _blockwise(sde: LTISDE, dt: Tensor) -> tuple[Tensor, Tensor]:
    """``A`` and ``Q`` (u, d, d) for steps ``dt`` (u,), one independent block at a time."""
    G = sde.L @ sde.Qc @ sde.L.mT
    G = 0.5 * (G + G.mT)
    if len(sde.block_sizes) == 1:
        return _discretise_block(sde.F, G, sde.Pinf, dt)
    d = sde.state_dim
    A = sde.F.new_zeros(dt.shape[0], d, d)
    Q = sde.F.new_zeros(dt.shape[0], d, d)
    start = 0
    for size in sde.block_sizes:
        b = slice(start, start + size)
        A[:, b, b], Q[:, b, b] = _discretise_block(sde.F[b, b], G[b, b], sde.Pinf[b, b], dt)
        start += size
    return A, Q


def _discretise_block(F: Tensor, G: Tensor, Pinf: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
    """``A = expm(F dt)`` and ``Q`` of one block: Taylor series or stationary form.

    The series runs on ``C_k / nu^k`` with weights ``(nu h)^(k+1) / (k+1)! / nu`` (both
    bounded: no overflow for any ``nu``).
    """
    A = torch.linalg.matrix_exp(dt[:, None, None] * F)
    nu = float(F.detach().abs().sum(-2).max() + F.detach().abs().sum(-1).max())
    nu = nu if nu > 0 else 1.0  # F = 0: only the k = 0 term survives, any scale works
    short = dt.detach() * nu <= SERIES_MAX_STEP
    Q = Pinf - A @ Pinf @ A.mT  # stationary form (used for the long steps)
    if bool(short.any()):
        C = [G]
        Fs = F / nu
        for _ in range(series_terms(F.dtype) - 1):
            C.append(Fs @ C[-1] + C[-1] @ Fs.mT)
        j = torch.arange(1, len(C) + 1, dtype=dt.dtype, device=dt.device)
        x = torch.where(short, dt * nu, torch.zeros_like(dt))  # long steps: any finite value
        weights = torch.cumprod(x[:, None] / j, dim=-1) / nu  # x^(k+1) / (k+1)! / nu
        series = torch.einsum("uk,kij->uij", weights, torch.stack(C))
        Q = torch.where(short[:, None, None], series, Q)
    return A, 0.5 * (Q + Q.mT)

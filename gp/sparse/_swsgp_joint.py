"""Joint predictive of the sparse-within-sparse GP (:meth:`gp.sparse.swsgp.SWSGP.posterior`
with ``joint=True``): the correlations of the joint over the union of the points' neighbour
sets, scaled to the points' own marginal variances."""

from __future__ import annotations

from collections.abc import Callable

import torch
from gpytorch.kernels import Kernel
from torch import Tensor

from gp.sparse._swsgp_checks import dense
from gp.sparse._swsgp_local import fast_cholesky

__all__ = ["rescale_to_variances", "union_covariances", "union_joint"]


def union_joint(
    kernel: Kernel,
    X: Tensor,
    Z: Tensor,
    idx: Tensor,
    q: tuple[Tensor, Tensor, Tensor],
    jitter: float,
) -> tuple[Tensor, Tensor]:
    """Mean and covariance of ``f(X)`` under ``q(u_U)`` and the prior's ``p(f(X) | u_U)``.

    With ``U`` the union of the neighbour sets ``idx`` of all rows of ``X`` (per GP)::

        mean = A m_U,  cov = K_XX - K_XU K_UU^-1 K_UX + A S_UU A^T,  A = K_XU K_UU^-1

    (``K_UU`` with the jitter). A batch of GPs pads the unions to the largest one (padding
    slots decouple exactly: unit prior block, zero cross-covariance and zero ``q``).

    Parameters
    ----------
    kernel : gpytorch Kernel
    X : Tensor, shape (*batch, n, d)
    Z : Tensor, shape (*batch, M, d)
    idx : Tensor (long), shape (*batch, n, H)
        Neighbour indices of the rows of ``X`` into ``Z``.
    q : tuple of Tensor
        ``m`` (*batch, M), ``s`` (*batch, M) and ``W`` (*batch, M, r) of
        ``q(u) = N(m, diag(s) + W W^T)``.
    jitter : float

    Returns
    -------
    mean : Tensor, shape (*batch, n)
    cov : Tensor, shape (*batch, n, n)
    """
    m, s, W = q
    M = Z.shape[-2]
    in_union = torch.zeros(*idx.shape[:-2], M, dtype=torch.bool, device=Z.device)
    in_union.scatter_(-1, idx.flatten(-2), True)
    size = in_union.sum(-1)  # |U| per GP
    # U's indices first (ascending), then the other indices as padding up to max |U|.
    order = torch.argsort((~in_union).to(torch.int8), dim=-1, stable=True)
    order = order[..., : int(size.max())]
    valid = torch.arange(order.shape[-1], device=Z.device) < size.unsqueeze(-1)
    both = valid.unsqueeze(-1) & valid.unsqueeze(-2)
    eye = torch.eye(order.shape[-1], dtype=Z.dtype, device=Z.device)
    Z_U = Z.gather(-2, order.unsqueeze(-1).expand(*order.shape, Z.shape[-1]))
    K_UU = torch.where(both, dense(kernel(Z_U, Z_U)) + jitter * eye, eye)
    K_XU = dense(kernel(X, Z_U)) * valid.unsqueeze(-2)
    K_XX = dense(kernel(X, X))
    m_U = m.gather(-1, order) * valid
    s_U = s.gather(-1, order) * valid
    W_U = W.gather(-2, order.unsqueeze(-1).expand(*order.shape, W.shape[-1]))
    W_U = W_U * valid.unsqueeze(-1)
    L = fast_cholesky(K_UU)
    V = torch.linalg.solve_triangular(L, K_XU.mT, upper=False)  # L^-1 K_UX
    A = torch.linalg.solve_triangular(L.mT, V, upper=True).mT  # K_XU K_UU^-1
    AW = A @ W_U
    cov = K_XX - V.mT @ V + (A * s_U.unsqueeze(-2)) @ A.mT + AW @ AW.mT
    mean = (A @ m_U.unsqueeze(-1)).squeeze(-1)
    return mean, 0.5 * (cov + cov.mT)


def union_covariances(
    kernel: Kernel,
    X: Tensor,
    Z: Tensor,
    neighbors: Callable[[Tensor], Tensor],
    q: tuple[Tensor, Tensor, Tensor],
    jitter: float,
) -> Tensor:
    """The covariance of :func:`union_joint` for every element ``X[e]`` of a batch.

    Parameters
    ----------
    X : Tensor, shape (E, *batch, n, d)
        One union (per GP) for each ``e``.
    neighbors : callable
        Neighbour indices ``(*batch, n, H)`` into ``Z`` of the rows of ``X[e]``.
    kernel, Z, q, jitter
        As in :func:`union_joint`.

    Returns
    -------
    Tensor, shape (E, *batch, n, n)
    """
    return torch.stack([union_joint(kernel, x, Z, neighbors(x), q, jitter)[1] for x in X])


def rescale_to_variances(cov: Tensor, variance: Tensor) -> Tensor:
    """``D^{1/2} R D^{1/2}``: the correlation matrix ``R`` of ``cov`` with variances ``D``.

    Parameters
    ----------
    cov : Tensor, shape (..., n, n)
        A positive semi-definite covariance (its correlations are kept).
    variance : Tensor, shape (..., n)
        Non-negative variances of the result (its diagonal).

    Returns
    -------
    Tensor, shape (..., n, n)
        ``cov_ij * sqrt(variance_i / cov_ii) * sqrt(variance_j / cov_jj)``: positive
        semi-definite (a congruence of ``cov`` by a diagonal matrix), equal to ``cov`` when
        ``variance`` is its diagonal.
    """
    tiny = torch.finfo(cov.dtype).tiny
    diag = cov.diagonal(dim1=-2, dim2=-1).clamp_min(tiny)
    scale = (variance / diag).clamp_min(tiny).sqrt()
    return cov * scale.unsqueeze(-1) * scale.unsqueeze(-2)

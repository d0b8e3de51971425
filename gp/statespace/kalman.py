"""Sequential Kalman filter and Rauch–Tung–Striebel smoother for a scalar-output SSM.

Model (``k = 0, ..., n-1``, steps between consecutive points given by ``A_k``, ``Q_k``)::

    x_0 ~ N(0, Pinf),   x_{k+1} = A_k x_k + q_k,  q_k ~ N(0, Q_k),
    y_k = H x_k + r_k,  r_k ~ N(0, R_k)          (y_k = NaN: not observed)

Exact, O(n d^3), one Python iteration per time point (the parallel scan comes later). Every
operation is a differentiable torch op, so the log marginal likelihood can be back-propagated
to the kernel hyperparameters and the noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FilterResult", "kalman_filter", "rts_smoother"]

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class FilterResult:
    """Output of :func:`kalman_filter`.

    Attributes
    ----------
    mean, cov : Tensor, shapes (n, d) and (n, d, d)
        Filtering moments of ``p(x_k | y_{0:k})``.
    pred_mean, pred_cov : Tensor, shapes (n, d) and (n, d, d)
        Predictive moments of ``p(x_k | y_{0:k-1})`` (``0`` and ``Pinf`` at ``k = 0``).
    log_likelihood : Tensor, shape ()
        ``log p(y_obs) = sum_k log N(y_k; H m_k^-, H P_k^- H^T + R_k)`` over observed points.
    """

    mean: Tensor
    cov: Tensor
    pred_mean: Tensor
    pred_cov: Tensor
    log_likelihood: Tensor


def _check_model(A: Tensor, Q: Tensor, H: Tensor, Pinf: Tensor, n: int) -> None:
    d = Pinf.shape[-1]
    if Pinf.shape != (d, d):
        raise ValueError(f"Pinf must have shape (d, d), got {tuple(Pinf.shape)}")
    if H.shape not in ((1, d), (d,)):
        raise ValueError(f"H must have shape (1, {d}), got {tuple(H.shape)}")
    for name, M in (("A", A), ("Q", Q)):
        if M.shape != (max(n - 1, 0), d, d):
            raise ValueError(
                f"{name} must have shape (n - 1, d, d) = {(max(n - 1, 0), d, d)}, "
                f"got {tuple(M.shape)}"
            )


def _noise_vector(noise: Tensor, n: int) -> Tensor:
    """Observation-noise variances as an (n,) view of a scalar or (n,) tensor."""
    if noise.numel() not in (1, n):
        raise ValueError(f"noise must have shape () or ({n},), got {tuple(noise.shape)}")
    return noise.reshape(-1).expand(n) if noise.numel() == 1 else noise.reshape(n)


def _filter_inputs(
    A: Tensor, Q: Tensor, H: Tensor, Pinf: Tensor, y: Tensor, noise: Tensor
) -> tuple[int, int, Tensor, Tensor]:
    """Validate a filter's inputs; return ``n``, state size ``d``, ``h`` (d,) and noise (n,)."""
    n = y.shape[0]
    if y.dim() != 1 or n == 0:
        raise ValueError(f"y must have shape (n,) with n >= 1, got {tuple(y.shape)}")
    _check_model(A, Q, H, Pinf, n)
    d = Pinf.shape[-1]
    return n, d, H.reshape(d), _noise_vector(noise, n)


def kalman_filter(
    A: Tensor,
    Q: Tensor,
    H: Tensor,
    Pinf: Tensor,
    y: Tensor,
    noise: Tensor,
    zero_step: Tensor | None = None,
) -> FilterResult:
    """Kalman filter with the exact Gaussian log marginal likelihood.

    For each ``k``: predict ``m^- = A m``, ``P^- = A P A^T + Q`` (skipped at ``k = 0``, where the
    prior is ``N(0, Pinf)``); then, if ``y_k`` is observed, update with ``S = H P^- H^T + R``,
    ``v = y_k - H m^-``, ``K = P^- H^T / S``, ``m = m^- + K v`` and the Joseph form
    ``P = (I - K H) P^- (I - K H)^T + K R K^T``, and add ``log N(v; 0, S)`` to the
    log-likelihood. Missing ``y_k`` (NaN) skip the update.

    Parameters
    ----------
    A, Q : Tensor, shape (n - 1, d, d)
        Transition and process-noise matrices from point ``k`` to ``k + 1``.
    H : Tensor, shape (1, d)
        Measurement row.
    Pinf : Tensor, shape (d, d)
        Prior (stationary) covariance of the first state.
    y : Tensor, shape (n,)
        Observations in time order; NaN marks a missing value.
    noise : Tensor, shape () or (n,)
        Observation-noise variance ``R_k > 0``.
    zero_step : Tensor (bool), shape (n - 1,), optional
        Steps known to have ``A = I`` and ``Q = 0`` (repeated timestamps); their predict step
        is skipped (it would be the identity).

    Returns
    -------
    FilterResult
    """
    n, d, h, R = _filter_inputs(A, Q, H, Pinf, y, noise)
    eye = torch.eye(d, dtype=Pinf.dtype, device=Pinf.device)
    observed = (~torch.isnan(y)).tolist()  # one host sync, not one per step
    skip = [False] * max(n - 1, 0) if zero_step is None else zero_step.tolist()
    A_k, Q_k, y_k, R_k = A.unbind(0), Q.unbind(0), y.unbind(0), R.unbind(0)

    m, P = Pinf.new_zeros(d), Pinf
    means, covs, pred_means, pred_covs, resid, var = [], [], [], [], [], []
    for k in range(n):
        if k > 0 and not skip[k - 1]:
            Ak = A_k[k - 1]
            m = Ak @ m
            P = Ak @ P @ Ak.mT + Q_k[k - 1]
            P = 0.5 * (P + P.mT)
        pred_means.append(m)
        pred_covs.append(P)
        if observed[k]:
            Ph = P @ h
            S = h @ Ph + R_k[k]
            v = y_k[k] - h @ m
            K = Ph / S
            m = m + K * v
            IKH = eye - torch.outer(K, h)
            P = IKH @ P @ IKH.mT + R_k[k] * torch.outer(K, K)
            resid.append(v)
            var.append(S)
        means.append(m)
        covs.append(P)
    if resid:
        v, S = torch.stack(resid), torch.stack(var)
        log_lik = -0.5 * (v.pow(2) / S + S.log() + _LOG_2PI).sum()
    else:  # nothing observed: log p(empty) = 0, kept on the graph of the parameters
        log_lik = 0.0 * (R.sum() + Pinf.sum())
    return FilterResult(
        mean=torch.stack(means),
        cov=torch.stack(covs),
        pred_mean=torch.stack(pred_means),
        pred_cov=torch.stack(pred_covs),
        log_likelihood=log_lik,
    )


def rts_smoother(
    A: Tensor, filtered: FilterResult, zero_step: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Rauch–Tung–Striebel smoother: moments of ``p(x_k | y_{0:n-1})``.

    Backwards from ``k = n - 2``: ``G = P_k A_k^T (P_{k+1}^-)^{-1}`` (by a linear solve),
    ``m^s_k = m_k + G (m^s_{k+1} - m^-_{k+1})``, ``P^s_k = P_k + G (P^s_{k+1} - P^-_{k+1}) G^T``.
    Zero-length steps (same state twice) copy the later smoothed moments.

    Parameters
    ----------
    A : Tensor, shape (n - 1, d, d)
        Transition matrices used by the filter.
    filtered : FilterResult
        Output of :func:`kalman_filter` on the same model.
    zero_step : Tensor (bool), shape (n - 1,), optional
        Steps with ``A = I``, ``Q = 0``.

    Returns
    -------
    mean : Tensor, shape (n, d)
    cov : Tensor, shape (n, d, d)
    """
    n = filtered.mean.shape[0]
    if A.shape[0] != max(n - 1, 0):
        raise ValueError(f"A must have {n - 1} transition matrices, got {A.shape[0]}")
    skip = [False] * max(n - 1, 0) if zero_step is None else zero_step.tolist()
    m_f, P_f = filtered.mean.unbind(0), filtered.cov.unbind(0)
    m_p, P_p = filtered.pred_mean.unbind(0), filtered.pred_cov.unbind(0)
    A_k = A.unbind(0)
    ms, Ps = [m_f[-1]], [P_f[-1]]
    m_next, P_next = m_f[-1], P_f[-1]
    for k in range(n - 2, -1, -1):
        if not skip[k]:
            G = torch.linalg.solve(P_p[k + 1], A_k[k] @ P_f[k]).mT
            m_next = m_f[k] + G @ (m_next - m_p[k + 1])
            P_next = P_f[k] + G @ (P_next - P_p[k + 1]) @ G.mT
            P_next = 0.5 * (P_next + P_next.mT)
        ms.append(m_next)
        Ps.append(P_next)
    return torch.stack(ms[::-1]), torch.stack(Ps[::-1])

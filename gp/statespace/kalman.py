"""Sequential Kalman filter and Rauch–Tung–Striebel smoother for a scalar-output SSM.

Model (``k = 0, ..., n-1``, steps between consecutive points given by ``A_k``, ``Q_k``)::

    x_0 ~ N(0, Pinf),   x_{k+1} = A_k x_k + q_k,  q_k ~ N(0, Q_k),
    y_k = H x_k + r_k,  r_k ~ N(0, R_k)          (y_k = NaN: not observed)

Exact, O(n d^3), one Python iteration per time point (the parallel scan is in
:mod:`.parallel`). A batch of independent series (leading dimensions ``...`` on ``y`` and,
for per-series grids, on ``A``, ``Q``) is processed in the same loop, vectorised over the
batch. Every operation is a differentiable torch op, so the log marginal likelihood can be
back-propagated to the kernel hyperparameters and the noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FilterResult", "kalman_filter", "rts_smoother", "smoother_gain"]

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class FilterResult:
    """Output of :func:`kalman_filter` (``...`` = batch shape of the series).

    Attributes
    ----------
    mean, cov : Tensor, shapes (..., n, d) and (..., n, d, d)
        Filtering moments of ``p(x_k | y_{0:k})``.
    pred_mean, pred_cov : Tensor, shapes (..., n, d) and (..., n, d, d)
        Predictive moments of ``p(x_k | y_{0:k-1})`` (``0`` and ``Pinf`` at ``k = 0``).
    log_likelihood : Tensor, shape (...)
        ``log p(y_obs) = sum_k log N(y_k; H m_k^-, H P_k^- H^T + R_k)`` over observed points,
        one value per series.
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
        if M.dim() < 3 or M.shape[-3:] != (max(n - 1, 0), d, d):
            raise ValueError(
                f"{name} must have shape (..., n - 1, d, d) with (n - 1, d, d) = "
                f"{(max(n - 1, 0), d, d)}, got {tuple(M.shape)}"
            )


def _noise_vector(noise: Tensor, y: Tensor) -> Tensor:
    """Observation-noise variances broadcast to the shape (..., n) of ``y``."""
    if noise.numel() == 1:
        return noise.reshape(()).expand(y.shape)
    try:
        return noise.expand(y.shape)
    except RuntimeError as err:
        raise ValueError(
            f"noise must have shape () or one broadcastable to y's {tuple(y.shape)}, "
            f"got {tuple(noise.shape)}"
        ) from err


def _filter_inputs(
    A: Tensor, Q: Tensor, H: Tensor, Pinf: Tensor, y: Tensor, noise: Tensor
) -> tuple[int, int, Tensor, Tensor]:
    """Validate a filter's inputs; return ``n``, state size ``d``, ``h`` (d,), noise (..., n)."""
    if y.dim() == 0 or y.shape[-1] == 0:
        raise ValueError(f"y must have shape (..., n) with n >= 1, got {tuple(y.shape)}")
    n = y.shape[-1]
    _check_model(A, Q, H, Pinf, n)
    try:
        torch.broadcast_shapes(y.shape[:-1], A.shape[:-3], Q.shape[:-3])
    except RuntimeError as err:
        raise ValueError(
            f"batch shapes of y {tuple(y.shape[:-1])}, A {tuple(A.shape[:-3])} and "
            f"Q {tuple(Q.shape[:-3])} must broadcast"
        ) from err
    d = Pinf.shape[-1]
    return n, d, H.reshape(d), _noise_vector(noise, y)


def _step_masks(zero_step: Tensor | None, n: int) -> tuple[list[bool], tuple[Tensor, ...] | None]:
    """Which steps every series skips (host list), and per-step masks when they differ."""
    if zero_step is None or n <= 1:
        return [False] * max(n - 1, 0), None
    if zero_step.dim() <= 1:
        return zero_step.reshape(-1).tolist(), None
    skip_all = zero_step.reshape(-1, n - 1).all(0).tolist()
    return skip_all, zero_step.unbind(-1)


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
    log-likelihood. Missing ``y_k`` (NaN) skip the update (a zero gain, per series).

    Parameters
    ----------
    A, Q : Tensor, shape (n - 1, d, d) or (..., n - 1, d, d)
        Transition and process-noise matrices from point ``k`` to ``k + 1``; shared by all
        series or one set per series.
    H : Tensor, shape (1, d)
        Measurement row.
    Pinf : Tensor, shape (d, d)
        Prior (stationary) covariance of the first state.
    y : Tensor, shape (n,) or (..., n)
        Observations in time order, one row per series; NaN marks a missing value.
    noise : Tensor, shape () or broadcastable to (..., n)
        Observation-noise variance ``R_k > 0``.
    zero_step : Tensor (bool), shape (n - 1,) or (..., n - 1), optional
        Steps known to have ``A = I`` and ``Q = 0`` (repeated timestamps); their predict step
        is skipped (it would be the identity).

    Returns
    -------
    FilterResult
        Moments of shape (..., n, d) / (..., n, d, d); ``log_likelihood`` of shape (...).
    """
    n, d, h, R = _filter_inputs(A, Q, H, Pinf, y, noise)
    batch = torch.broadcast_shapes(y.shape[:-1], A.shape[:-3], Q.shape[:-3])
    batched = len(batch) > 0
    eye = torch.eye(d, dtype=Pinf.dtype, device=Pinf.device)
    obs = ~torch.isnan(y)
    flat = obs.reshape(-1, n)
    any_obs, all_obs = flat.any(0).tolist(), flat.all(0).tolist()  # host syncs once, not per step
    skip, per_series = _step_masks(zero_step, n)
    obs_f = obs.to(Pinf.dtype).unbind(-1)
    y_k = torch.where(obs, y, torch.zeros_like(y)).unbind(-1)  # no NaN on the graph
    A_k, Q_k, R_k = A.unbind(-3), Q.unbind(-3), R.unbind(-1)

    m, P = Pinf.new_zeros(*batch, d), (Pinf.expand(*batch, d, d) if batched else Pinf)
    means, covs, pred_means, pred_covs, resid, var, updated = [], [], [], [], [], [], []
    for k in range(n):
        if k > 0 and not skip[k - 1]:
            Ak = A_k[k - 1]
            m_pred = (Ak @ m.unsqueeze(-1)).squeeze(-1) if batched else Ak @ m
            P_pred = Ak @ P @ Ak.mT + Q_k[k - 1]
            P_pred = 0.5 * (P_pred + P_pred.mT)
            if per_series is None:
                m, P = m_pred, P_pred
            else:  # series whose step is zero keep their moments exactly
                z = per_series[k - 1]
                m = torch.where(z[..., None], m, m_pred)
                P = torch.where(z[..., None, None], P, P_pred)
        pred_means.append(m)
        pred_covs.append(P)
        if any_obs[k]:
            Ph = P @ h
            S = Ph @ h + R_k[k]
            v = y_k[k] - m @ h
            if not batched:  # one series (fewest autograd nodes: this loop is the hot path)
                K = Ph / S
                m = m + K * v
                IKH = eye - torch.outer(K, h)
                P = IKH @ P @ IKH.mT + R_k[k] * torch.outer(K, K)
            else:
                if all_obs[k]:
                    K = Ph / S.unsqueeze(-1)
                else:  # zero gain for the series whose y_k is missing
                    K = Ph * (obs_f[k] / S).unsqueeze(-1)
                m = m + K * v.unsqueeze(-1)
                KK = K.unsqueeze(-1) * K.unsqueeze(-2)
                IKH = eye - K.unsqueeze(-1) * h
                P = IKH @ P @ IKH.mT + R_k[k][..., None, None] * KK
            resid.append(v)
            var.append(S)
            updated.append(k)
        means.append(m)
        covs.append(P)
    if resid:
        v, S = torch.stack(resid, dim=-1), torch.stack(var, dim=-1)
        terms = -0.5 * (v.pow(2) / S + S.log() + _LOG_2PI)
        if not all(all_obs[k] for k in updated):  # only the observed points count
            terms = torch.where(obs[..., updated], terms, torch.zeros_like(terms))
        log_lik = terms.sum(-1).expand(batch)
    else:  # nothing observed: log p(empty) = 0, kept on the graph of the parameters
        log_lik = (0.0 * (R.sum() + Pinf.sum())).expand(batch)
    return FilterResult(
        mean=torch.stack(means, dim=-2),
        cov=torch.stack(covs, dim=-3),
        pred_mean=torch.stack(pred_means, dim=-2),
        pred_cov=torch.stack(pred_covs, dim=-3),
        log_likelihood=log_lik,
    )


def smoother_gain(pred_cov: Tensor, AP: Tensor) -> Tensor:
    """Smoother gain ``G = P A^T (P^-)^{-1}`` from ``P^-`` and ``A P`` (..., d, d) each.

    Solved in correlation form, ``P^- = D C D`` with ``D = diag(P^-)^{1/2}``:
    ``G^T = D^{-1} C^{-1} D^{-1} (A P)`` (Jacobi scaling, which also makes float32
    smoothing more accurate). States with zero predicted variance — a kernel component
    whose output scale is 0, or a deterministic state — have zero rows in ``P^-`` and
    ``A P``; they get ``C_ii = 1`` and hence an exactly zero gain column, the gain of the
    (pseudo-inverse) Gaussian conditioning, where a plain solve fails on the singular
    ``P^-``. A correlation matrix that is still exactly singular is regularised by
    ``d eps I`` (a perturbation at the level of its rounding; one host sync checks).

    Returns
    -------
    Tensor, shape (..., d, d)
        ``G`` (the backward gain ``E`` of :func:`gp.statespace.parallel.smoothing_elements`).
    """
    d = pred_cov.shape[-1]
    diag = pred_cov.diagonal(dim1=-2, dim2=-1)
    positive = diag > 0
    root = torch.where(positive, diag, torch.ones_like(diag)).sqrt()  # D (1 where zero)
    C = pred_cov / (root.unsqueeze(-1) * root.unsqueeze(-2))
    C = C + torch.diag_embed(torch.where(positive, torch.zeros_like(diag), torch.ones_like(diag)))
    B = AP / root.unsqueeze(-1)
    Gt, info = torch.linalg.solve_ex(C, B)
    if bool(info.any()):
        eye = torch.eye(d, dtype=C.dtype, device=C.device)
        Gt = torch.linalg.solve(C + (d * torch.finfo(C.dtype).eps) * eye, B)
    return (Gt / root.unsqueeze(-1)).mT


def rts_smoother(
    A: Tensor, filtered: FilterResult, zero_step: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Rauch–Tung–Striebel smoother: moments of ``p(x_k | y_{0:n-1})``.

    Backwards from ``k = n - 2``: ``G = P_k A_k^T (P_{k+1}^-)^{-1}`` (:func:`smoother_gain`),
    ``m^s_k = m_k + G (m^s_{k+1} - m^-_{k+1})``, ``P^s_k = P_k + G (P^s_{k+1} - P^-_{k+1}) G^T``.
    Zero-length steps (same state twice) copy the later smoothed moments.

    Parameters
    ----------
    A : Tensor, shape (n - 1, d, d) or (..., n - 1, d, d)
        Transition matrices used by the filter.
    filtered : FilterResult
        Output of :func:`kalman_filter` on the same model.
    zero_step : Tensor (bool), shape (n - 1,) or (..., n - 1), optional
        Steps with ``A = I``, ``Q = 0``.

    Returns
    -------
    mean : Tensor, shape (..., n, d)
    cov : Tensor, shape (..., n, d, d)
    """
    n = filtered.mean.shape[-2]
    if A.dim() < 3 or A.shape[-3] != max(n - 1, 0):
        raise ValueError(f"A must have {n - 1} transition matrices, got shape {tuple(A.shape)}")
    skip, per_series = _step_masks(zero_step, n)
    batched = filtered.mean.dim() > 2 or A.dim() > 3
    m_f, P_f = filtered.mean.unbind(-2), filtered.cov.unbind(-3)
    m_p, P_p = filtered.pred_mean.unbind(-2), filtered.pred_cov.unbind(-3)
    # every gain depends on the filter's output only: one batched solve for all steps
    gains = smoother_gain(filtered.pred_cov[..., 1:, :, :], A @ filtered.cov[..., :-1, :, :])
    G_k = gains.unbind(-3)
    ms, Ps = [m_f[-1]], [P_f[-1]]
    m_next, P_next = m_f[-1], P_f[-1]
    for k in range(n - 2, -1, -1):
        if not skip[k]:
            G = G_k[k]
            diff = m_next - m_p[k + 1]
            step = (G @ diff.unsqueeze(-1)).squeeze(-1) if batched else G @ diff
            m_new = m_f[k] + step
            P_new = P_f[k] + G @ (P_next - P_p[k + 1]) @ G.mT
            P_new = 0.5 * (P_new + P_new.mT)
            if per_series is None:
                m_next, P_next = m_new, P_new
            else:  # series whose step is zero copy the later moments exactly
                z = per_series[k]
                m_next = torch.where(z[..., None], m_next, m_new)
                P_next = torch.where(z[..., None, None], P_next, P_new)
        ms.append(m_next)
        Ps.append(P_next)
    return torch.stack(ms[::-1], dim=-2), torch.stack(Ps[::-1], dim=-3)

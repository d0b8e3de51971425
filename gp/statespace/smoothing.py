"""Filtering and smoothing on a time grid, packaged as a :class:`StateSpacePosterior`.

Shared by the Gaussian model (observations with one noise variance) and by CVI (Gaussian
pseudo-observations with one variance per point): sort the training and prediction times
into one grid (:func:`~gp.statespace.make_grid`), discretise the SDE exactly on its steps,
run the Kalman filter and the RTS smoother (sequential loop or parallel scan) and read off
the marginals of ``f = h^T x`` at the prediction times, with the smoothing elements for
joint draws by forward-filtering backward-sampling. Every step is differentiable, in the
hyperparameters and in the times (prediction times included).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .discretise import discretise
from .ffbs import StateSpacePosterior
from .grid import TimeGrid, make_grid
from .kalman import FilterResult, kalman_filter, rts_smoother
from .parallel import parallel_kalman_filter, parallel_rts_smoother, smoothing_elements
from .sde import LTISDE

__all__ = ["filter_grid", "noise_on_grid", "smoothing_posterior"]


def noise_on_grid(grid: TimeGrid, noise: Tensor) -> Tensor:
    """Observation-noise variances on the grid.

    Parameters
    ----------
    grid : TimeGrid
    noise : Tensor, shape () or (..., n)
        One variance for every point, or one per training point in the caller's order.

    Returns
    -------
    Tensor, shape () or (..., N)
        ``noise`` itself when it is a scalar; otherwise the variances at the grid positions
        of the training points and 1 elsewhere (prediction times are unobserved, so their
        value is never used).
    """
    if noise.dim() == 0:
        return noise
    batch = torch.broadcast_shapes(grid.y.shape[:-1], grid.train_index.shape[:-1])
    index = grid.train_index.expand(*batch, grid.train_index.shape[-1])
    values = noise.expand(*batch, index.shape[-1])
    ones = values.new_ones(*batch, grid.y.shape[-1])
    return ones.scatter(-1, index, values)


def filter_grid(
    sde: LTISDE, grid: TimeGrid, noise: Tensor, method: str
) -> tuple[Tensor, FilterResult]:
    """Discretise ``sde`` on the grid's steps and run the Kalman filter on ``grid.y``.

    Parameters
    ----------
    sde : LTISDE
    grid : TimeGrid
        Shared (``dt`` of shape (N - 1,)) or per series (``(..., N - 1)``).
    noise : Tensor, shape () or broadcastable to (..., N)
        Observation-noise variances on the grid.
    method : {"sequential", "parallel"}

    Returns
    -------
    A : Tensor, shape (N - 1, d, d) or (..., N - 1, d, d)
        Transition matrices.
    result : FilterResult
    """
    A, Q = discretise(sde, grid.dt.reshape(-1))  # all series' steps in one batch
    A = A.reshape(*grid.dt.shape, *A.shape[-2:])
    Q = Q.reshape(*grid.dt.shape, *Q.shape[-2:])
    run = parallel_kalman_filter if method == "parallel" else kalman_filter
    return A, run(A, Q, sde.H, sde.Pinf, grid.y, noise, zero_step=_zero_steps(grid))


def _zero_steps(grid: TimeGrid) -> Tensor | None:
    """The grid's repeated-time steps, treated exactly (skipped), unless the times require
    grad: skipping a step would cut the derivative in its length at 0 (the general
    formulas give ``A = I``, ``Q = 0`` there as well)."""
    if torch.is_grad_enabled() and grid.dt.requires_grad:
        return None
    return grid.zero_step


def smoothing_posterior(
    sde: LTISDE, t: Tensor, y: Tensor, noise: Tensor, t_new: Tensor, method: str
) -> StateSpacePosterior:
    """Posterior of ``f`` at ``t_new`` given observations ``y`` at ``t`` (RTS smoothing).

    Parameters
    ----------
    sde : LTISDE
        The prior in state-space form.
    t : Tensor, shape (n,) or (..., n)
        Training times (any order, repeats allowed).
    y : Tensor, shape (n,) or (..., n)
        Observations (NaN = missing).
    noise : Tensor, shape () or (..., n)
        Observation-noise variance, one for all points or one per training point.
    t_new : Tensor, shape (n_new,) or (..., n_new)
        Prediction times; their batch shape broadcasts with those of ``t`` and ``y``.
    method : {"sequential", "parallel"}

    Returns
    -------
    StateSpacePosterior
        ``mean`` and ``variance`` of shape (..., n_new, 1), FFBS draws, dense joint covariance
        on request; differentiable in the hyperparameters (through ``sde``), in ``t`` and in
        ``t_new``.
    """
    grid = make_grid(t, y, t_new)
    A, result = filter_grid(sde, grid, noise_on_grid(grid, noise), method)
    smoother = parallel_rts_smoother if method == "parallel" else rts_smoother
    zero_step = _zero_steps(grid)
    m_s, P_s = smoother(A, result, zero_step=zero_step)
    h = sde.H.reshape(-1)
    index = grid.new_index
    if index.dim() == 1:  # shared grid
        m_new, P_new = m_s[..., index, :], P_s[..., index, :, :]
    else:
        m_new = m_s.gather(-2, index[..., None].expand(*index.shape, m_s.shape[-1]))
        P_new = P_s.gather(-3, index[..., None, None].expand(*index.shape, *P_s.shape[-2:]))
    cov_h = P_new @ h  # (..., n_new, d)
    try:  # the posterior refuses non-finite moments (one device sync)
        return StateSpacePosterior(
            mean=(m_new @ h).unsqueeze(-1),
            variance=(cov_h @ h).clamp_min(0).unsqueeze(-1),
            elements=smoothing_elements(A, result, zero_step=zero_step),
            h=h,
            new_index=index,
            cov_h=cov_h,
            prior_scale=sde.Pinf.detach().diagonal(),  # jitter scale per state
            method=method,
        )
    except ValueError as err:
        raise ValueError(_not_finite_message(sde, noise)) from err


def _not_finite_message(sde: LTISDE, noise: Tensor) -> str:
    """Why the smoother's moments are not finite, and what to do."""
    matrices = (sde.F, sde.Pinf, sde.Qc, noise)
    if not all(bool(torch.isfinite(m).all()) for m in matrices):
        return (
            "the state-space posterior is not finite: the kernel hyperparameters or the noise "
            "are NaN or inf"
        )
    if sde.dtype != torch.float64:
        return (
            f"the state-space posterior is not finite in {sde.dtype}; run the model in "
            "float64 (model.double() and float64 times and targets)"
        )
    return (
        "the state-space posterior is not finite in float64; check that the kernel "
        "hyperparameters are positive and the noise is positive"
    )

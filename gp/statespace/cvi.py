"""Conjugate-computation variational inference (CVI) for state-space GPs, in O(n).

Khan & Lin (AISTATS 2017); the state-space form follows Chang et al., "Fast variational
learning in state-space Gaussian process models" (MLSP 2020). For a non-Gaussian likelihood
``p(y_i | f_i)`` the Gaussian approximation

.. math::

    q(f) \\propto p(f) \\prod_i \\exp(\\lambda_{1,i} f_i - \\tfrac12 \\lambda_{2,i} f_i^2)
         \\propto p(f) \\prod_i N(\\tilde y_i; f_i, \\tilde v_i),
    \\qquad \\tilde v_i = 1 / \\lambda_{2,i}, \\; \\tilde y_i = \\lambda_{1,i} / \\lambda_{2,i}

replaces each likelihood term by a Gaussian *site* (pseudo-observation ``ỹ_i`` with noise
variance ``ṽ_i``), so the marginals ``q(f_i) = N(m_i, v_i)`` are the Kalman/RTS smoother
output on the pseudo-data. The sites are updated by damped natural-gradient steps

.. math::

    \\lambda_2 \\leftarrow (1 - \\rho) \\lambda_2 + \\rho (-2 g_v), \\qquad
    \\lambda_1 \\leftarrow (1 - \\rho) \\lambda_1 + \\rho (g_m - 2 g_v m),

with ``g_m, g_v`` the derivatives of ``E_q[log p(y_i | f_i)]`` with respect to ``m_i`` and
``v_i``. At the fixed point ``q`` is the exact Gaussian-VI optimum (the smoother is exact). The
evidence lower bound is, for any sites (``KL(q || p) = E_q[sum log t_i] - log Z``),

.. math::

    \\mathrm{ELBO} = \\log Z + \\sum_i E_q[\\log p(y_i | f_i)]
                   - \\sum_i E_q[\\log N(\\tilde y_i; f_i, \\tilde v_i)],

``log Z`` the log marginal likelihood of the pseudo-data (from the Kalman filter). At the
CVI optimum its gradient with the sites held fixed is the gradient of the optimal ELBO with
respect to the hyperparameters (the ELBO is stationary in ``q``), so hyperparameters are
learnt by alternating CVI to convergence (no graph) with gradient steps on this ELBO.

Scaling: :func:`cvi_elbo` returns the per-datum mean ``ELBO / n_obs`` by default (the
library's convention for objectives), ``reduction="sum"`` the full sum (which
:meth:`gp.statespace.StateSpaceGP.log_marginal_likelihood` reports as its lower bound on
``log p(y)``). :class:`CVIResult` carries the sum.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from gpytorch.likelihoods import Likelihood
from torch import Tensor, nn

from bdl.core.validation import check_choice, check_int, check_positive

from .discretise import discretise
from .ffbs import StateSpacePosterior
from .grid import TimeGrid, make_grid
from .kalman import FilterResult, kalman_filter, rts_smoother
from .likelihoods import check_targets, expected_log_lik, expected_log_lik_grads
from .parallel import parallel_kalman_filter, parallel_rts_smoother
from .sde import LTISDE
from .smoothing import smoothing_posterior

__all__ = [
    "CVIConfig",
    "CVIResult",
    "CVISites",
    "cvi_elbo",
    "cvi_posterior",
    "cvi_pseudo_data",
    "run_cvi",
]

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class CVIConfig:
    """Settings of the CVI site iteration.

    Parameters
    ----------
    step_size : float, default 1.0
        Damping ``rho`` in (0, 1] of the natural-gradient site update. A step that lowers the
        ELBO is halved (backtracking) and the step grows back by doubling up to ``step_size``.
    max_iter : int, default 500
        Maximum number of site updates per call.
    tol : float, default 1e-10
        Converged when every site moves by at most ``tol`` relative to its target
        (``|Δλ_2| / λ_2`` and ``|Δλ_1| / (|λ_1| + sqrt(λ_2))``); never below ``100 eps`` of
        the dtype.
    quadrature_points : int, default 20
        Gauss–Hermite points for likelihoods without a closed-form expectation.
    """

    step_size: float = 1.0
    max_iter: int = 500
    tol: float = 1e-10
    quadrature_points: int = 20

    def __post_init__(self) -> None:
        check_positive("step_size", self.step_size)
        if self.step_size > 1:
            raise ValueError(f"step_size must be in (0, 1], got {self.step_size}")
        check_int("max_iter", self.max_iter, minimum=0)
        check_positive("tol", self.tol)
        check_int("quadrature_points", self.quadrature_points, minimum=1)


class CVISites(nn.Module):
    """Site natural parameters ``(λ_1, λ_2)`` per training point, kept as buffers.

    Stored in the caller's order of the training points (shape (n,) each; empty until the
    first CVI run), so they warm-start the next run and travel with ``state_dict``; loading
    a state dict resizes them to the saved shape.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("nat1", torch.zeros(0))
        self.register_buffer("nat2", torch.zeros(0))

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        for name in ("nat1", "nat2"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor) and saved.shape != self._buffers[name].shape:
                self._buffers[name] = self._buffers[name].new_zeros(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def store(self, nat1: Tensor, nat2: Tensor) -> None:
        """Replace the sites (detached copies in the computation dtype and device)."""
        self.nat1 = nat1.detach().clone()
        self.nat2 = nat2.detach().clone()


@dataclass(frozen=True)
class CVIResult:
    """Outcome of :func:`run_cvi` (no autograd graph).

    Attributes
    ----------
    nat1, nat2 : Tensor, shape (n_obs,)
        Site natural parameters of the observed points (in the order of ``y_obs``).
    mean, var : Tensor, shape (n_obs,)
        Marginals ``q(f_i) = N(mean_i, var_i)`` at the observed points.
    elbo : Tensor, shape ()
        Evidence lower bound at these sites.
    iterations : int
        Site updates performed.
    converged : bool
        Whether the fixed-point tolerance was reached.
    """

    nat1: Tensor
    nat2: Tensor
    mean: Tensor
    var: Tensor
    elbo: Tensor
    iterations: int
    converged: bool


def _pseudo_marginals(
    sde: LTISDE,
    A: Tensor,
    Q: Tensor,
    grid: TimeGrid,
    pos: Tensor,
    nat1: Tensor,
    nat2: Tensor,
    method: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Kalman filter + RTS smoother on the pseudo-data ``ỹ = λ1/λ2``, ``ṽ = 1/λ2`` at ``pos``.

    Returns ``log Z`` (shape ()) and the smoothed mean and variance of ``f`` at every grid
    point (shape (N,) each).
    """
    result, m_s, P_s = _pseudo_smoother(sde, A, Q, grid, pos, nat1, nat2, method)
    h = sde.H.reshape(-1)
    return result.log_likelihood, m_s @ h, (P_s @ h @ h).clamp_min(0)


def _pseudo_smoother(
    sde: LTISDE,
    A: Tensor,
    Q: Tensor,
    grid: TimeGrid,
    pos: Tensor,
    nat1: Tensor,
    nat2: Tensor,
    method: str,
) -> tuple[FilterResult, Tensor, Tensor]:
    """Filter result and smoothed state moments (N, d), (N, d, d) of the pseudo-data model."""
    N = grid.times.shape[0]
    y = nat1.new_full((N,), float("nan")).index_put((pos,), nat1 / nat2)
    noise = nat2.new_ones(N).index_put((pos,), 1.0 / nat2)
    run, smooth = (
        (parallel_kalman_filter, parallel_rts_smoother)
        if method == "parallel"
        else (kalman_filter, rts_smoother)
    )
    result = run(A, Q, sde.H, sde.Pinf, y, noise, zero_step=grid.zero_step)
    m_s, P_s = smooth(A, result, zero_step=grid.zero_step)
    return result, m_s, P_s


def _elbo(
    likelihood: Likelihood,
    y_obs: Tensor,
    log_z: Tensor,
    mean: Tensor,
    var: Tensor,
    nat1: Tensor,
    nat2: Tensor,
    num_points: int,
) -> Tensor:
    # ELBO = log Z + sum E_q[log p(y|f)] - sum E_q[log N(ỹ; f, ṽ)]  (module docstring)
    expected = expected_log_lik(likelihood, y_obs, mean, var, num_points).sum()
    pseudo_y = nat1 / nat2
    pseudo = -0.5 * (_LOG_2PI - nat2.log() + nat2 * ((pseudo_y - mean).pow(2) + var))
    return log_z + expected - pseudo.sum()


def _targets(
    likelihood: Likelihood, y_obs: Tensor, mean: Tensor, var: Tensor, num_points: int
) -> tuple[Tensor, Tensor]:
    """CVI targets ``λ2* = -2 g_v`` and ``λ1* = g_m - 2 g_v m`` (Khan & Lin 2017, eq. 10)."""
    _, g_m, g_v = expected_log_lik_grads(likelihood, y_obs, mean, var, num_points)
    t2 = -2.0 * g_v
    # log-concave likelihoods give t2 > 0; keep the site precision positive in any case
    scale = t2.abs().max().clamp_min(1.0) if t2.numel() else t2.new_tensor(1.0)
    floor = torch.finfo(t2.dtype).eps * scale
    t2 = t2.clamp_min(floor)
    return g_m + t2 * mean, t2


def run_cvi(
    likelihood: Likelihood,
    sde: LTISDE,
    grid: TimeGrid,
    y_obs: Tensor,
    pos: Tensor,
    nat1: Tensor | None = None,
    nat2: Tensor | None = None,
    config: CVIConfig | None = None,
    method: str = "sequential",
) -> CVIResult:
    """Iterate the CVI site updates to the fixed point (no autograd graph).

    Parameters
    ----------
    likelihood : Likelihood
        A supported likelihood (:mod:`.likelihoods`).
    sde : LTISDE
        Prior in state-space form.
    grid : TimeGrid
        Sorted time grid of the training points (:func:`~gp.statespace.make_grid`).
    y_obs : Tensor, shape (n_obs,)
        Observed values (no NaN).
    pos : Tensor (long), shape (n_obs,)
        Grid position of each observed value.
    nat1, nat2 : Tensor, shape (n_obs,), optional
        Initial sites (``nat2 > 0``). Default: one full CVI step from the prior marginals.
    config : CVIConfig, optional
    method : {"sequential", "parallel"}, default "sequential"
        Filter/smoother used for the marginals.

    Returns
    -------
    CVIResult
    """
    config = CVIConfig() if config is None else config
    q = config.quadrature_points
    with torch.no_grad():
        A, Q = discretise(sde, grid.dt)
        if nat1 is None or nat2 is None:  # first step from the prior N(0, k(0))
            h = sde.H.reshape(-1)
            prior_var = (h @ sde.Pinf @ h).expand_as(y_obs)
            nat1, nat2 = _targets(likelihood, y_obs, torch.zeros_like(y_obs), prior_var, q)
        elif not bool((nat2 > 0).all()) or not bool(torch.isfinite(nat1).all()):
            raise ValueError("initial sites must have finite nat1 and nat2 > 0")

        def evaluate(n1: Tensor, n2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            log_z, m_grid, v_grid = _pseudo_marginals(sde, A, Q, grid, pos, n1, n2, method)
            m, v = m_grid[pos], v_grid[pos]
            return _elbo(likelihood, y_obs, log_z, m, v, n1, n2, q), m, v

        elbo, m, v = evaluate(nat1, nat2)
        eps = torch.finfo(y_obs.dtype).eps
        tol = max(config.tol, 100 * eps)
        rho, converged, iterations = config.step_size, False, 0
        while True:
            t1, t2 = _targets(likelihood, y_obs, m, v, q)
            change = torch.maximum(
                (t1 - nat1).abs() / (t1.abs() + t2.sqrt()), (t2 - nat2).abs() / t2
            )
            if change.numel() == 0 or float(change.max()) <= tol:
                converged = True
                break
            if iterations >= config.max_iter:
                break
            slack = 1e3 * eps * (1.0 + abs(float(elbo)))
            step = rho
            while step >= 2.0**-30:  # backtrack until the ELBO does not decrease
                n1 = nat1 + step * (t1 - nat1)
                n2 = nat2 + step * (t2 - nat2)
                new = evaluate(n1, n2)
                if bool(torch.isfinite(new[0])) and float(new[0]) >= float(elbo) - slack:
                    break
                step *= 0.5
            else:
                break  # no ascent step found: stop at the current sites (not converged)
            nat1, nat2, (elbo, m, v) = n1, n2, new
            rho = min(config.step_size, 2.0 * step)
            iterations += 1
    if not converged:
        warnings.warn(
            f"CVI did not converge in {iterations} iterations (largest relative site change "
            f"{float(change.max()):.3g} > tol {tol:.3g}); raise CVIConfig.max_iter or lower "
            "step_size",
            RuntimeWarning,
            stacklevel=3,
        )
    return CVIResult(nat1, nat2, m, v, elbo, iterations, converged)


def _prepare(
    likelihood: Likelihood, t: Tensor, y: Tensor
) -> tuple[TimeGrid, Tensor, Tensor, Tensor]:
    for name, x in (("t", t), ("y", y)):
        if x.dim() != 1:
            raise ValueError(
                f"{name} must have shape (n,) for a non-Gaussian likelihood (one series; "
                f"batches of series are not supported), got {tuple(x.shape)}"
            )
    check_targets(likelihood, y)
    grid = make_grid(t, y)  # training times only
    obs = ~torch.isnan(y)
    return grid, obs, grid.train_index[obs], y[obs]


def _fit_sites(
    likelihood: Likelihood,
    sde: LTISDE,
    grid: TimeGrid,
    obs: Tensor,
    pos: Tensor,
    y_obs: Tensor,
    sites: CVISites,
    config: CVIConfig,
    method: str,
) -> CVIResult:
    """Run CVI warm-started from ``sites`` (if they match ``n``) and store the result."""
    n, dtype = obs.shape[0], y_obs.dtype
    warm = sites.nat1.shape[0] == n and bool((sites.nat2[obs] > 0).all())
    init = (sites.nat1.to(dtype)[obs], sites.nat2.to(dtype)[obs]) if warm else (None, None)
    result = run_cvi(likelihood, sde, grid, y_obs, pos, *init, config=config, method=method)
    nat1 = y_obs.new_zeros(n).masked_scatter(obs, result.nat1)
    nat2 = y_obs.new_ones(n).masked_scatter(obs, result.nat2)  # unobserved: unused
    sites.store(nat1, nat2)
    return result


def cvi_elbo(
    likelihood: Likelihood,
    sde: LTISDE,
    t: Tensor,
    y: Tensor,
    sites: CVISites,
    config: CVIConfig | None = None,
    method: str = "sequential",
    reduction: str = "mean",
) -> Tensor:
    """ELBO of the CVI optimum, differentiable in the hyperparameters; updates ``sites``.

    Runs CVI to convergence (warm-started from ``sites``, no graph), stores the sites, then
    evaluates the ELBO at the fixed sites with a graph to the kernel (``sde``) and likelihood
    parameters. It is a lower bound on ``log p(y)`` (equal for a Gaussian likelihood).

    Parameters
    ----------
    likelihood : Likelihood
    sde : LTISDE
        The kernel's state-space form (built with autograd enabled for gradients).
    t : Tensor, shape (n,)
        Training times, any order, repeats allowed.
    y : Tensor, shape (n,)
        Observations (NaN = missing), in the likelihood's support.
    sites : CVISites
        Warm start and storage of the sites.
    config : CVIConfig, optional
    method : {"sequential", "parallel"}, default "sequential"
    reduction : {"mean", "sum"}, default "mean"
        ``"mean"``: the per-datum ELBO, ``ELBO / n_obs`` over the ``n_obs`` observed points
        (0 when nothing is observed); ``"sum"``: the ELBO itself.

    Returns
    -------
    Tensor, shape ()
    """
    check_choice("reduction", reduction, ("mean", "sum"))
    config = CVIConfig() if config is None else config
    grid, obs, pos, y_obs = _prepare(likelihood, t, y)
    result = _fit_sites(likelihood, sde, grid, obs, pos, y_obs, sites, config, method)
    if not torch.is_grad_enabled():
        elbo = result.elbo
    else:
        A, Q = discretise(sde, grid.dt)
        log_z, m, v = _pseudo_marginals(sde, A, Q, grid, pos, result.nat1, result.nat2, method)
        m, v = m[pos], v[pos]
        q = config.quadrature_points
        elbo = _elbo(likelihood, y_obs, log_z, m, v, result.nat1, result.nat2, q)
    return elbo if reduction == "sum" else elbo / max(y_obs.shape[0], 1)


def cvi_pseudo_data(
    likelihood: Likelihood,
    sde: LTISDE,
    t: Tensor,
    y: Tensor,
    sites: CVISites,
    config: CVIConfig | None = None,
    method: str = "sequential",
) -> tuple[Tensor, Tensor]:
    """Gaussian pseudo-observations of the CVI optimum (CVI run to convergence first).

    ``q(f)`` is the exact posterior of the Gaussian model whose observation at ``t_i`` is
    ``ỹ_i = λ_{1,i} / λ_{2,i}`` with noise variance ``ṽ_i = 1 / λ_{2,i}``.

    Parameters
    ----------
    likelihood, sde, t, y, sites, config, method
        As in :func:`cvi_elbo`.

    Returns
    -------
    pseudo_y : Tensor, shape (n,)
        ``ỹ`` (NaN where ``y`` is missing), no graph.
    pseudo_noise : Tensor, shape (n,)
        ``ṽ`` (1 where ``y`` is missing), no graph.
    """
    config = CVIConfig() if config is None else config
    grid, obs, pos, y_obs = _prepare(likelihood, t, y)
    result = _fit_sites(likelihood, sde, grid, obs, pos, y_obs, sites, config, method)
    nan = y.new_full(y.shape, float("nan"))
    pseudo_y = nan.masked_scatter(obs, result.nat1 / result.nat2)
    pseudo_noise = y.new_ones(y.shape).masked_scatter(obs, 1.0 / result.nat2)
    return pseudo_y, pseudo_noise


def cvi_posterior(
    likelihood: Likelihood,
    sde: LTISDE,
    t: Tensor,
    y: Tensor,
    t_new: Tensor,
    sites: CVISites,
    config: CVIConfig | None = None,
    method: str = "sequential",
) -> StateSpacePosterior:
    """Variational posterior ``q(f(t_new))`` (CVI run to convergence first).

    The converged sites are pseudo-observations at the training times
    (:func:`cvi_pseudo_data`); the RTS smoother on the training times merged with ``t_new``
    gives the marginals anywhere (interpolation and forecasting). Predictive probabilities /
    rates of ``y`` follow from :func:`gp.statespace.predictive_moments`.

    Parameters
    ----------
    likelihood, sde, t, y, sites, config, method
        As in :func:`cvi_elbo`.
    t_new : Tensor, shape (n_new,) or (..., n_new)
        Prediction times (a batch of sets of prediction times is allowed).

    Returns
    -------
    StateSpacePosterior
        ``mean`` and marginal ``variance`` of ``f``, shape (..., n_new, 1); ``rsample`` draws
        joint samples of ``f`` under ``q`` by FFBS. Differentiable in the kernel
        hyperparameters (at fixed sites) and in ``t_new``.
    """
    pseudo_y, pseudo_noise = cvi_pseudo_data(likelihood, sde, t, y, sites, config, method)
    return smoothing_posterior(sde, t, pseudo_y, pseudo_noise, t_new, method)

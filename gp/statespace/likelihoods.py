"""Expected log-likelihoods and their gradients for state-space GPs fitted by CVI.

Conjugate-computation VI (:mod:`.cvi`) needs, for every observation ``y_i`` and Gaussian
marginal ``q(f_i) = N(m_i, v_i)``, the expected log-likelihood

.. math::

    E_i(m_i, v_i) = \\mathbb{E}_{N(f; m_i, v_i)}[\\log p(y_i \\mid f)]

and its partial derivatives with respect to ``m_i`` and ``v_i``. They are closed-form for the
Gaussian and the Poisson (log link) likelihoods, and computed by Gauss–Hermite quadrature
otherwise (exact derivatives of the quadrature sum, so the CVI fixed point is the exact
stationary point of the ELBO that is reported).

Supported likelihoods (the classes of :mod:`gp.likelihoods`):

- :class:`gpytorch.likelihoods.GaussianLikelihood`: ``y ~ N(f, noise)`` (closed form);
- :class:`gpytorch.likelihoods.BernoulliLikelihood`: ``p(y = 1 | f) = Phi(f)`` (probit; quadrature);
- :class:`BernoulliLogitLikelihood`: ``p(y = 1 | f) = sigmoid(f)`` (quadrature);
- :class:`PoissonLikelihood`: ``y ~ Poisson(exp(f))`` (closed form).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from gpytorch.likelihoods import BernoulliLikelihood, GaussianLikelihood, Likelihood
from torch import Tensor

from gp.likelihoods import BernoulliLogitLikelihood, PoissonLikelihood

__all__ = [
    "BernoulliLogitLikelihood",
    "PoissonLikelihood",
    "check_likelihood",
    "check_targets",
    "expected_log_lik",
    "expected_log_lik_grads",
    "predictive_moments",
]

_LOG_2PI = math.log(2.0 * math.pi)
SUPPORTED = (
    "GaussianLikelihood, BernoulliLikelihood (gpytorch, probit), "
    "gp.BernoulliLogitLikelihood, gp.PoissonLikelihood"
)


def _poisson_expected(y: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    # E_{N(m, v)}[y f - e^f - log y!] with E[e^f] = exp(m + v/2)
    return y * mean - torch.exp(mean + 0.5 * var) - torch.lgamma(y + 1)


def _gaussian_expected(y: Tensor, mean: Tensor, var: Tensor, noise: Tensor) -> Tensor:
    return -0.5 * (_LOG_2PI + noise.log() + ((y - mean).pow(2) + var) / noise)


def check_likelihood(likelihood: object) -> Likelihood | None:
    """Validate a likelihood for :class:`~gp.statespace.StateSpaceGP`.

    Parameters
    ----------
    likelihood : gpytorch Likelihood or None
        One of the supported likelihoods (see the module docstring).

    Returns
    -------
    Likelihood or None
        The likelihood, or None for ``None`` (the exact Gaussian path).

    Raises
    ------
    TypeError
        For any other object, naming the supported classes.
    """
    if likelihood is None:
        return None
    if isinstance(
        likelihood,
        GaussianLikelihood | BernoulliLikelihood | BernoulliLogitLikelihood | PoissonLikelihood,
    ):
        return likelihood
    raise TypeError(
        f"likelihood must be None or one of {SUPPORTED}; got {type(likelihood).__name__}"
    )


def check_targets(likelihood: Likelihood, y: Tensor) -> Tensor:
    """Check observations against the likelihood's support (NaN marks a missing value).

    Parameters
    ----------
    likelihood : Likelihood
        A supported likelihood.
    y : Tensor, shape (n,)
        Observations.

    Returns
    -------
    Tensor, shape (n,)
        ``y`` unchanged.

    Raises
    ------
    ValueError
        For inf; for Bernoulli likelihoods labels other than 0 and 1; for the Poisson
        likelihood values that are not non-negative integers.
    """
    check_likelihood(likelihood)
    if bool(torch.isinf(y).any()):
        raise ValueError("y contains inf; use NaN to mark missing observations")
    obs = y[~torch.isnan(y)]
    if isinstance(likelihood, BernoulliLikelihood | BernoulliLogitLikelihood):
        bad = (obs != 0) & (obs != 1)
        if bool(bad.any()):
            raise ValueError(
                f"y must hold labels 0 or 1 for {type(likelihood).__name__}; "
                f"got {obs[bad][0].item()!r}"
            )
    elif isinstance(likelihood, PoissonLikelihood):
        bad = (obs < 0) | (obs != obs.round())
        if bool(bad.any()):
            raise ValueError(
                "y must hold non-negative integer counts for PoissonLikelihood; "
                f"got {obs[bad][0].item()!r}"
            )
    return y


@lru_cache(maxsize=16)
def _hermite_rule(num_points: int) -> tuple[np.ndarray, np.ndarray]:
    # probabilists' Gauss–Hermite: sum_j w_j g(x_j) ~ E_{N(0, 1)}[g] after dividing by sqrt(2 pi)
    x, w = np.polynomial.hermite_e.hermegauss(num_points)
    return x, w / math.sqrt(2.0 * math.pi)


def _log_density(likelihood: Likelihood, y: Tensor, f: Tensor) -> Tensor:
    """``log p(y | f)`` elementwise for the quadrature likelihoods (``y`` broadcasts)."""
    sign = 2.0 * y - 1.0
    if isinstance(likelihood, BernoulliLikelihood):
        return torch.special.log_ndtr(sign * f)  # log Phi((2y - 1) f), stable in the tails
    return -torch.nn.functional.softplus(-sign * f)  # log sigmoid((2y - 1) f)


def _quadrature(fn: Any, mean: Tensor, var: Tensor, num_points: int) -> Tensor:
    """``E_{N(mean, var)}[fn(f)]`` by ``num_points``-point Gauss–Hermite quadrature."""
    x, w = _hermite_rule(num_points)
    x = torch.as_tensor(x, dtype=mean.dtype, device=mean.device)
    w = torch.as_tensor(w, dtype=mean.dtype, device=mean.device)
    f = mean.unsqueeze(-1) + var.clamp_min(0).sqrt().unsqueeze(-1) * x  # (..., num_points)
    return fn(f) @ w


def expected_log_lik(
    likelihood: Likelihood, y: Tensor, mean: Tensor, var: Tensor, num_points: int = 20
) -> Tensor:
    """Expected log-likelihood ``E_{N(f; mean, var)}[log p(y | f)]``, elementwise.

    Parameters
    ----------
    likelihood : Likelihood
        A supported likelihood.
    y, mean, var : Tensor, shape (n,)
        Observations (no NaN) and the Gaussian marginals of ``f``.
    num_points : int, default 20
        Gauss–Hermite points for the likelihoods without a closed form.

    Returns
    -------
    Tensor, shape (n,)
        Differentiable in ``mean``, ``var`` and the likelihood's parameters.
    """
    if isinstance(likelihood, PoissonLikelihood):
        return _poisson_expected(y, mean, var)
    if isinstance(likelihood, GaussianLikelihood):
        noise = likelihood.noise.reshape(()).to(dtype=mean.dtype, device=mean.device)
        return _gaussian_expected(y, mean, var, noise)
    check_likelihood(likelihood)
    y = y.unsqueeze(-1)
    return _quadrature(lambda f: _log_density(likelihood, y, f), mean, var, num_points)


def expected_log_lik_grads(
    likelihood: Likelihood, y: Tensor, mean: Tensor, var: Tensor, num_points: int = 20
) -> tuple[Tensor, Tensor, Tensor]:
    """Expected log-likelihood and its derivatives with respect to ``mean`` and ``var``.

    Closed form for the Gaussian (``(y - m) / s2``, ``-1 / (2 s2)``) and Poisson
    (``y - exp(m + v/2)``, ``-exp(m + v/2) / 2``) likelihoods; otherwise the exact derivatives
    of the quadrature sum of :func:`expected_log_lik` (by autograd).

    Parameters
    ----------
    likelihood : Likelihood
    y, mean, var : Tensor, shape (n,)
    num_points : int, default 20

    Returns
    -------
    value, d_mean, d_var : Tensor, shape (n,) each
        Detached from any graph.
    """
    mean, var = mean.detach(), var.detach()
    if isinstance(likelihood, PoissonLikelihood):
        rate = torch.exp(mean + 0.5 * var)
        value = y * mean - rate - torch.lgamma(y + 1)
        return value, y - rate, -0.5 * rate
    if isinstance(likelihood, GaussianLikelihood):
        noise = likelihood.noise.detach().reshape(()).to(dtype=mean.dtype, device=mean.device)
        value = _gaussian_expected(y, mean, var, noise)
        return value, (y - mean) / noise, (-0.5 / noise).expand_as(mean)
    with torch.enable_grad():
        m = mean.clone().requires_grad_(True)
        v = var.clone().requires_grad_(True)
        value = expected_log_lik(likelihood, y, m, v, num_points)
        d_mean, d_var = torch.autograd.grad(value.sum(), (m, v))
    return value.detach(), d_mean, d_var


def predictive_moments(
    likelihood: Likelihood, mean: Tensor, var: Tensor, num_points: int = 20
) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``y`` under ``f ~ N(mean, var)``: ``p(y) = E_q[p(y | f)]``.

    Bernoulli: the mean is ``P(y = 1)`` (probit: ``Phi(m / sqrt(1 + v))``; logit: quadrature)
    and the variance ``p (1 - p)``. Poisson: mean ``exp(m + v/2)`` and variance
    ``mean + (exp(v) - 1) mean^2`` (law of total variance). Gaussian: ``(m, v + noise)``.

    Parameters
    ----------
    likelihood : Likelihood
    mean, var : Tensor, shape (...)
    num_points : int, default 20

    Returns
    -------
    mean, variance : Tensor, shape (...)
    """
    if isinstance(likelihood, PoissonLikelihood):
        rate = torch.exp(mean + 0.5 * var)
        return rate, rate + torch.expm1(var) * rate.pow(2)
    if isinstance(likelihood, GaussianLikelihood):
        noise = likelihood.noise.reshape(()).to(dtype=mean.dtype, device=mean.device)
        return mean, var + noise
    if isinstance(likelihood, BernoulliLikelihood):
        p = torch.special.ndtr(mean / torch.sqrt(1.0 + var))
    else:
        check_likelihood(likelihood)
        p = _quadrature(torch.sigmoid, mean, var, num_points)
    return p, p * (1.0 - p)

"""Gaussian processes on gpytorch kernels, sharing ``bdl``'s posterior interface.

:class:`ExactGP` (exact by default: Cholesky with bounded, reported jitter and an analytic
log-marginal-likelihood gradient), :class:`StateSpaceGP` (exact O(n) Kalman inference for
time series), :class:`SVGP` and :class:`SWSGP` (sparse variational GPs with Gaussian,
Bernoulli, Poisson or softmax likelihoods) and memory-bounded kernel products
(:func:`kernel_matvec`). Every model follows :class:`bdl.core.Model`. Hyperparameters are
fitted by :func:`fit_hyperparameters` (type-II maximum likelihood), and
:class:`GPRegressor` / :class:`StateSpaceGPRegressor` / :class:`SparseGPRegressor` /
:class:`SparseGPClassifier` wrap the models as scikit-learn estimators. Names are imported
lazily, on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ExactGP": "gp.exact",
    "GPRegressor": "gp.exact.estimators",
    "StateSpaceGP": "gp.statespace",
    "StateSpaceGPRegressor": "gp.statespace.estimators",
    "kernel_to_sde": "gp.statespace",
    "SVGP": "gp.sparse",
    "SWSGP": "gp.sparse",
    "SparseGPClassifier": "gp.sparse.estimators",
    "SparseGPRegressor": "gp.sparse.estimators",
    "select_inducing_points": "gp.sparse",
    "GaussianLikelihood": "gp.likelihoods",
    "BernoulliLikelihood": "gp.likelihoods",
    "BernoulliLogitLikelihood": "gp.likelihoods",
    "PoissonLikelihood": "gp.likelihoods",
    "SoftmaxLikelihood": "gp.likelihoods",
    "fit_hyperparameters": "gp.fitting",
    "cross_covariance_chunks": "gp.kernels",
    "kernel_diag": "gp.kernels",
    "kernel_matvec": "gp.kernels",
    "GaussianPosterior": "bdl.core.posterior",
    "Posterior": "bdl.core.posterior",
}
_SUBMODULES = ("exact", "fitting", "kernels", "likelihoods", "sparse", "statespace")

__all__ = [*_LAZY, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"gp.{name}")
    else:
        raise AttributeError(f"module 'gp' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

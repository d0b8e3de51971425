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

from bdl._lazy import lazy_exports

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
    "ClassProbabilities": "gp.sparse",
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


__getattr__, __dir__ = lazy_exports("gp", _LAZY, _SUBMODULES, globals())

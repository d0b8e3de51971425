"""Gaussian processes on gpytorch kernels, sharing ``bdl``'s posterior interface.

Available now: :class:`ExactGP` (exact by default: Cholesky with bounded, reported jitter and an
analytic log-marginal-likelihood gradient), :class:`StateSpaceGP` (exact O(n) Kalman inference
for time series), :class:`SVGP` (sparse variational GP with Gaussian, Bernoulli, Poisson or
softmax likelihoods, minibatch training with natural gradients) and memory-bounded kernel
products (:func:`kernel_matvec`). Hyperparameters
are fitted by :func:`fit_hyperparameters` (type-II maximum likelihood), and
:class:`GPRegressor` / :class:`StateSpaceGPRegressor` / :class:`SparseGPRegressor` /
:class:`SparseGPClassifier` wrap the models as scikit-learn estimators. The posterior types
every model returns are re-exported here.
"""

from bdl.posterior import GaussianPosterior, Posterior
from gp.estimators import GPRegressor, StateSpaceGPRegressor
from gp.exact import ExactGP
from gp.fitting import fit_hyperparameters
from gp.kernels import cross_covariance_chunks, kernel_diag, kernel_matvec
from gp.sparse import (
    SVGP,
    SWSGP,
    PoissonLikelihood,
    SparseGPClassifier,
    SparseGPRegressor,
    select_inducing_points,
)
from gp.statespace import StateSpaceGP, kernel_to_sde

__all__ = [
    "ExactGP",
    "GPRegressor",
    "GaussianPosterior",
    "Posterior",
    "PoissonLikelihood",
    "SVGP",
    "SWSGP",
    "SparseGPClassifier",
    "SparseGPRegressor",
    "StateSpaceGP",
    "StateSpaceGPRegressor",
    "cross_covariance_chunks",
    "fit_hyperparameters",
    "kernel_diag",
    "kernel_matvec",
    "kernel_to_sde",
    "select_inducing_points",
]

"""Gaussian processes on gpytorch kernels, sharing ``bdl``'s posterior interface.

Available now: :class:`ExactGP` (exact by default: Cholesky with bounded, reported jitter and an
analytic log-marginal-likelihood gradient), :class:`StateSpaceGP` (exact O(n) Kalman inference
for time series) and memory-bounded kernel products (:func:`kernel_matvec`). Sparse GPs
follow; the posterior types every model returns are re-exported here.
"""

from bdl.posterior import GaussianPosterior, Posterior
from gp.exact import ExactGP
from gp.kernels import cross_covariance_chunks, kernel_diag, kernel_matvec
from gp.statespace import StateSpaceGP, kernel_to_sde

__all__ = [
    "ExactGP",
    "GaussianPosterior",
    "Posterior",
    "StateSpaceGP",
    "cross_covariance_chunks",
    "kernel_diag",
    "kernel_matvec",
    "kernel_to_sde",
]

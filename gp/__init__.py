"""Gaussian processes on gpytorch kernels, sharing ``bdl``'s posterior interface.

Available now: :class:`StateSpaceGP` (exact O(n) Kalman inference for 1-D inputs with Matérn
kernels, their scalings and sums). Exact-by-default and sparse GPs follow; the posterior types
every model returns are re-exported here.
"""

from bdl.posterior import GaussianPosterior, Posterior
from gp.statespace import StateSpaceGP, kernel_to_sde

__all__ = ["GaussianPosterior", "Posterior", "StateSpaceGP", "kernel_to_sde"]

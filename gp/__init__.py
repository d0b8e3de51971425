"""Gaussian processes on gpytorch kernels, sharing ``bdl``'s posterior interface.

The GP models (exact, sparse, state-space) land in later releases; the posterior types they
return are re-exported here so that GP code can import them from one place.
"""

from bdl.posterior import GaussianPosterior, Posterior

__all__ = ["GaussianPosterior", "Posterior"]

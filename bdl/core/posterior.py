"""The common predictive-distribution interface shared by every model in ``bdl`` and ``gp``.

Every model answers ``model.posterior(X)`` with one of three kinds:

- :class:`GaussianPosterior`: a mean and either per-point variances (heads that only give
  marginals) or a full joint covariance over the ``n`` points (GPs).
- :class:`CategoricalPosterior`: class probabilities, with the per-draw probabilities they were
  averaged from when there are any.
- :class:`SamplePosterior`: a stack of function draws (SG-MCMC chains, ensembles, weight
  samples), optionally with per-draw observation noise, read as an equal-weight mixture.

Shapes follow BoTorch: ``mean`` and ``variance`` are ``(..., n, m)`` with ``...`` any batch
shape, ``n`` points and ``m`` outputs. Samples are ``(*sample_shape, ..., n, m)``.
"""

from bdl.core.categorical import CategoricalPosterior
from bdl.core.gaussian import GaussianPosterior
from bdl.core.posterior_base import Posterior
from bdl.core.samples import SamplePosterior

__all__ = ["Posterior", "GaussianPosterior", "CategoricalPosterior", "SamplePosterior"]

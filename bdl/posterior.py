"""Public alias of :mod:`bdl.core.posterior` (the posterior kinds live in ``bdl.core``)."""

from bdl.core.posterior import CategoricalPosterior, GaussianPosterior, Posterior, SamplePosterior

__all__ = ["Posterior", "GaussianPosterior", "CategoricalPosterior", "SamplePosterior"]

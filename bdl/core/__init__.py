"""The spine of the library: posteriors, the model protocol, transforms, training, estimators.

Imports no method family; only :mod:`bdl.core.estimator` imports scikit-learn.
"""

from bdl.core.model import Model, TransformedModel
from bdl.core.posterior import CategoricalPosterior, GaussianPosterior, Posterior, SamplePosterior
from bdl.core.transforms import Normalize, Standardize

__all__ = [
    "CategoricalPosterior",
    "GaussianPosterior",
    "Model",
    "Normalize",
    "Posterior",
    "SamplePosterior",
    "Standardize",
    "TransformedModel",
]

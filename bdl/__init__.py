"""bdl: Bayesian deep learning on PyTorch with one posterior interface.

Every model answers ``model.posterior(X)`` with a :class:`~bdl.posterior.Posterior`.
"""

from bdl import lastlayer, metrics, sgmcmc
from bdl.estimators import VBLLClassifier, VBLLRegressor
from bdl.lastlayer import (
    GenerativeVBLLClassification,
    HeteroscedasticVBLLRegression,
    VBLLClassification,
    VBLLRegression,
)
from bdl.posterior import CategoricalPosterior, GaussianPosterior, Posterior, SamplePosterior
from bdl.sgmcmc.estimators import SGMCMCClassifier, SGMCMCRegressor

__version__ = "0.1.0"

__all__ = [
    "VBLLRegressor",
    "VBLLClassifier",
    "SGMCMCRegressor",
    "SGMCMCClassifier",
    "Posterior",
    "GaussianPosterior",
    "CategoricalPosterior",
    "SamplePosterior",
    "VBLLRegression",
    "HeteroscedasticVBLLRegression",
    "VBLLClassification",
    "GenerativeVBLLClassification",
    "lastlayer",
    "metrics",
    "sgmcmc",
]

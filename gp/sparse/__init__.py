"""Sparse variational Gaussian processes (SVGP) and sparse-within-sparse GPs (SWSGP).

The scikit-learn estimators (:class:`SparseGPRegressor`, :class:`SparseGPClassifier`) are
imported on first use, so that importing the models does not load scikit-learn.
"""

from __future__ import annotations

from bdl._lazy import lazy_exports
from gp.likelihoods import PoissonLikelihood, make_likelihood

from .classification import ClassProbabilities
from .initialisation import nearest_neighbour_noise_variance, select_inducing_points
from .svgp import SVGP
from .swsgp import SWSGP

_LAZY = {"SparseGPClassifier": "gp.sparse.estimators", "SparseGPRegressor": "gp.sparse.estimators"}

__all__ = [
    "SVGP",
    "SWSGP",
    "ClassProbabilities",
    "PoissonLikelihood",
    "SparseGPClassifier",
    "SparseGPRegressor",
    "make_likelihood",
    "nearest_neighbour_noise_variance",
    "select_inducing_points",
]


__getattr__, __dir__ = lazy_exports("gp.sparse", _LAZY, (), globals())

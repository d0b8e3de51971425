"""Sparse variational Gaussian processes (SVGP) and sparse-within-sparse GPs (SWSGP)."""

from .estimators import SparseGPClassifier, SparseGPRegressor
from .initialisation import nearest_neighbour_noise_variance, select_inducing_points
from gp.likelihoods import PoissonLikelihood, make_likelihood
from .svgp import SVGP
from .swsgp import SWSGP

__all__ = [
    "SVGP",
    "SWSGP",
    "PoissonLikelihood",
    "SparseGPClassifier",
    "SparseGPRegressor",
    "make_likelihood",
    "nearest_neighbour_noise_variance",
    "select_inducing_points",
]

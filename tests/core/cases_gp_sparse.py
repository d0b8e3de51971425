"""Contract cases of the sparse GPs (gp.sparse): SVGP, SWSGP and their estimators."""

from __future__ import annotations

import copy

import torch
from cases import D, EstimatorCase, ModelCase, regression_data
from gpytorch.kernels import RBFKernel, ScaleKernel

from gp.sparse import SVGP, SWSGP, SparseGPClassifier, SparseGPRegressor, select_inducing_points

M = 12  # inducing points of every case
TRAIN = dict(epochs=3, batch_size=16, seed=0)


def _kernel(dtype: torch.dtype) -> ScaleKernel:
    return ScaleKernel(RBFKernel(ard_num_dims=D)).to(dtype)


def _labels(y: torch.Tensor) -> torch.Tensor:
    return (y > y.median()).to(y.dtype)


# -- SVGP ------------------------------------------------------------------------------------
def _svgp(likelihood: str, model_dtype: torch.dtype | None = None):
    """``model_dtype``: build the model in that dtype whatever the suite asks for (the queries
    stay float64: a float32 model must answer them with float64 accuracy)."""

    def targets(dtype):
        X, y = regression_data(dtype=dtype)
        return X, (y if likelihood == "gaussian" else _labels(y))

    def build(dtype):
        X, y = targets(model_dtype or dtype)
        return SVGP.from_data(X, y, M, likelihood=likelihood).fit((X, y), **TRAIN)

    def fresh(dtype):
        dtype = model_dtype or dtype
        return SVGP(_kernel(dtype), torch.rand(M, D, dtype=dtype), likelihood=likelihood)

    def fit(model):
        return model.fit(targets(model.inducing_points.dtype), **TRAIN)

    return build, fresh, fit


# -- SWSGP -----------------------------------------------------------------------------------
def _swsgp(num_neighbors: int, model_dtype: torch.dtype | None = None):
    def build(dtype):
        X, y = regression_data(dtype=model_dtype or dtype)
        Z = select_inducing_points(X, M, seed=0)
        model = SWSGP(_kernel(model_dtype or dtype), Z, num_neighbors=num_neighbors, rank=2)
        return model.fit((X, y), **TRAIN)

    def fresh(dtype):
        dtype = model_dtype or dtype
        return SWSGP(_kernel(dtype), torch.rand(M, D, dtype=dtype), num_neighbors, rank=2)

    def fit(model):
        return model.fit(regression_data(dtype=model.inducing_points.dtype), **TRAIN)

    return build, fresh, fit


def _noise(model):
    # in float64: a float32 model's float64 posterior transforms the raw noise in float64
    return copy.deepcopy(model.likelihood).double().noise


def _case(name, parts, **kwargs) -> ModelCase:
    build, fresh, fit = parts
    return ModelCase(name, build=build, fresh=fresh, fit=fit, **kwargs)


F32 = torch.float32

MODEL_CASES = [
    _case("svgp-gaussian", _svgp("gaussian"), noise=_noise),
    _case("svgp-bernoulli", _svgp("bernoulli")),
    _case("svgp-gaussian-float32", _svgp("gaussian", F32), noise=_noise),
    # H = M: the union-neighbourhood joint is SVGP's
    _case("swsgp-gaussian-full", _swsgp(M), noise=_noise),
    # H < M: the joint has each point's own marginals (the union joint's correlations)
    _case("swsgp-gaussian-local", _swsgp(4), noise=_noise),
    _case("swsgp-gaussian-local-float32", _swsgp(4, F32), noise=_noise),
]

TINY = dict(num_inducing=M, epochs=5, lr=0.1, random_state=0)  # default dtype: float32

ESTIMATOR_CASES = [
    EstimatorCase("sparse-gp-regressor-svgp", lambda: SparseGPRegressor(**TINY)),
    EstimatorCase(
        "sparse-gp-regressor-swsgp",
        lambda: SparseGPRegressor(method="swsgp", num_neighbors=4, **TINY),
    ),
    EstimatorCase(
        "sparse-gp-classifier-svgp", lambda: SparseGPClassifier(**TINY), task="classification"
    ),
]

"""Contract cases of the sparse GPs (gp.sparse): SVGP, SWSGP and their estimators."""

from __future__ import annotations

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
def _svgp(likelihood: str):
    def targets(dtype):
        X, y = regression_data(dtype=dtype)
        return X, (y if likelihood == "gaussian" else _labels(y))

    def build(dtype):
        X, y = targets(dtype)
        return SVGP.from_data(X, y, M, likelihood=likelihood).fit((X, y), **TRAIN)

    def fresh(dtype):
        return SVGP(_kernel(dtype), torch.rand(M, D, dtype=dtype), likelihood=likelihood)

    def fit(model):
        return model.fit(targets(model.inducing_points.dtype), **TRAIN)

    return build, fresh, fit


# -- SWSGP -----------------------------------------------------------------------------------
def _swsgp(num_neighbors: int):
    def build(dtype):
        X, y = regression_data(dtype=dtype)
        Z = select_inducing_points(X, M, seed=0)
        model = SWSGP(_kernel(dtype), Z, num_neighbors=num_neighbors, rank=2)
        return model.fit((X, y), **TRAIN)

    def fresh(dtype):
        return SWSGP(_kernel(dtype), torch.rand(M, D, dtype=dtype), num_neighbors, rank=2)

    def fit(model):
        return model.fit(regression_data(dtype=model.inducing_points.dtype), **TRAIN)

    return build, fresh, fit


def _noise(model):
    return model.likelihood.noise


def _case(name, parts, **kwargs) -> ModelCase:
    build, fresh, fit = parts
    return ModelCase(name, build=build, fresh=fresh, fit=fit, **kwargs)


MODEL_CASES = [
    _case("svgp-gaussian", _svgp("gaussian"), noise=_noise),
    _case("svgp-bernoulli", _svgp("bernoulli")),
    # H = M: the union-neighbourhood joint has the marginals on its diagonal
    _case("swsgp-gaussian-full", _swsgp(M), noise=_noise),
    # H < M: each point's own neighbours; the joint (on the union of the neighbour sets)
    # conditions every point on more inducing values than its marginal does
    _case("swsgp-gaussian-local", _swsgp(4), noise=_noise, joint=False),
]

TINY = dict(num_inducing=M, epochs=5, lr=0.1, dtype="float64", random_state=0)

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

"""Contract-suite cases of the exact and state-space GPs (``gp.exact``, ``gp.statespace``)."""

from __future__ import annotations

import torch
from cases import D, EstimatorCase, ModelCase, regression_data
from gpytorch.kernels import MaternKernel, ScaleKernel

from gp.exact import ExactGP
from gp.exact.estimators import GPRegressor
from gp.likelihoods import PoissonLikelihood
from gp.statespace import StateSpaceGP
from gp.statespace.estimators import StateSpaceGPRegressor


def _exact(dtype: torch.dtype, fitted: bool = True) -> ExactGP:
    X, y = regression_data(dtype=dtype)
    model = ExactGP(ScaleKernel(MaternKernel(nu=2.5, ard_num_dims=D)), noise=0.1).to(dtype)
    model.set_data(X, y)
    return model.fit(max_iter=20) if fitted else model


def _series(dtype: torch.dtype, counts: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Times (n, 1) (the first input column of ``regression_data``) and targets (n,)."""
    X, _ = regression_data()
    t = X[:, :1]
    gen = torch.Generator().manual_seed(1)
    f = torch.sin(2 * t[:, 0])
    if counts:
        y = torch.poisson(f.exp(), generator=gen)
    else:
        y = f + 0.1 * torch.randn(t.shape[0], generator=gen, dtype=torch.float64)
    return t.to(dtype), y.to(dtype)


def _statespace(dtype: torch.dtype, fitted: bool = True, poisson: bool = False) -> StateSpaceGP:
    t, y = _series(dtype, counts=poisson)
    kernel = ScaleKernel(MaternKernel(nu=1.5))
    likelihood = PoissonLikelihood() if poisson else None
    model = StateSpaceGP(kernel, noise=0.1, likelihood=likelihood).to(dtype).set_data(t, y)
    return model.fit(max_iter=10) if fitted else model


MODEL_CASES = [
    ModelCase(
        name="ExactGP",
        build=_exact,
        fresh=lambda dtype: _exact(dtype, fitted=False),
        noise=lambda model: model.noise.detach(),
        fit=lambda model: model.fit(max_iter=5),
    ),
    ModelCase(
        name="StateSpaceGP",
        build=_statespace,
        fresh=lambda dtype: _statespace(dtype, fitted=False),
        noise=lambda model: model.noise.detach(),
        fit=lambda model: model.fit(max_iter=5),
        d=1,
    ),
    ModelCase(
        name="StateSpaceGP-poisson",
        build=lambda dtype: _statespace(dtype, poisson=True),
        fresh=lambda dtype: _statespace(dtype, fitted=False, poisson=True),
        noise=None,
        fit=lambda model: model.fit(max_iter=3),
        d=1,
    ),
]

ESTIMATOR_CASES = [
    EstimatorCase(name="GPRegressor", make=lambda: GPRegressor(max_iter=5, random_state=0)),
    EstimatorCase(
        name="StateSpaceGPRegressor",
        make=lambda: StateSpaceGPRegressor(max_iter=5, random_state=0),
        n_features=1,
    ),
]

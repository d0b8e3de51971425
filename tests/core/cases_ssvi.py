"""SSVI cases of the contract suite: sparse Bayesian networks and the estimators."""

from __future__ import annotations

import torch
from cases import D, EstimatorCase, ModelCase, classification_data, regression_data
from torch import nn

from bdl.ssvi import SSVIClassifier, SSVIRegressor, sparsify

_TINY_FIT = dict(epochs=3, batch_size=10, seed=0, update_every=2, alpha=0.3)


def _arch(out: int) -> nn.Module:
    # tanh: smooth in X for the finite-difference check
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, out))


def _fresh(task: str, out: int):
    def fresh(dtype: torch.dtype):
        net = sparsify(_arch(out).to(dtype), 0.5, task=task, seed=0)
        net.num_samples = 8
        return net.to(dtype)

    return fresh


def _build(task: str, out: int):
    def build(dtype: torch.dtype):
        net = _fresh(task, out)(dtype)
        if task == "regression":
            x, y = regression_data(dtype=dtype)
        else:
            x, y = classification_data()
            x = x.to(dtype)
        return net.fit((x, y), **_TINY_FIT).eval()

    return build


def _noise(net) -> torch.Tensor:
    return (2 * net.log_noise_std.detach()).exp()


MODEL_CASES = [
    ModelCase(
        "SSVINetwork-regression", build=_build("regression", 1), fresh=_fresh("regression", 1),
        noise=_noise,
    ),
    ModelCase(
        "SSVINetwork-classification", build=_build("classification", 3),
        fresh=_fresh("classification", 3), joint=False, categorical=True,
    ),
]  # fmt: skip

_TINY = dict(hidden_sizes=(8,), epochs=3, batch_size=16, num_samples=4, random_state=0)

ESTIMATOR_CASES = [
    EstimatorCase("SSVIRegressor", make=lambda: SSVIRegressor(**_TINY)),
    EstimatorCase("SSVIClassifier", make=lambda: SSVIClassifier(**_TINY), task="classification"),
]

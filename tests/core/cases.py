"""Cases of the shared contract suite: one ``ModelCase`` or ``EstimatorCase`` per model.

A new model joins the suite with one line in its family's list below (``MODEL_CASES`` /
``ESTIMATOR_CASES`` collect them all).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

D = 3  # input dimensions of every case


def regression_data(n: int = 40, dtype: torch.dtype = torch.float64, seed: int = 0):
    """X (n, D) and y (n,) from a smooth function plus noise (sd 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, D, generator=gen, dtype=torch.float64) * 4 - 2
    y = torch.sin(X).sum(-1) + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    return X.to(dtype), y.to(dtype)


def classification_data(n: int = 60, classes: int = 3, seed: int = 0):
    """X (n, D) float64 and integer labels (n,) from the argmax of random linear scores."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, D, generator=gen, dtype=torch.float64) * 4 - 2
    W = torch.randn(D, classes, generator=gen, dtype=torch.float64)
    return X, (X @ W).argmax(-1)


@dataclass
class ModelCase:
    """One torch-level model in the contract suite.

    build(dtype) returns a fitted model computing in ``dtype``; fresh(dtype) the same
    architecture before fitting (the target of a ``state_dict`` round trip); noise(model)
    the observation-noise variance ``posterior(observation_noise=True)`` adds, shape
    broadcastable to (n, m), or None where that option does not apply (``noise(model, X)``
    when ``noise_takes_inputs``: input-dependent noise); fit(model) trains it
    briefly (None where the model is not trained by ``fit``).
    """

    name: str
    build: Callable[[torch.dtype], Any]
    fresh: Callable[[torch.dtype], Any]
    noise: Callable[..., torch.Tensor] | None = None
    noise_takes_inputs: bool = False
    joint: bool = True
    categorical: bool = False
    fit: Callable[[Any], Any] | None = None
    d: int = D
    extra: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


@dataclass
class EstimatorCase:
    """One scikit-learn estimator (tiny configuration) in the contract suite."""

    name: str
    make: Callable[[], Any]
    task: str = "regression"  # or "classification"
    joint: bool = True
    differentiable: bool = True
    n_features: int = D

    def __str__(self) -> str:
        return self.name

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        if self.task == "regression":
            X, y = regression_data()
        else:
            X, y = classification_data()
        return X[:, : self.n_features].numpy(), y.numpy()


def _collect(name: str) -> tuple[list[ModelCase], list[EstimatorCase]]:
    import importlib

    module = importlib.import_module(name)
    return list(getattr(module, "MODEL_CASES", [])), list(getattr(module, "ESTIMATOR_CASES", []))


FAMILIES = ("cases_lastlayer", "cases_sgmcmc", "cases_ssvi", "cases_gp_exact", "cases_gp_sparse")


def all_cases() -> tuple[list[ModelCase], list[EstimatorCase]]:
    models: list[ModelCase] = []
    estimators: list[EstimatorCase] = []
    for family in FAMILIES:
        m, e = _collect(family)
        models += m
        estimators += e
    return models, estimators

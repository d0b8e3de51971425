"""bdl: Bayesian deep learning on PyTorch with one posterior interface.

Every model answers ``model.posterior(X)`` with a :class:`~bdl.core.posterior.Posterior`.
Public names are imported lazily, on first use, so that ``import bdl`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "VBLLRegressor": "bdl.lastlayer.estimators",
    "VBLLClassifier": "bdl.lastlayer.estimators",
    "SGMCMCRegressor": "bdl.sgmcmc.estimators",
    "SGMCMCClassifier": "bdl.sgmcmc.estimators",
    "Model": "bdl.core.model",
    "Posterior": "bdl.core.posterior",
    "GaussianPosterior": "bdl.core.posterior",
    "CategoricalPosterior": "bdl.core.posterior",
    "SamplePosterior": "bdl.core.posterior",
    "VBLLRegression": "bdl.lastlayer",
    "HeteroscedasticVBLLRegression": "bdl.lastlayer",
    "VBLLClassification": "bdl.lastlayer",
    "GenerativeVBLLClassification": "bdl.lastlayer",
}
_SUBMODULES = ("core", "lastlayer", "metrics", "nets", "posterior", "sgmcmc")

__all__ = [*_LAZY, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"bdl.{name}")
    else:
        raise AttributeError(f"module 'bdl' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

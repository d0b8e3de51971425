"""bdl: Bayesian deep learning on PyTorch with one posterior interface.

Every model answers ``model.posterior(X)`` with a :class:`~bdl.core.posterior.Posterior`.
Public names are imported lazily, on first use, so that ``import bdl`` stays cheap.
"""

from __future__ import annotations

from bdl._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "VBLLRegressor": "bdl.lastlayer.estimators",
    "VBLLClassifier": "bdl.lastlayer.estimators",
    "SGMCMCRegressor": "bdl.sgmcmc.estimators",
    "SSVIClassifier": "bdl.ssvi.estimators",
    "SSVIRegressor": "bdl.ssvi.estimators",
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
_SUBMODULES = ("bo", "core", "lastlayer", "metrics", "nets", "posterior", "sgmcmc", "ssvi")

__all__ = [*_LAZY, *_SUBMODULES]


__getattr__, __dir__ = lazy_exports("bdl", _LAZY, _SUBMODULES, globals())

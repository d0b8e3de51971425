"""Sparse subspace variational inference: Bayesian neural networks that stay sparse.

Li, Miao, Qiu & Zhang, "Training Bayesian Neural Networks with Sparse Subspace Variational
Inference", ICLR 2024. A mean-field Gaussian posterior lives on a support of fixed size from
the first step to the last; the support is refined by alternating removal (by a
signal-to-noise score) and growth (by the gradient of the means).

- :class:`SparseBayesLinear`, :class:`SparseBayesConv2d`: layers that store only their active
  weights.
- :func:`sparsify`: a network's ``nn.Linear``/``nn.Conv2d`` layers made sparse Bayesian, as a
  :class:`bdl.core.Model` (:class:`SSVINetwork`).
- :class:`SSVI`: the trainer; :func:`removal_score`: the six removal criteria.
- :class:`SSVIClassifier`, :class:`SSVIRegressor`: scikit-learn estimators.
- :func:`flops`: per-layer parameter and FLOP accounting against dense mean-field VI.
"""

from __future__ import annotations

from bdl._lazy import lazy_exports

_LAZY = {
    "CRITERIA": "bdl.ssvi.criteria",
    "removal_score": "bdl.ssvi.criteria",
    "SparseBayesLinear": "bdl.ssvi.layers",
    "SparseBayesConv2d": "bdl.ssvi.layers",
    "SparseBayesLayer": "bdl.ssvi.layers",
    "SSVINetwork": "bdl.ssvi.network",
    "sparsify": "bdl.ssvi.network",
    "SSVI": "bdl.ssvi.trainer",
    "SSVIClassifier": "bdl.ssvi.estimators",
    "SSVIRegressor": "bdl.ssvi.estimators",
    "flops": "bdl.ssvi.flops",
}
__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports("bdl.ssvi", _LAZY, (), globals())

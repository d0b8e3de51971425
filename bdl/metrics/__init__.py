"""Predictive-quality metrics for regression, classification and out-of-distribution detection.

Every function takes torch tensors and computes on their device and (floating) dtype. Scalar
metrics return a **0-dim tensor**, not a Python float, so a metric computed on a GPU stays there
until the caller asks for it (``float(metric)`` or ``metric.item()``). Per-point metrics
(``reduction="none"``, :func:`predictive_entropy`) return a ``(n,)`` tensor.

Inputs are validated and bad input raises ``ValueError`` naming the offending argument. The
checks (NaN, ranges, label bounds) read values back from the device, so they synchronise once
per call; the metrics themselves add no further synchronisation.

Shapes
------
- Regression: ``mean``, ``variance``, ``pred`` and ``y`` are ``(n,)`` or ``(n, m)`` with ``n``
  points and ``m`` outputs; all of one call must have the same shape.
- Classification: ``probs`` is ``(n, C)`` with rows on the probability simplex, ``y`` is an
  integer tensor ``(n,)`` of labels in ``[0, C)``.
"""

from bdl.metrics.calibration import (
    ReliabilityData,
    expected_calibration_error,
    reliability_diagram,
)
from bdl.metrics.classification import accuracy, brier_score, categorical_nll, predictive_entropy
from bdl.metrics.ood import ood_auroc
from bdl.metrics.regression import (
    gaussian_nll,
    interval_calibration_error,
    interval_coverage,
    rmse,
)

__all__ = [
    "ReliabilityData",
    "accuracy",
    "brier_score",
    "categorical_nll",
    "expected_calibration_error",
    "gaussian_nll",
    "interval_calibration_error",
    "interval_coverage",
    "ood_auroc",
    "predictive_entropy",
    "reliability_diagram",
    "rmse",
]

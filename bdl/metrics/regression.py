"""Regression metrics: Gaussian NLL, RMSE and the calibration of Gaussian prediction intervals.

``mean``, ``variance``, ``pred`` and ``y`` are ``(n,)`` or ``(n, m)`` with ``n`` points and
``m`` outputs; all of one call must have the same shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from bdl.core.validation import check_choice
from bdl.metrics._checks import (
    _LOG_2PI,
    _REDUCTIONS,
    Reduction,
    _as_levels,
    _check_regression,
    _float_dtype,
    _reduce,
)

__all__ = ["gaussian_nll", "interval_calibration_error", "interval_coverage", "rmse"]


def gaussian_nll(
    mean: Tensor, variance: Tensor, y: Tensor, reduction: Reduction = "mean"
) -> Tensor:
    """Negative log-likelihood of ``y`` under independent Gaussians ``N(mean, variance)``.

    Per point ``0.5 * (log(2π σ²) + (y - μ)² / σ²)``, summed over the output dimension when the
    inputs are ``(n, m)``.

    Parameters
    ----------
    mean : Tensor, shape (n,) or (n, m)
        Predictive means.
    variance : Tensor, same shape as ``mean``
        Predictive variances, strictly positive (include the observation noise if ``y`` is
        noisy).
    y : Tensor, same shape as ``mean``
        Observed targets.
    reduction : {"mean", "sum", "none"}
        Average or sum over the ``n`` points, or return the per-point values.

    Returns
    -------
    Tensor, shape () or (n,)
        0-dim for ``"mean"``/``"sum"``, ``(n,)`` for ``"none"``.
    """
    _check_regression(mean, y, variance=variance)
    check_choice("reduction", reduction, _REDUCTIONS)
    dtype = _float_dtype(mean, variance, y)
    mean, variance, y = mean.to(dtype), variance.to(dtype), y.to(dtype)
    nll = 0.5 * (_LOG_2PI + torch.log(variance) + (y - mean).square() / variance)
    if nll.dim() == 2:
        nll = nll.sum(dim=1)
    return _reduce(nll, reduction)


def rmse(pred: Tensor, y: Tensor) -> Tensor:
    """Root-mean-squared error over all entries.

    Parameters
    ----------
    pred : Tensor, shape (n,) or (n, m)
        Point predictions.
    y : Tensor, same shape as ``pred``
        Targets.

    Returns
    -------
    Tensor, shape ()
        ``sqrt(mean((pred - y)²))``, the mean running over all ``n * m`` entries.
    """
    _check_regression(pred, y, mean_name="pred")
    dtype = _float_dtype(pred, y)
    return (pred.to(dtype) - y.to(dtype)).square().mean().sqrt()


def _coverage(
    mean: Tensor, variance: Tensor, y: Tensor, levels: Tensor | Sequence[float] | None
) -> tuple[Tensor, Tensor]:
    """Validated ``(levels, coverage)``, both of shape ``(k,)`` in the common floating dtype."""
    _check_regression(mean, y, variance=variance)
    levels = _as_levels(levels, mean)
    dtype = _float_dtype(mean, variance, y, levels)
    levels = levels.to(dtype)
    z = math.sqrt(2.0) * torch.special.erfinv(levels)  # Φ⁻¹((1 + p) / 2)
    residual = ((y.to(dtype) - mean.to(dtype)).abs() / variance.to(dtype).sqrt()).flatten()
    sorted_residual, _ = torch.sort(residual)
    covered = torch.searchsorted(sorted_residual, z, right=True)
    return levels, covered.to(dtype) / residual.numel()


def interval_coverage(
    mean: Tensor,
    variance: Tensor,
    y: Tensor,
    levels: Tensor | Sequence[float] | None = None,
) -> Tensor:
    """Empirical coverage of central Gaussian prediction intervals.

    For each level ``p`` the interval is ``mean ± z σ`` with ``z = Φ⁻¹((1 + p) / 2)``; its
    coverage is the fraction of entries of ``y`` inside it (bounds included).

    Parameters
    ----------
    mean : Tensor, shape (n,) or (n, m)
        Predictive means.
    variance : Tensor, same shape as ``mean``
        Predictive variances, strictly positive.
    y : Tensor, same shape as ``mean``
        Observed targets.
    levels : Tensor or sequence of float, shape (k,), optional
        Nominal interval probabilities, each in the open interval ``(0, 1)``. Defaults to
        ``i / 16`` for ``i = 1, ..., 15``.

    Returns
    -------
    Tensor, shape (k,)
        Fraction of the ``n * m`` entries covered at each level.
    """
    return _coverage(mean, variance, y, levels)[1]


def interval_calibration_error(
    mean: Tensor,
    variance: Tensor,
    y: Tensor,
    levels: Tensor | Sequence[float] | None = None,
) -> Tensor:
    """Mean absolute gap between nominal level and empirical coverage of Gaussian intervals.

    ``mean_k |levels_k - coverage_k|`` with ``coverage`` from :func:`interval_coverage`.

    Parameters
    ----------
    mean : Tensor, shape (n,) or (n, m)
        Predictive means.
    variance : Tensor, same shape as ``mean``
        Predictive variances, strictly positive.
    y : Tensor, same shape as ``mean``
        Observed targets.
    levels : Tensor or sequence of float, shape (k,), optional
        Nominal interval probabilities in ``(0, 1)``; defaults to ``i / 16``, ``i = 1..15``.

    Returns
    -------
    Tensor, shape ()
        0 for perfect calibration; less than 1.
    """
    levels, coverage = _coverage(mean, variance, y, levels)
    return (levels - coverage).abs().mean()

"""Top-label calibration of classifiers: reliability diagrams and expected calibration error."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bdl.core.validation import check_int
from bdl.metrics._checks import _check_classification

__all__ = ["ReliabilityData", "expected_calibration_error", "reliability_diagram"]


@dataclass(frozen=True)
class ReliabilityData:
    """Per-bin statistics of top-label confidence, as drawn in a reliability diagram.

    Attributes
    ----------
    bin_lower, bin_upper : Tensor, shape (n_bins,)
        Bin edges; bin ``b`` is ``(bin_lower[b], bin_upper[b]]``, the first one also holding 0.
    confidence : Tensor, shape (n_bins,)
        Mean top-label confidence of the points in each bin (0 for empty bins).
    accuracy : Tensor, shape (n_bins,)
        Fraction of those points whose top label is correct (0 for empty bins).
    count : Tensor of int64, shape (n_bins,)
        Number of points in each bin; use ``count > 0`` to mask empty bins.
    """

    bin_lower: Tensor
    bin_upper: Tensor
    confidence: Tensor
    accuracy: Tensor
    count: Tensor

    def expected_calibration_error(self) -> Tensor:
        """Count-weighted mean of ``|accuracy - confidence|`` over bins (0-dim tensor)."""
        weight = self.count.to(self.confidence.dtype) / self.count.sum()
        return (weight * (self.accuracy - self.confidence).abs()).sum()


def reliability_diagram(probs: Tensor, y: Tensor, n_bins: int = 15) -> ReliabilityData:
    """Bin points by top-label confidence into ``n_bins`` equal-width bins over ``[0, 1]``.

    Bins are ``(lo, hi]``; the first bin also holds confidence exactly 0.

    Parameters
    ----------
    probs : Tensor, shape (n, C)
        Predictive class probabilities. The prediction is the argmax and the confidence its
        probability.
    y : Tensor of int, shape (n,)
        Observed labels in ``[0, C)``.
    n_bins : int
        Number of bins, at least 1.

    Returns
    -------
    ReliabilityData
        Edges, mean confidence, accuracy and count per bin, each of shape ``(n_bins,)``.
    """
    _check_classification(probs, y)
    n_bins = check_int("n_bins", n_bins, minimum=1)
    dtype, device = probs.dtype, probs.device
    confidence, pred = probs.max(dim=1)
    correct = (pred == y).to(dtype)
    # k / n_bins is the correctly rounded edge, so a probability written as 0.3 falls in (0.2, 0.3].
    edges = torch.arange(n_bins + 1, dtype=dtype, device=device) / n_bins
    # bucketize(right=False) returns i with edges[i-1] < x <= edges[i] over the inner edges.
    index = torch.bucketize(confidence, edges[1:-1], right=False)
    count = torch.zeros(n_bins, dtype=torch.int64, device=device)
    count.scatter_add_(0, index, torch.ones_like(index))
    conf_sum = torch.zeros(n_bins, dtype=dtype, device=device).scatter_add_(0, index, confidence)
    correct_sum = torch.zeros(n_bins, dtype=dtype, device=device).scatter_add_(0, index, correct)
    denom = count.clamp_min(1).to(dtype)
    return ReliabilityData(
        bin_lower=edges[:-1],
        bin_upper=edges[1:],
        confidence=conf_sum / denom,
        accuracy=correct_sum / denom,
        count=count,
    )


def expected_calibration_error(probs: Tensor, y: Tensor, n_bins: int = 15) -> Tensor:
    """Top-label expected calibration error with equal-width bins.

    ``sum_b (count_b / n) |accuracy_b - confidence_b|`` over the bins of
    :func:`reliability_diagram`.

    Parameters
    ----------
    probs : Tensor, shape (n, C)
        Predictive class probabilities.
    y : Tensor of int, shape (n,)
        Observed labels in ``[0, C)``.
    n_bins : int
        Number of equal-width bins over ``[0, 1]``, at least 1.

    Returns
    -------
    Tensor, shape ()
        In ``[0, 1]``; 0 for perfect calibration.
    """
    return reliability_diagram(probs, y, n_bins).expected_calibration_error()

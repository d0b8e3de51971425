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

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from bdl.core.validation import check_choice, check_int, check_tensor

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

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")
_LOG_2PI = math.log(2.0 * math.pi)
# Rows of ``probs`` must sum to 1 within this absolute tolerance (loose enough for float32
# softmax outputs over many classes, tight enough to catch logits or unnormalised scores);
# half-precision inputs get 4 machine epsilons instead when that is larger.
_SIMPLEX_ATOL = 1e-3


# ----------------------------------------------------------------------------- validation


def _float_dtype(*tensors: Tensor) -> torch.dtype:
    """Common floating dtype of ``tensors`` (the default dtype if none of them is floating)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def _check_real(name: str, x: Tensor, ndim: int | tuple[int, ...]) -> Tensor:
    """A finite, non-empty, real tensor with ``ndim`` dims."""
    check_tensor(name, x, ndim=ndim)
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name} must be a real-valued tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    return x


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} must have the same shape as {name_a}: "
            f"got {tuple(b.shape)} and {tuple(a.shape)}"
        )


def _check_regression(
    mean: Tensor, y: Tensor, *, mean_name: str = "mean", variance: Tensor | None = None
) -> None:
    _check_real(mean_name, mean, (1, 2))
    _check_real("y", y, (1, 2))
    _check_same_shape(mean_name, mean, "y", y)
    if variance is not None:
        _check_real("variance", variance, (1, 2))
        _check_same_shape(mean_name, mean, "variance", variance)
        if not bool((variance > 0).all()):
            raise ValueError("variance must be strictly positive everywhere")


def _check_probs(probs: Tensor, name: str = "probs") -> Tensor:
    """``(n, C)`` floating probabilities in ``[0, 1]`` whose rows sum to 1."""
    check_tensor(name, probs, ndim=2)
    if not probs.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {probs.dtype}")
    if probs.shape[1] == 0:
        raise ValueError(f"{name} must have at least one class column, got shape (n, 0)")
    if not bool(((probs >= 0) & (probs <= 1)).all()):
        raise ValueError(f"{name} must lie in [0, 1]")
    row_sums = probs.sum(dim=1, dtype=torch.promote_types(probs.dtype, torch.float32))
    atol = max(_SIMPLEX_ATOL, 4 * torch.finfo(probs.dtype).eps)
    if not bool(((row_sums - 1).abs() <= atol).all()):
        raise ValueError(f"{name} rows must sum to 1 (within {atol:g})")
    return probs


def _check_labels(y: Tensor, n: int, num_classes: int | None, name: str = "y") -> Tensor:
    """Integer ``(n,)`` labels, in ``[0, num_classes)`` when ``num_classes`` is given."""
    check_tensor(name, y, ndim=1)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of class labels, got dtype {y.dtype}")
    if y.shape[0] != n:
        raise ValueError(f"{name} must have length {n} (one label per row), got {y.shape[0]}")
    if num_classes is not None and not bool(((y >= 0) & (y < num_classes)).all()):
        raise ValueError(f"{name} contains labels outside [0, {num_classes})")
    return y


def _check_classification(probs: Tensor, y: Tensor, probs_name: str = "probs") -> None:
    _check_probs(probs, probs_name)
    _check_labels(y, probs.shape[0], probs.shape[1])


def _reduce(values: Tensor, reduction: str) -> Tensor:
    check_choice("reduction", reduction, _REDUCTIONS)
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def _default_levels(dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.arange(1, 16, dtype=dtype, device=device) / 16


def _as_levels(levels: Tensor | Sequence[float] | None, like: Tensor) -> Tensor:
    dtype = _float_dtype(like)
    if levels is None:
        return _default_levels(dtype, like.device)
    if not isinstance(levels, Tensor):
        try:
            levels = torch.as_tensor(levels, dtype=dtype, device=like.device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"levels must be a 1-D sequence of floats: {err}") from None
    check_tensor("levels", levels, ndim=1)
    if not bool(((levels > 0) & (levels < 1)).all()):
        raise ValueError("levels must lie in the open interval (0, 1)")
    return levels.to(dtype=dtype, device=like.device)


# ----------------------------------------------------------------------------- regression


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


# ------------------------------------------------------------------------- classification


def categorical_nll(probs: Tensor, y: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Negative log-probability of the observed class, ``-log p_y``.

    ``p_y`` is clamped below at the smallest positive normal number of the dtype, so a zero
    probability gives a large finite value instead of ``inf``.

    Parameters
    ----------
    probs : Tensor, shape (n, C)
        Predictive class probabilities (rows on the simplex).
    y : Tensor of int, shape (n,)
        Observed labels in ``[0, C)``.
    reduction : {"mean", "sum", "none"}
        Average or sum over points, or return the per-point values.

    Returns
    -------
    Tensor, shape () or (n,)
        0-dim for ``"mean"``/``"sum"``, ``(n,)`` for ``"none"``.
    """
    _check_classification(probs, y)
    check_choice("reduction", reduction, _REDUCTIONS)
    p_y = probs.gather(1, y.long().unsqueeze(1)).squeeze(1)
    nll = -torch.log(p_y.clamp_min(torch.finfo(probs.dtype).tiny))
    return _reduce(nll, reduction)


def accuracy(probs_or_labels: Tensor, y: Tensor) -> Tensor:
    """Fraction of correct predictions.

    Parameters
    ----------
    probs_or_labels : Tensor, shape (n, C) or (n,)
        Class probabilities (the prediction is the argmax, first index on ties) or integer
        predicted labels.
    y : Tensor of int, shape (n,)
        True labels (in ``[0, C)`` when probabilities are given).

    Returns
    -------
    Tensor, shape ()
        In the dtype of ``probs`` (the default dtype for label predictions).
    """
    if isinstance(probs_or_labels, Tensor) and probs_or_labels.dim() == 2:
        _check_classification(probs_or_labels, y, "probs_or_labels")
        pred = probs_or_labels.argmax(dim=1)
        dtype = probs_or_labels.dtype
    else:
        check_tensor("probs_or_labels", probs_or_labels, ndim=(1, 2))
        pred = _check_labels(probs_or_labels, probs_or_labels.shape[0], None, "probs_or_labels")
        _check_labels(y, pred.shape[0], None)
        dtype = torch.get_default_dtype()
    return (pred == y).to(dtype).mean()


def brier_score(probs: Tensor, y: Tensor) -> Tensor:
    """Multi-class Brier score, ``mean_i sum_c (p_ic - 1[y_i = c])²``.

    For two classes this is twice scikit-learn's binary ``brier_score_loss`` (which scores the
    positive class only).

    Parameters
    ----------
    probs : Tensor, shape (n, C)
        Predictive class probabilities.
    y : Tensor of int, shape (n,)
        Observed labels in ``[0, C)``.

    Returns
    -------
    Tensor, shape ()
        Between 0 (perfect) and 2.
    """
    _check_classification(probs, y)
    onehot = torch.nn.functional.one_hot(y.long(), probs.shape[1]).to(probs.dtype)
    return (probs - onehot).square().sum(dim=1).mean()


def predictive_entropy(probs: Tensor) -> Tensor:
    """Entropy of each predictive distribution in nats, ``-sum_c p_c log p_c`` (``0 log 0 = 0``).

    Parameters
    ----------
    probs : Tensor, shape (n, C)
        Predictive class probabilities.

    Returns
    -------
    Tensor, shape (n,)
        Per-point entropies in ``[0, log C]``.
    """
    _check_probs(probs)
    return -torch.special.xlogy(probs, probs).sum(dim=1)


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


# ------------------------------------------------------------------------------------ OOD


def _check_scores(name: str, score: Tensor) -> Tensor:
    check_tensor(name, score, ndim=1, finite=False)
    if score.is_complex():
        raise ValueError(f"{name} must be real-valued, got dtype {score.dtype}")
    if score.is_floating_point() and bool(score.isnan().any()):
        raise ValueError(f"{name} contains NaN")
    return score


def ood_auroc(score_in: Tensor, score_out: Tensor) -> Tensor:
    """Area under the ROC curve for telling out-of-distribution from in-distribution points.

    A higher score means "more out-of-distribution". Computed exactly as the Mann-Whitney
    statistic ``P(s_out > s_in) + 0.5 P(s_out = s_in)`` over all pairs, in ``O(n log n)`` by
    sorting; ties count one half, as in ``sklearn.metrics.roc_auc_score``. Scores may be
    ``±inf``.

    Parameters
    ----------
    score_in : Tensor, shape (n_in,)
        Scores of in-distribution points (the negatives).
    score_out : Tensor, shape (n_out,)
        Scores of out-of-distribution points (the positives).

    Returns
    -------
    Tensor, shape ()
        In ``[0, 1]``; 0.5 is chance. Floating dtype of the scores (the default dtype for
        integer scores).
    """
    _check_scores("score_in", score_in)
    _check_scores("score_out", score_out)
    common = torch.promote_types(score_in.dtype, score_out.dtype)
    if common == torch.bool:
        common = torch.uint8
    sorted_in, _ = torch.sort(score_in.to(common))
    score_out = score_out.to(common)
    # For each positive: (#negatives below) + (#negatives below or equal) = 2 x its U count.
    below = torch.searchsorted(sorted_in, score_out, right=False)
    below_or_equal = torch.searchsorted(sorted_in, score_out, right=True)
    twice_u = (below + below_or_equal).sum()  # int64, exact
    dtype = _float_dtype(score_in, score_out)
    return twice_u.to(dtype) / (2.0 * score_in.shape[0] * score_out.shape[0])

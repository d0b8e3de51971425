"""Classification metrics: categorical NLL, accuracy, Brier score and predictive entropy.

``probs`` is ``(n, C)`` with rows on the probability simplex, ``y`` an integer tensor ``(n,)``
of labels in ``[0, C)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bdl.core.validation import check_choice, check_tensor
from bdl.metrics._checks import (
    _REDUCTIONS,
    Reduction,
    _check_classification,
    _check_labels,
    _check_probs,
    _reduce,
)

__all__ = ["accuracy", "brier_score", "categorical_nll", "predictive_entropy"]


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

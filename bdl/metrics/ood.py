"""Out-of-distribution detection: AUROC of a score separating OOD from in-distribution points."""

from __future__ import annotations

import torch
from torch import Tensor

from bdl.core.validation import check_tensor
from bdl.metrics._checks import _float_dtype

__all__ = ["ood_auroc"]


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

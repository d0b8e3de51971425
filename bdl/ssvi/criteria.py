"""Removal scores of sparse subspace VI for a coordinate ``theta ~ N(mu, sigma^2)``.

Low scores are removed first (Li, Miao, Qiu & Zhang, ICLR 2024, section 4.2). Closed forms of
the moments of the folded normal ``|theta|`` (Leone, Nelson & Nottingham, Technometrics 1961):

- ``"mean"``: ``|mu|``;
- ``"snr"``: ``|mu| / sigma``;
- ``"mean_abs"``: ``E|theta| = mu erf(mu / (sigma sqrt 2))
  + sigma sqrt(2 / pi) exp(-mu^2 / (2 sigma^2))``;
- ``"snr_abs"`` (default): ``E|theta| / sqrt(Var|theta|)`` with
  ``Var|theta| = mu^2 + sigma^2 - (E|theta|)^2``;
- ``"exp_abs"``: ``E exp(lam |theta|) = exp(lam^2 sigma^2 / 2 + lam mu) Phi(mu / sigma + lam sigma)
  + exp(lam^2 sigma^2 / 2 - lam mu) Phi(-mu / sigma + lam sigma)``;
- ``"snr_exp_abs"``: ``E exp(lam |theta|) / sd(exp(lam |theta|))``, the second moment being
  ``E exp(2 lam |theta|)``.

Scores are computed in float64 (the exponential moments overflow in float32 for moderate
``lam |mu|``); a non-finite score (``sigma = 0``) counts as 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["CRITERIA", "folded_normal_moments", "removal_score"]

CRITERIA = ("mean", "snr", "mean_abs", "snr_abs", "exp_abs", "snr_exp_abs")


def folded_normal_moments(mu: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """``E|theta|`` and ``Var|theta|`` for ``theta ~ N(mu, sigma^2)`` (elementwise)."""
    mean_abs = mu * torch.erf(mu / (sigma * math.sqrt(2.0))) + sigma * math.sqrt(
        2.0 / math.pi
    ) * torch.exp(-0.5 * (mu / sigma) ** 2)
    var_abs = (mu**2 + sigma**2 - mean_abs**2).clamp_min(0.0)
    return mean_abs, var_abs


def _exp_abs_moment(mu: Tensor, sigma: Tensor, lam: float) -> Tensor:
    """``E exp(lam |theta|)``, each term in log space before the sum."""
    base = 0.5 * lam**2 * sigma**2
    upper = base + lam * mu + torch.special.log_ndtr(mu / sigma + lam * sigma)
    lower = base - lam * mu + torch.special.log_ndtr(-mu / sigma + lam * sigma)
    return torch.logaddexp(upper, lower).exp()


def removal_score(
    mu: Tensor, sigma: Tensor, criterion: str = "snr_abs", lam: float = 1.0
) -> Tensor:
    """Score of each coordinate (higher is kept), shape of ``mu``.

    Parameters
    ----------
    mu, sigma : Tensor
        Means and standard deviations (same shape) of the active coordinates.
    criterion : str
        One of :data:`CRITERIA` (see the module docstring).
    lam : float
        ``lambda`` of the exponential criteria.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    mu, sigma = mu.detach().double(), sigma.detach().double()
    if criterion == "mean":
        score = mu.abs()
    elif criterion == "snr":
        score = mu.abs() / sigma
    elif criterion in ("mean_abs", "snr_abs"):
        mean_abs, var_abs = folded_normal_moments(mu, sigma)
        score = mean_abs if criterion == "mean_abs" else mean_abs / var_abs.sqrt()
    else:
        first = _exp_abs_moment(mu, sigma, lam)
        if criterion == "exp_abs":
            score = first
        else:
            second = _exp_abs_moment(mu, sigma, 2 * lam)
            score = first / (second - first**2).clamp_min(0.0).sqrt()
    return torch.nan_to_num(score, nan=0.0, posinf=torch.finfo(torch.float64).max)

"""Predictive class probabilities."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bdl.core.posterior_base import Posterior, as_size

__all__ = ["CategoricalPosterior"]


class CategoricalPosterior(Posterior):
    """Predictive class probabilities.

    ``mean`` is the probability vector (the expectation of the one-hot label) and ``variance``
    is ``p (1 - p)``, so ``m`` equals the number of classes ``C``. Draws are integer labels.

    Parameters
    ----------
    probs : Tensor, shape (..., n, C)
        Predictive class probabilities (rows sum to one).
    prob_samples : Tensor, shape (S, ..., n, C), optional
        The per-draw probabilities ``probs`` is the average of (MC samples, chain samples,
        ensemble members). Enables :meth:`mutual_information` and an exact
        :meth:`joint_log_prob` under the mixture.
    """

    def __init__(self, probs: Tensor, prob_samples: Tensor | None = None) -> None:
        if probs.dim() < 2:
            raise ValueError(f"probs must have shape (..., n, C), got {tuple(probs.shape)}")
        if prob_samples is not None and prob_samples.shape[1:] != probs.shape:
            raise ValueError(
                f"prob_samples has shape {tuple(prob_samples.shape)}, expected (S, "
                f"{', '.join(map(str, probs.shape))})"
            )
        self._probs = probs
        self.prob_samples = prob_samples

    @property
    def probs(self) -> Tensor:
        return self._probs

    @property
    def mean(self) -> Tensor:
        return self._probs

    @property
    def variance(self) -> Tensor:
        return self._probs * (1.0 - self._probs)

    @property
    def num_classes(self) -> int:
        return self._probs.shape[-1]

    @property
    def base_sample_shape(self) -> torch.Size:
        """One standard-normal variate per point: ``(..., n)``."""
        return self._probs.shape[:-1]

    def rsample_from_base_samples(self, sample_shape: torch.Size, base_samples: Tensor) -> Tensor:
        """Labels by inverse-CDF sampling of ``Phi(base_samples)``; not differentiable.

        Returns
        -------
        Tensor (long), shape ``(*sample_shape, ..., n)``
        """
        sample_shape = as_size(sample_shape)
        expected = sample_shape + self.base_sample_shape
        if base_samples.shape != expected:
            raise ValueError(
                f"base_samples has shape {tuple(base_samples.shape)}, expected {tuple(expected)}"
            )
        uniform = torch.special.ndtr(base_samples.to(dtype=self.dtype, device=self.device))
        cdf = self._probs.detach().cumsum(-1)
        cdf = cdf / cdf[..., -1:]
        cdf = cdf.expand(sample_shape + cdf.shape).contiguous()
        labels = torch.searchsorted(cdf, uniform.unsqueeze(-1).contiguous(), right=True)
        return labels.squeeze(-1).clamp_max(self.num_classes - 1)

    def affine(self, scale: Tensor | float, shift: Tensor | float = 0.0) -> CategoricalPosterior:
        """Only the identity map applies to labels: returns ``self`` for ``scale=1, shift=0``.

        Raises
        ------
        ValueError
            For any other map (class labels are not real-valued outcomes).
        """
        scale, shift = self._affine_args(scale, shift)
        if bool((scale != 1).any()) or bool((shift != 0).any()):
            raise ValueError(
                "CategoricalPosterior cannot be scaled or shifted: its outputs are class labels"
            )
        return self

    def to(self, dtype: torch.dtype) -> CategoricalPosterior:
        samples = None if self.prob_samples is None else self.prob_samples.to(dtype)
        return CategoricalPosterior(self._probs.to(dtype), prob_samples=samples)

    def _check_labels(self, y: object) -> Tensor:
        """``y`` as a long tensor of class indices of shape ``(..., n)``, checked."""
        hint = (
            "; an estimator's original labels map to indices through its classes_: "
            "np.searchsorted(estimator.classes_, y)"
        )
        try:
            y = torch.as_tensor(y, device=self.device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"y must hold integer class indices in [0, {self.num_classes}), got "
                f"{type(y).__name__} that is not numeric{hint}"
            ) from err
        if y.dtype.is_floating_point or y.dtype.is_complex or y.shape != self._probs.shape[:-1]:
            raise ValueError(
                f"y must hold integer class indices of shape {tuple(self._probs.shape[:-1])}, "
                f"got dtype {y.dtype} and shape {tuple(y.shape)}{hint}"
            )
        if bool(((y < 0) | (y >= self.num_classes)).any()):
            raise ValueError(f"y holds labels outside [0, {self.num_classes}){hint}")
        return y

    def log_prob(self, y: Tensor) -> Tensor:
        """Log predictive mass of integer class indices ``y`` of shape ``(..., n)``.

        Raises
        ------
        ValueError
            Naming ``y``: labels that are not integer indices in ``[0, C)`` (string or other
            original labels of an estimator map to indices through its ``classes_``).
        """
        y = self._check_labels(y)
        picked = self._probs.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)
        return picked.clamp_min(torch.finfo(self.dtype).tiny).log()

    def joint_log_prob(self, y: Tensor) -> Tensor:
        """Joint log mass of the labels of all ``n`` points.

        With ``prob_samples`` this is the mixture's joint, ``log mean_s prod_i p_s(y_i)``
        (points are dependent through the shared draw); otherwise the points are independent.
        """
        if self.prob_samples is None:
            return self.log_prob(y).sum(-1)
        y = self._check_labels(y)
        idx = y.long().unsqueeze(-1).expand((self.prob_samples.shape[0],) + y.shape + (1,))
        per_draw = self.prob_samples.gather(-1, idx).squeeze(-1)
        per_draw = per_draw.clamp_min(torch.finfo(self.dtype).tiny).log().sum(-1)
        return torch.logsumexp(per_draw, 0) - math.log(per_draw.shape[0])

    def entropy(self) -> Tensor:
        """Predictive (total) entropy, shape ``(..., n)``."""
        p = self._probs
        return -(p * p.clamp_min(torch.finfo(self.dtype).tiny).log()).sum(-1)

    def mutual_information(self) -> Tensor:
        """Epistemic part of the entropy (BALD), shape ``(..., n)``; needs ``prob_samples``."""
        if self.prob_samples is None:
            raise ValueError("mutual_information needs prob_samples; this posterior has none")
        ps = self.prob_samples
        expected = -(ps * ps.clamp_min(torch.finfo(self.dtype).tiny).log()).sum(-1).mean(0)
        return (self.entropy() - expected).clamp_min(0)

    def prediction_set(self, level: float = 0.95) -> Tensor:
        """Smallest set of most probable classes whose mass reaches ``level``.

        Returns
        -------
        Tensor (bool), shape (..., n, C)
        """
        if not 0.0 < level <= 1.0:
            raise ValueError(f"level must lie in (0, 1], got {level}")
        sorted_p, order = self._probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the classes ranked above
        keep_sorted = before < level
        return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)

    def __repr__(self) -> str:
        s = "" if self.prob_samples is None else f", draws={self.prob_samples.shape[0]}"
        return f"CategoricalPosterior(shape={tuple(self._probs.shape)}{s})"

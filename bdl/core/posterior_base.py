"""The abstract predictive distribution every posterior kind implements.

The kinds (Gaussian, categorical, sample) live in their own modules and are re-exported by
:mod:`bdl.core.posterior`. Shapes follow BoTorch: ``mean`` and ``variance`` are
``(..., n, m)``; samples are ``(*sample_shape, ..., n, m)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = ["Posterior"]

LOG_2PI = math.log(2.0 * math.pi)


def as_size(sample_shape: torch.Size | tuple[int, ...] | int) -> torch.Size:
    if isinstance(sample_shape, int):
        return torch.Size([sample_shape])
    return torch.Size(sample_shape)


def normal_quantile(level: float) -> float:
    """Two-sided standard-normal quantile z with P(|Z| <= z) = level."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    return math.sqrt(2.0) * torch.special.erfinv(torch.tensor(level, dtype=torch.float64)).item()


class Posterior(ABC):
    """Predictive distribution of a model at a batch of ``n`` inputs with ``m`` outputs."""

    @property
    @abstractmethod
    def mean(self) -> Tensor:
        """Predictive mean, shape ``(..., n, m)``."""

    @property
    @abstractmethod
    def variance(self) -> Tensor:
        """Marginal predictive variance, shape ``(..., n, m)``."""

    @property
    def stddev(self) -> Tensor:
        """Marginal predictive standard deviation, shape ``(..., n, m)``."""
        return self.variance.clamp_min(0).sqrt()

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mean.dtype

    @property
    def batch_shape(self) -> torch.Size:
        """Leading batch shape ``...`` (everything before ``(n, m)``)."""
        return self.mean.shape[:-2]

    @property
    def base_sample_shape(self) -> torch.Size:
        """Shape of the standard-normal base samples for one draw: ``(..., n, m)``."""
        return self.mean.shape

    @abstractmethod
    def rsample_from_base_samples(self, sample_shape: torch.Size, base_samples: Tensor) -> Tensor:
        """Draws as a deterministic function of standard-normal ``base_samples``.

        Parameters
        ----------
        sample_shape : torch.Size
            Leading shape of the draws.
        base_samples : Tensor, shape ``(*sample_shape, *base_sample_shape)``
            Standard-normal variates (e.g. from a QMC sampler).

        Returns
        -------
        Tensor, shape ``(*sample_shape, ..., n, m)``
        """

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> Tensor:
        """Draws, differentiable with respect to the posterior's parameters where possible.

        Returns
        -------
        Tensor, shape ``(*sample_shape, ..., n, m)``
        """
        sample_shape = as_size(sample_shape)
        base = torch.randn(
            sample_shape + self.base_sample_shape, dtype=self.dtype, device=self.device
        )
        return self.rsample_from_base_samples(sample_shape, base)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> Tensor:
        """Draws without gradient; same shape as :meth:`rsample`."""
        with torch.no_grad():
            return self.rsample(sample_shape)

    @abstractmethod
    def log_prob(self, y: Tensor) -> Tensor:
        """Per-point predictive log density (or mass) of ``y``.

        Parameters
        ----------
        y : Tensor, shape ``(..., n, m)``
            Observations (``(..., n)`` is accepted when ``m == 1``).

        Returns
        -------
        Tensor, shape ``(..., n)``

        Raises
        ------
        ValueError
            Naming ``y``: a shape that does not match, or NaN / inf entries.
        """

    @abstractmethod
    def joint_log_prob(self, y: Tensor) -> Tensor:
        """Joint predictive log density of all ``n`` points; shape ``(...)``."""

    @abstractmethod
    def affine(self, scale: Tensor | float, shift: Tensor | float = 0.0) -> Posterior:
        """The distribution of ``scale * f + shift`` (an outcome transform undone).

        Parameters
        ----------
        scale : float or Tensor, shape (m,)
            Positive per-output scale.
        shift : float or Tensor, shape (m,)
            Per-output shift.

        Returns
        -------
        Posterior of the same kind, shapes unchanged.
        """

    def confidence_region(self, level: float = 0.95) -> tuple[Tensor, Tensor]:
        """Central marginal interval holding ``level`` of the predictive mass per output.

        Gaussian and sample posteriors have one; a categorical posterior has none (its
        outputs are labels: use :meth:`CategoricalPosterior.prediction_set`).

        Returns
        -------
        lower, upper : Tensor, shape (..., n, m)
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no confidence_region: its outputs are not real-valued "
            "(a CategoricalPosterior has prediction_set)"
        )

    @abstractmethod
    def to(self, dtype: torch.dtype) -> Posterior:
        """The same distribution with its tensors in floating ``dtype`` (differentiable)."""

    def _affine_args(self, scale: Tensor | float, shift: Tensor | float) -> tuple[Tensor, Tensor]:
        """``scale`` and ``shift`` as tensors broadcastable to ``(m,)``, checked."""
        scale = torch.as_tensor(scale, dtype=self.dtype, device=self.device)
        shift = torch.as_tensor(shift, dtype=self.dtype, device=self.device)
        m = self.mean.shape[-1]
        for name, value in (("scale", scale), ("shift", shift)):
            if value.dim() > 1 or (value.dim() == 1 and value.shape[0] not in (1, m)):
                raise ValueError(
                    f"{name} must be a scalar or have shape ({m},), got {tuple(value.shape)}"
                )
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} contains NaN or inf")
        if bool((scale <= 0).any()):
            raise ValueError("scale must be positive")
        return scale, shift

    def _check_y(self, y: Tensor) -> Tensor:
        y = torch.as_tensor(y, dtype=self.dtype, device=self.device)
        target = self.mean.shape
        if y.shape == target[:-1] and target[-1] == 1:
            y = y.unsqueeze(-1)
        try:
            torch.broadcast_shapes(y.shape, target)
        except RuntimeError as err:
            raise ValueError(
                f"y has shape {tuple(y.shape)}, expected one broadcastable to {tuple(target)}"
            ) from err
        if y.shape[-2:] != target[-2:]:
            raise ValueError(
                f"y has shape {tuple(y.shape)}; its last two dims must be (n, m) = "
                f"{tuple(target[-2:])}"
            )
        if not bool(torch.isfinite(y).all()):
            raise ValueError("y contains NaN or inf; densities are of finite observations")
        return y

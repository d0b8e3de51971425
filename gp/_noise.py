"""The observation-noise variance of the exact and state-space GPs, behind a gpytorch constraint.

``noise = GreaterThan(noise_lower_bound).transform(raw_noise)`` (a softplus shifted by the
bound), as gpytorch's ``GaussianLikelihood`` parameterises its noise; the default bound is
:data:`gp.likelihoods.NOISE_LOWER_BOUND`.
"""

from __future__ import annotations

import math

import torch
from gpytorch.constraints import GreaterThan
from torch import Tensor, nn

from gp.likelihoods import NOISE_LOWER_BOUND

__all__ = ["NoiseMixin"]


class NoiseMixin:
    """``noise`` property of a module holding ``raw_noise`` and ``raw_noise_constraint``."""

    raw_noise: nn.Parameter
    raw_noise_constraint: GreaterThan

    def _init_noise(
        self,
        noise: float | Tensor,
        lower_bound: float = NOISE_LOWER_BOUND,
        shape: torch.Size = torch.Size(),
    ) -> None:
        """Register ``raw_noise`` (shape ``shape``) and its constraint; ValueErrors name noise."""
        if isinstance(lower_bound, bool) or not isinstance(lower_bound, (int, float)):
            raise ValueError(f"noise_lower_bound must be a number >= 0, got {lower_bound!r}")
        if not (math.isfinite(lower_bound) and lower_bound >= 0):
            raise ValueError(f"noise_lower_bound must be finite and >= 0, got {lower_bound}")
        self.raw_noise_constraint = GreaterThan(float(lower_bound))
        self._noise_shape = torch.Size(shape)
        floating = isinstance(noise, Tensor) and noise.is_floating_point()
        dtype = noise.dtype if floating else torch.get_default_dtype()
        value = self._check_noise(noise, torch.float64)  # rounded once, at the end
        raw = self.raw_noise_constraint.inverse_transform(value)
        self.raw_noise = nn.Parameter(raw.to(dtype))

    @property
    def noise_lower_bound(self) -> float:
        """Lower bound of the noise variance (the constraint's)."""
        return float(self.raw_noise_constraint.lower_bound)

    def _check_noise(self, noise: float | Tensor, dtype: torch.dtype) -> Tensor:
        """``noise`` as a tensor of the noise shape, checked to be finite and above the bound."""
        if isinstance(noise, bool) or noise is None or isinstance(noise, str):
            raise ValueError(f"noise must be a positive number, got {noise!r}")
        try:
            value = torch.as_tensor(noise, dtype=dtype).detach().clone()
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"noise must be a positive number, got {noise!r}") from err
        bound = self.noise_lower_bound
        if not bool((torch.isfinite(value) & (value > bound)).all()):
            raise ValueError(
                f"noise must be a finite variance above noise_lower_bound = {bound:g}, "
                f"got {noise!r}"
            )
        try:
            return value.expand(self._noise_shape).clone()
        except RuntimeError as err:
            raise ValueError(
                f"noise has shape {tuple(value.shape)}, expected one broadcastable to "
                f"{tuple(self._noise_shape)}"
            ) from err

    @property
    def noise(self) -> Tensor:
        """Observation-noise variance (above ``noise_lower_bound``), shape of ``raw_noise``."""
        return self.raw_noise_constraint.transform(self.raw_noise)

    @noise.setter
    def noise(self, value: float | Tensor) -> None:
        value = self._check_noise(value, torch.float64)
        raw = self.raw_noise_constraint.inverse_transform(value)
        with torch.no_grad():
            self.raw_noise.copy_(raw.reshape(self.raw_noise.shape))

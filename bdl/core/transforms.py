"""Input and outcome transforms: fitted on training data, undone on posteriors.

:class:`Normalize` maps inputs column-wise to zero mean and unit scale (or to the unit cube
from bounds, as BoTorch's ``Normalize``); :class:`Standardize` maps outcomes to zero mean
and unit standard deviation and undoes that on a posterior with ``Posterior.affine``, as
scikit-learn's ``normalize_y`` and BoTorch's ``Standardize`` do. Both are ``nn.Module``s
whose statistics are buffers (they follow ``.to(device)`` and round-trip through
``state_dict``), and both are differentiable in their input.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bdl.core.posterior import Posterior
from bdl.core.validation import check_choice

__all__ = ["Normalize", "Standardize", "column_scale"]


def column_scale(values: Tensor, center: Tensor) -> Tensor:
    """Column standard deviations, 1 where a column is constant (to relative precision).

    Parameters
    ----------
    values : Tensor, shape (n, k)
    center : Tensor, shape (k,)
        The column means.

    Returns
    -------
    Tensor, shape (k,)
    """
    scale = values.std(0, unbiased=False) if values.shape[0] > 1 else torch.zeros_like(center)
    tiny = 1e-12 * center.abs().clamp_min(1.0)
    return torch.where(scale > tiny, scale, torch.ones_like(scale))


def _as_matrix(values: Tensor, name: str) -> Tensor:
    values = torch.as_tensor(values)
    if values.dim() == 1:
        values = values.unsqueeze(-1)
    if values.dim() != 2 or values.shape[0] == 0:
        raise ValueError(f"{name} must have shape (n, k) with n >= 1, got {tuple(values.shape)}")
    if not values.is_floating_point():
        values = values.to(torch.get_default_dtype())
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return values


class _Affine(nn.Module):
    """``z = (x - offset) / scale`` per column, with buffers ``offset`` and ``scale``."""

    #: name of the transformed argument in error messages
    _arg = "X"

    def __init__(self, width: int) -> None:
        super().__init__()
        # statistics kept in float64 whatever the default dtype (cast to the input on use)
        self.register_buffer("offset", torch.zeros(width, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(width, dtype=torch.float64))

    def _params(self, like: Tensor) -> tuple[Tensor, Tensor]:
        return self.offset.to(like), self.scale.to(like)

    def _check_width(self, values: Tensor, name: str) -> None:
        if values.shape[-1] != self.offset.shape[0]:
            raise ValueError(
                f"{name} must have {self.offset.shape[0]} columns (last dim), got "
                f"{values.shape[-1]}"
            )

    def transform(self, values: Tensor) -> Tensor:
        """Map ``values`` of shape (..., k) to the transformed units."""
        self._check_width(values, self._arg)
        offset, scale = self._params(values)
        return (values - offset) / scale

    def untransform(self, values: Tensor) -> Tensor:
        """Map transformed ``values`` of shape (..., k) back to the original units."""
        self._check_width(values, self._arg)
        offset, scale = self._params(values)
        return values * scale + offset

    def forward(self, values: Tensor) -> Tensor:
        return self.transform(values)


class Normalize(_Affine):
    """Input transform: per-column ``(x - offset) / scale``.

    Parameters
    ----------
    d : int
        Number of input columns.
    method : {"zscore", "bounds"}, default "zscore"
        ``"zscore"``: mean 0 and standard deviation 1 on the data given to :meth:`fit`
        (constant columns keep scale 1); ``"bounds"``: the unit cube of ``bounds``.
    bounds : Tensor, shape (2, d), optional
        Lower and upper bounds for ``method="bounds"`` (else the data's minimum and maximum).
    """

    def __init__(self, d: int, method: str = "zscore", bounds: Tensor | None = None) -> None:
        super().__init__(d)
        self.method = check_choice("method", method, ("zscore", "bounds"))
        if bounds is not None:
            bounds = torch.as_tensor(bounds).to(torch.float64)  # the buffers' precision
            if bounds.shape != (2, d) or not bool((bounds[1] > bounds[0]).all()):
                raise ValueError(f"bounds must have shape (2, {d}) with upper > lower")
            self._set(bounds[0], bounds[1] - bounds[0])
        self.fixed_bounds = bounds is not None

    def _set(self, offset: Tensor, scale: Tensor) -> None:
        self.offset = offset.detach().to(torch.float64).clone()
        self.scale = scale.detach().to(torch.float64).clone()

    def fit(self, X: Tensor) -> Normalize:
        """Fit the column statistics to training inputs ``X`` (n, d); returns self."""
        X = _as_matrix(X, "X")
        self._check_width(X, "X")
        if self.method == "zscore":
            center = X.mean(0)
            self._set(center, column_scale(X, center))
        elif not self.fixed_bounds:
            low, high = X.amin(0), X.amax(0)
            span = high - low
            self._set(low, torch.where(span > 0, span, torch.ones_like(span)))
        return self


class Standardize(_Affine):
    """Outcome transform: per-output ``(y - mean) / std``, undone on posteriors.

    Parameters
    ----------
    m : int
        Number of outputs.
    """

    _arg = "Y"

    def fit(self, Y: Tensor) -> Standardize:
        """Fit the output means and standard deviations to ``Y`` (n, m) or (n,); returns self."""
        Y = _as_matrix(Y, "Y")
        self._check_width(Y, "Y")
        center = Y.mean(0)
        self.offset = center.detach().to(torch.float64).clone()
        self.scale = column_scale(Y, center).detach().to(torch.float64).clone()
        return self

    def untransform_posterior(self, posterior: Posterior) -> Posterior:
        """The posterior of ``y = std * z + mean`` given the posterior of ``z``."""
        m = posterior.mean.shape[-1]
        if m != self.offset.shape[0]:
            raise ValueError(
                f"posterior has {m} outputs but this Standardize was built for "
                f"{self.offset.shape[0]}"
            )
        offset, scale = self._params(posterior.mean)
        return posterior.affine(scale, offset)

    def log_det_jacobian(self, n: int) -> float:
        """``log |dy/dz|`` for ``n`` observations: ``n * sum(log std)``.

        A density of standardised targets converts to the original units by subtracting
        this (``log p(y) = log p(z) - n sum_j log s_j``).
        """
        return float(n * sum(math.log(float(s)) for s in self.scale))

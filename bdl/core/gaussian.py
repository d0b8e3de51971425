"""Gaussian predictive distributions (diagonal or joint covariance)."""

from __future__ import annotations

import torch
from torch import Tensor

from bdl.core.linalg import psd_safe_cholesky
from bdl.core.posterior_base import LOG_2PI, Posterior, as_size, normal_quantile

__all__ = ["GaussianPosterior"]


class GaussianPosterior(Posterior):
    """Gaussian predictive distribution with diagonal or full joint covariance.

    Parameters
    ----------
    mean : Tensor, shape (..., n, m)
        Predictive mean.
    variance : Tensor, shape (..., n, m), optional
        Marginal variances; the points and outputs are then independent.
    covariance : Tensor, shape (..., n*m, n*m), optional
        Full joint covariance in interleaved order (row ``i*m + j`` is point ``i``, output
        ``j``; for ``m = 1`` this is simply ``(..., n, n)``). Give exactly one of
        ``variance`` and ``covariance``.
    """

    def __init__(
        self, mean: Tensor, variance: Tensor | None = None, covariance: Tensor | None = None
    ) -> None:
        if mean.dim() < 2:
            raise ValueError(f"mean must have shape (..., n, m), got {tuple(mean.shape)}")
        if (variance is None) == (covariance is None):
            raise ValueError("give exactly one of variance and covariance")
        n, m = mean.shape[-2:]
        if variance is not None:
            if variance.shape != mean.shape:
                raise ValueError(
                    f"variance has shape {tuple(variance.shape)}, expected {tuple(mean.shape)}"
                )
        else:
            nm = n * m
            if covariance.shape[-2:] != (nm, nm) or covariance.shape[:-2] != mean.shape[:-2]:
                raise ValueError(
                    f"covariance has shape {tuple(covariance.shape)}, expected "
                    f"{tuple(mean.shape[:-2]) + (nm, nm)}"
                )
        self._mean = mean
        self._variance = variance
        self._covariance = covariance
        self._scale_tril: Tensor | None = None

    # -- moments ---------------------------------------------------------------------------
    @property
    def mean(self) -> Tensor:
        return self._mean

    @property
    def variance(self) -> Tensor:
        if self._variance is not None:
            return self._variance
        return self._covariance.diagonal(dim1=-2, dim2=-1).reshape(self._mean.shape)

    @property
    def is_joint(self) -> bool:
        """Whether a full joint covariance across points is held."""
        return self._covariance is not None

    @property
    def covariance_matrix(self) -> Tensor:
        """Joint covariance, shape ``(..., n*m, n*m)`` (interleaved; diagonal if marginal)."""
        if self._covariance is not None:
            return self._covariance
        return torch.diag_embed(self._variance.flatten(-2))

    @property
    def scale_tril(self) -> Tensor:
        """Cholesky factor of :attr:`covariance_matrix` (jitter added if needed, with a warning)."""
        # Only a factor without an autograd graph is cached: a cached factor computed under
        # no_grad would silently cut gradients later, and a cached graph would be freed by the
        # first backward pass.
        source = self._variance if self._covariance is None else self._covariance
        needs_graph = torch.is_grad_enabled() and source.requires_grad
        if self._scale_tril is not None and not needs_graph:
            return self._scale_tril
        if self._covariance is None:
            factor = torch.diag_embed(self._variance.clamp_min(0).sqrt().flatten(-2))
        else:
            factor = psd_safe_cholesky(self._covariance)
        if not needs_graph:
            self._scale_tril = factor
        return factor

    def add_observation_noise(self, noise_variance: Tensor | float) -> GaussianPosterior:
        """Predictive of ``y = f + eps`` with independent ``eps ~ N(0, noise_variance)``.

        Parameters
        ----------
        noise_variance : float or Tensor broadcastable to ``(..., n, m)``
        """
        noise = torch.as_tensor(noise_variance, dtype=self.dtype, device=self.device)
        if bool((noise < 0).any()):
            raise ValueError("noise_variance must be non-negative")
        noise = noise.expand(self._mean.shape)
        if self._covariance is None:
            return GaussianPosterior(self._mean, variance=self._variance + noise)
        cov = self._covariance + torch.diag_embed(noise.flatten(-2))
        return GaussianPosterior(self._mean, covariance=cov)

    def affine(self, scale: Tensor | float, shift: Tensor | float = 0.0) -> GaussianPosterior:
        """Distribution of ``scale * f + shift`` with per-output ``scale`` and ``shift`` (m,)."""
        scale, shift = self._affine_args(scale, shift)
        mean = self._mean * scale + shift
        if self._covariance is None:
            return GaussianPosterior(mean, variance=self._variance * scale.square())
        n, m = self._mean.shape[-2:]
        s = scale.expand(m).repeat(n)  # interleaved order: row i*m + j is output j
        cov = self._covariance * s.unsqueeze(-1) * s
        return GaussianPosterior(mean, covariance=cov)

    def to(self, dtype: torch.dtype) -> GaussianPosterior:
        if self._covariance is None:
            return GaussianPosterior(self._mean.to(dtype), variance=self._variance.to(dtype))
        return GaussianPosterior(self._mean.to(dtype), covariance=self._covariance.to(dtype))

    # -- sampling --------------------------------------------------------------------------
    def rsample_from_base_samples(self, sample_shape: torch.Size, base_samples: Tensor) -> Tensor:
        sample_shape = as_size(sample_shape)
        expected = sample_shape + self.base_sample_shape
        if base_samples.shape != expected:
            raise ValueError(
                f"base_samples has shape {tuple(base_samples.shape)}, expected {tuple(expected)}"
            )
        base_samples = base_samples.to(dtype=self.dtype, device=self.device)
        if self._covariance is None:
            return self._mean + self.stddev * base_samples
        flat = base_samples.flatten(-2).unsqueeze(-1)  # (*s, ..., nm, 1)
        draws = (self.scale_tril @ flat).squeeze(-1).reshape(base_samples.shape)
        return self._mean + draws

    # -- densities -------------------------------------------------------------------------
    def log_prob(self, y: Tensor) -> Tensor:
        y = self._check_y(y)
        m = self._mean.shape[-1]
        if self._covariance is None or m == 1:
            var = self.variance
            per_output = -0.5 * ((y - self._mean) ** 2 / var + var.log() + LOG_2PI)
            return per_output.sum(-1)
        # per-point m x m blocks of the joint covariance
        n = self._mean.shape[-2]
        cov = self._covariance.unflatten(-1, (n, m)).unflatten(-3, (n, m))  # (..., n,m, n,m)
        blocks = cov.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)  # (..., n, m, m)
        dist = torch.distributions.MultivariateNormal(
            self._mean, scale_tril=psd_safe_cholesky(blocks)
        )
        return dist.log_prob(y)

    def joint_log_prob(self, y: Tensor) -> Tensor:
        y = self._check_y(y)
        if self._covariance is None:
            return self.log_prob(y).sum(-1)
        resid = (y - self._mean).flatten(-2).unsqueeze(-1)
        tril = self.scale_tril
        batch = torch.broadcast_shapes(resid.shape[:-2], tril.shape[:-2])
        white = torch.linalg.solve_triangular(
            tril.expand(batch + tril.shape[-2:]),
            resid.expand(batch + resid.shape[-2:]),
            upper=False,
        ).squeeze(-1)
        logdet = tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        k = white.shape[-1]
        return -0.5 * (white.pow(2).sum(-1) + k * LOG_2PI) - logdet

    def confidence_region(self, level: float = 0.95) -> tuple[Tensor, Tensor]:
        """Central marginal interval ``mean ± z·std`` holding ``level`` of the mass.

        Returns
        -------
        lower, upper : Tensor, shape (..., n, m)
        """
        z = normal_quantile(level)
        half = z * self.stddev
        return self._mean - half, self._mean + half

    def __repr__(self) -> str:
        kind = "joint" if self.is_joint else "diagonal"
        return f"GaussianPosterior(shape={tuple(self._mean.shape)}, covariance={kind})"

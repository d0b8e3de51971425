"""Gaussian predictive distributions (diagonal or joint covariance).

A zero variance is the point mass at the mean (the limit of the Gaussian as the variance
goes to zero): an output with zero variance contributes the log of a probability *mass* to
``log_prob`` (0 at the mean, ``-inf`` anywhere else) and the other outputs their log
densities, so that no density is ever NaN. Negative, NaN or infinite variances and
non-finite means are refused when the posterior is built.
"""

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

    Raises
    ------
    ValueError
        If ``mean`` is not finite, ``variance`` holds negative, NaN or infinite entries, or
        ``covariance`` non-finite entries or a negative diagonal (one device sync).

    Notes
    -----
    Zero variances are point masses (see the module docstring). In a joint covariance a
    zero diagonal entry ``i`` forces row and column ``i`` to zero (positive
    semi-definiteness), so the distribution factorises into the point mass of coordinate
    ``i`` and a Gaussian over the others; :meth:`joint_log_prob` and the factor used for
    sampling treat those coordinates exactly that way.
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
        _check_moments(mean, variance, covariance)
        self._mean = mean
        self._variance = variance
        self._covariance = covariance
        self._factor: tuple[Tensor, Tensor | None] | None = None

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
        """Cholesky factor of :attr:`covariance_matrix` (jitter added if needed, with a warning).

        Rows of zero-variance coordinates (point masses) are zero.
        """
        factor, atom = self._joint_factor()
        if atom is None:
            return factor
        return factor * (~atom).unsqueeze(-1).to(factor.dtype)

    def _joint_factor(self) -> tuple[Tensor, Tensor | None]:
        """``(L, atom)``: ``L`` factors the covariance with every point-mass coordinate
        (``atom``, a bool mask, or None when there is none) replaced by a unit variance."""
        # Only a factor without an autograd graph is cached: a cached factor computed under
        # no_grad would silently cut gradients later, and a cached graph would be freed by the
        # first backward pass.
        source = self._variance if self._covariance is None else self._covariance
        needs_graph = torch.is_grad_enabled() and source.requires_grad
        if self._factor is not None and not needs_graph:
            return self._factor
        if self._covariance is None:
            factor = (torch.diag_embed(self._variance.sqrt().flatten(-2)), None)
        else:
            factor = masked_cholesky(self._covariance)
        if not needs_graph:
            self._factor = factor
        return factor

    def add_observation_noise(self, noise_variance: Tensor | float) -> GaussianPosterior:
        """Predictive of ``y = f + eps`` with independent ``eps ~ N(0, noise_variance)``.

        Parameters
        ----------
        noise_variance : float or Tensor broadcastable to ``(..., n, m)``
        """
        noise = torch.as_tensor(noise_variance, dtype=self.dtype, device=self.device)
        if not bool(((noise >= 0) & torch.isfinite(noise)).all()):
            raise ValueError("noise_variance must be finite and non-negative")
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
        """Per-point log density of ``y``; a zero-variance output adds its log mass (0 or -inf)."""
        y = self._check_y(y)
        m = self._mean.shape[-1]
        if self._covariance is None or m == 1:
            return point_mass_normal_log_prob(y, self._mean, self.variance).sum(-1)
        # per-point m x m blocks of the joint covariance
        n = self._mean.shape[-2]
        cov = self._covariance.unflatten(-1, (n, m)).unflatten(-3, (n, m))  # (..., n,m, n,m)
        blocks = cov.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)  # (..., n, m, m)
        return masked_log_density(y - self._mean, *masked_cholesky(blocks))

    def joint_log_prob(self, y: Tensor) -> Tensor:
        y = self._check_y(y)
        if self._covariance is None:
            return self.log_prob(y).sum(-1)
        return masked_log_density((y - self._mean).flatten(-2), *self._joint_factor())

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


def _check_moments(mean: Tensor, variance: Tensor | None, covariance: Tensor | None) -> None:
    """Refuse non-finite means and negative or non-finite variances (one device sync)."""
    if variance is not None:
        ok_var = (torch.isfinite(variance) & (variance >= 0)).all()
    else:
        diagonal = covariance.diagonal(dim1=-2, dim2=-1)
        ok_var = torch.isfinite(covariance).all() & (diagonal >= 0).all()
    ok_mean, ok_var = torch.stack([torch.isfinite(mean).all(), ok_var]).tolist()
    if not ok_mean:
        raise ValueError("mean contains NaN or inf: a Gaussian posterior needs a finite mean")
    if not ok_var:
        name = "variance" if variance is not None else "covariance"
        what = "entries" if variance is not None else "entries or diagonal"
        raise ValueError(
            f"{name} has negative, NaN or infinite {what}: a Gaussian posterior needs finite "
            "variances >= 0 (zero is a point mass)"
        )


def point_mass_normal_log_prob(y: Tensor, mean: Tensor, variance: Tensor) -> Tensor:
    """Elementwise ``log N(y | mean, variance)``; where ``variance == 0``, the log mass of the
    point mass at ``mean`` (0 at ``mean``, -inf elsewhere). Gradients stay finite."""
    atom = variance == 0
    safe = torch.where(atom, torch.ones_like(variance), variance)
    resid = y - mean
    density = -0.5 * (resid.square() / safe + safe.log() + LOG_2PI)
    mass = torch.where(resid == 0, 0.0, -torch.inf).to(density.dtype)
    return torch.where(atom, mass, density)


def masked_cholesky(cov: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(L, atom)`` for PSD matrices ``cov`` (..., k, k): ``atom`` marks the zero diagonal
    entries (point masses; None if there are none) and ``L`` is the Cholesky factor of
    ``cov`` with their rows and columns replaced by those of the identity (jitter added and
    reported if needed, :func:`bdl.core.linalg.psd_safe_cholesky`)."""
    atom = cov.diagonal(dim1=-2, dim2=-1) == 0
    if not bool(atom.any()):
        return psd_safe_cholesky(cov), None
    keep = ~atom
    both = keep.unsqueeze(-1) & keep.unsqueeze(-2)
    masked = torch.where(both, cov, torch.zeros_like(cov)) + torch.diag_embed(atom.to(cov.dtype))
    return psd_safe_cholesky(masked), atom


def masked_log_density(resid: Tensor, factor: Tensor, atom: Tensor | None) -> Tensor:
    """Joint log density of residuals ``resid`` (..., k) under ``(factor, atom)`` from
    :func:`masked_cholesky`: a Gaussian over the other coordinates times the point masses
    at zero of the ``atom`` coordinates (log mass 0 if all their residuals are 0, else -inf)."""
    if atom is not None:
        on_atom = torch.where(atom, resid == 0, True).all(-1)
        resid = torch.where(atom, torch.zeros_like(resid), resid)
    batch = torch.broadcast_shapes(resid.shape[:-1], factor.shape[:-2])
    white = torch.linalg.solve_triangular(
        factor.expand(batch + factor.shape[-2:]),
        resid.unsqueeze(-1).expand(batch + resid.shape[-1:] + (1,)),
        upper=False,
    ).squeeze(-1)
    logdet = factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    k = resid.shape[-1] if atom is None else (~atom).sum(-1).to(resid.dtype)
    out = -0.5 * (white.pow(2).sum(-1) + k * LOG_2PI) - logdet
    if atom is None:
        return out
    return torch.where(on_atom, out, torch.full_like(out, -torch.inf))

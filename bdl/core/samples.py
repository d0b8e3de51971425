"""Equal-weight mixtures of function draws (chains, ensembles, weight samples)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bdl.core.gaussian import GaussianPosterior, point_mass_normal_log_prob
from bdl.core.posterior_base import Posterior, as_size

__all__ = ["SamplePosterior"]


class SamplePosterior(Posterior):
    """Equal-weight mixture of function draws, optionally with Gaussian observation noise.

    The predictive is ``p(y) = (1/S) sum_s N(y | f_s, noise_s)``; without noise, densities use
    the moment-matched Gaussian (the empirical distribution of draws has none). Where that
    Gaussian has zero variance (one draw, or draws that agree at a point) it is the point
    mass at the draws, and a member with zero noise variance is the point mass at its draw:
    their ``log_prob`` is a log mass, 0 on the atom and -inf elsewhere
    (:class:`~bdl.core.gaussian.GaussianPosterior`), never NaN.

    Parameters
    ----------
    samples : Tensor, shape (S, ..., n, m)
        Function draws ``f_s`` (chain samples, ensemble members, weight samples).
    noise_variance : float or Tensor broadcastable to (S, ..., n, m), optional
        Observation-noise variance of each draw (e.g. each chain sample's noise estimate).
    """

    def __init__(self, samples: Tensor, noise_variance: Tensor | float | None = None) -> None:
        if samples.dim() < 3:
            raise ValueError(f"samples must have shape (S, ..., n, m), got {tuple(samples.shape)}")
        self.samples = samples
        if noise_variance is not None:
            noise_variance = torch.as_tensor(
                noise_variance, dtype=samples.dtype, device=samples.device
            )
            if not bool(((noise_variance >= 0) & torch.isfinite(noise_variance)).all()):
                raise ValueError("noise_variance must be finite and non-negative")
            noise_variance = noise_variance.expand(samples.shape)
        self.noise_variance = noise_variance

    @property
    def num_samples(self) -> int:
        return self.samples.shape[0]

    @property
    def mean(self) -> Tensor:
        return self.samples.mean(0)

    @property
    def variance(self) -> Tensor:
        """Mixture variance: spread of the draws plus mean noise variance."""
        var = self.samples.var(0, unbiased=False)
        if self.noise_variance is not None:
            var = var + self.noise_variance.mean(0)
        return var

    @property
    def covariance_matrix(self) -> Tensor:
        """Mixture covariance across points and outputs, ``(..., n*m, n*m)`` interleaved.

        The draws' covariance plus the mean noise variance on the diagonal: every draw is a
        whole function, so a sample posterior is always joint across points.
        """
        flat = self.samples.flatten(-2)
        centred = flat - flat.mean(0)
        cov = torch.einsum("s...i,s...j->...ij", centred, centred) / self.num_samples
        if self.noise_variance is not None:
            cov = cov + torch.diag_embed(self.noise_variance.mean(0).flatten(-2))
        return cov

    def select(self, index: Tensor) -> SamplePosterior:
        """The mixture of the members ``index`` (a long tensor of shape (k,), repeats allowed).

        With ``k`` members, ``rsample_from_base_samples`` over ``k`` draws uses member
        ``index[j]`` for draw ``j``: pick ``index`` at random for random draws from seeded
        base samples (as estimators' ``sample_y`` does).
        """
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        if index.dim() != 1 or index.numel() == 0:
            raise ValueError(
                f"index must be a non-empty 1-D tensor, got shape {tuple(index.shape)}"
            )
        if bool(((index < 0) | (index >= self.num_samples)).any()):
            raise ValueError(f"index holds members outside [0, {self.num_samples})")
        noise = None if self.noise_variance is None else self.noise_variance[index]
        return SamplePosterior(self.samples[index], noise_variance=noise)

    def affine(self, scale: Tensor | float, shift: Tensor | float = 0.0) -> SamplePosterior:
        """Mixture of ``scale * f_s + shift`` (noise variances scale by ``scale**2``)."""
        scale, shift = self._affine_args(scale, shift)
        noise = None if self.noise_variance is None else self.noise_variance * scale.square()
        return SamplePosterior(self.samples * scale + shift, noise_variance=noise)

    def to(self, dtype: torch.dtype) -> SamplePosterior:
        noise = None if self.noise_variance is None else self.noise_variance.to(dtype)
        return SamplePosterior(self.samples.to(dtype), noise_variance=noise)

    def rsample_from_base_samples(self, sample_shape: torch.Size, base_samples: Tensor) -> Tensor:
        """Deterministic draws: draw ``j`` (flattened over ``sample_shape``) is member ``j mod S``.

        ``base_samples`` (standard normal, shape ``(*sample_shape, ..., n, m)``) drive the
        observation noise when there is any; when ``prod(sample_shape)`` is a multiple of
        ``S`` every member is used equally often.
        """
        sample_shape = as_size(sample_shape)
        expected = sample_shape + self.base_sample_shape
        if base_samples.shape != expected:
            raise ValueError(
                f"base_samples has shape {tuple(base_samples.shape)}, expected {tuple(expected)}"
            )
        count = math.prod(sample_shape)
        index = torch.arange(count, device=self.device) % self.num_samples
        return self._draw(index, base_samples.reshape((count,) + self.base_sample_shape)).reshape(
            expected
        )

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> Tensor:
        """Draws members uniformly at random (plus observation noise where there is any)."""
        sample_shape = as_size(sample_shape)
        count = math.prod(sample_shape)
        index = torch.randint(self.num_samples, (count,), device=self.device)
        base = torch.randn((count,) + self.base_sample_shape, dtype=self.dtype, device=self.device)
        return self._draw(index, base).reshape(sample_shape + self.base_sample_shape)

    def _draw(self, index: Tensor, base: Tensor) -> Tensor:
        draws = self.samples[index]
        if self.noise_variance is not None:
            draws = draws + self.noise_variance[index].sqrt() * base.to(self.dtype)
        return draws

    def _component_log_prob(self, y: Tensor) -> Tensor:
        """log N(y_i | f_s,i, noise_s,i) summed over outputs, shape (S, ..., n); a zero noise
        variance gives the log mass of the point mass at ``f_s,i``."""
        # align the draw axis in front of any extra leading batch dims of y
        extra = max(y.dim() - (self.samples.dim() - 1), 0)
        shape = self.samples.shape[:1] + (1,) * extra + self.samples.shape[1:]
        f, var = self.samples.reshape(shape), self.noise_variance.reshape(shape)
        return point_mass_normal_log_prob(y, f, var).sum(-1)

    def log_prob(self, y: Tensor) -> Tensor:
        y = self._check_y(y)
        if self.noise_variance is None:
            return GaussianPosterior(self.mean, variance=self.variance).log_prob(y)
        comp = self._component_log_prob(y)
        return torch.logsumexp(comp, 0) - math.log(self.num_samples)

    def joint_log_prob(self, y: Tensor) -> Tensor:
        """Mixture joint ``log mean_s prod_i N(y_i | f_s,i, noise_s,i)``."""
        y = self._check_y(y)
        if self.noise_variance is None:
            return GaussianPosterior(self.mean, variance=self.variance).joint_log_prob(y)
        comp = self._component_log_prob(y).sum(-1)
        return torch.logsumexp(comp, 0) - math.log(self.num_samples)

    def confidence_region(self, level: float = 0.95) -> tuple[Tensor, Tensor]:
        """Central interval from the quantiles of the predictive (noise included).

        Without observation noise these are the empirical quantiles of the draws; with noise,
        the exact quantiles of the mixture ``(1/S) sum_s N(f_s, noise_s)``, found by bisection
        on its CDF (not differentiable).
        """
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must lie in (0, 1), got {level}")
        lo, hi = (1.0 - level) / 2.0, (1.0 + level) / 2.0
        if self.noise_variance is not None:
            return self._mixture_quantile(lo), self._mixture_quantile(hi)
        q = torch.quantile(
            self.samples, torch.tensor([lo, hi], dtype=self.dtype, device=self.device), 0
        )
        return q[0], q[1]

    @torch.no_grad()
    def _mixture_quantile(self, q: float) -> Tensor:
        """Per-point ``q``-quantile of the noisy mixture, shape (..., n, m), by bisection."""
        f, sd = self.samples, self.noise_variance.sqrt()
        lower, upper = (f - 10.0 * sd).amin(0), (f + 10.0 * sd).amax(0)  # CDF ~0 and ~1
        for _ in range(64):
            mid = 0.5 * (lower + upper)
            z = (mid - f) / sd.clamp_min(torch.finfo(self.dtype).tiny)
            cdf = torch.where(sd > 0, torch.special.ndtr(z), (mid >= f).to(self.dtype)).mean(0)
            below = cdf < q
            lower, upper = torch.where(below, mid, lower), torch.where(below, upper, mid)
        return 0.5 * (lower + upper)

    def __repr__(self) -> str:
        noisy = self.noise_variance is not None
        shape = tuple(self.mean.shape)
        return f"SamplePosterior(draws={self.num_samples}, shape={shape}, noise={noisy})"

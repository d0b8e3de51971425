"""The common predictive-distribution interface shared by every model in ``bdl`` and ``gp``.

Every model answers ``model.posterior(X)`` with one of three kinds:

- :class:`GaussianPosterior`: a mean and either per-point variances (heads that only give
  marginals) or a full joint covariance over the ``n`` points (GPs).
- :class:`CategoricalPosterior`: class probabilities, with the per-draw probabilities they were
  averaged from when there are any.
- :class:`SamplePosterior`: a stack of function draws (SG-MCMC chains, ensembles, weight
  samples), optionally with per-draw observation noise, read as an equal-weight mixture.

Shapes follow BoTorch: ``mean`` and ``variance`` are ``(..., n, m)`` with ``...`` any batch
shape, ``n`` points and ``m`` outputs. Samples are ``(*sample_shape, ..., n, m)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from bdl._linalg import psd_safe_cholesky

__all__ = ["Posterior", "GaussianPosterior", "CategoricalPosterior", "SamplePosterior"]

_LOG_2PI = math.log(2.0 * math.pi)


def _as_size(sample_shape: torch.Size | tuple[int, ...] | int) -> torch.Size:
    if isinstance(sample_shape, int):
        return torch.Size([sample_shape])
    return torch.Size(sample_shape)


def _normal_quantile(level: float) -> float:
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
        sample_shape = _as_size(sample_shape)
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
        """

    @abstractmethod
    def joint_log_prob(self, y: Tensor) -> Tensor:
        """Joint predictive log density of all ``n`` points; shape ``(...)``."""

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
        return y


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
    def stddev(self) -> Tensor:
        return self.variance.clamp_min(0).sqrt()

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

    # -- sampling --------------------------------------------------------------------------
    def rsample_from_base_samples(self, sample_shape: torch.Size, base_samples: Tensor) -> Tensor:
        sample_shape = _as_size(sample_shape)
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
            per_output = -0.5 * ((y - self._mean) ** 2 / var + var.log() + _LOG_2PI)
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
        return -0.5 * (white.pow(2).sum(-1) + k * _LOG_2PI) - logdet

    def confidence_region(self, level: float = 0.95) -> tuple[Tensor, Tensor]:
        """Central marginal interval ``mean ± z·std`` holding ``level`` of the mass.

        Returns
        -------
        lower, upper : Tensor, shape (..., n, m)
        """
        z = _normal_quantile(level)
        half = z * self.stddev
        return self._mean - half, self._mean + half

    def __repr__(self) -> str:
        kind = "joint" if self.is_joint else "diagonal"
        return f"GaussianPosterior(shape={tuple(self._mean.shape)}, covariance={kind})"


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
        sample_shape = _as_size(sample_shape)
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

    def log_prob(self, y: Tensor) -> Tensor:
        """Log predictive mass of integer labels ``y`` of shape ``(..., n)``."""
        y = torch.as_tensor(y, device=self.device)
        if y.dtype.is_floating_point or y.shape != self._probs.shape[:-1]:
            raise ValueError(
                f"y must hold integer labels of shape {tuple(self._probs.shape[:-1])}, "
                f"got dtype {y.dtype} and shape {tuple(y.shape)}"
            )
        if bool(((y < 0) | (y >= self.num_classes)).any()):
            raise ValueError(f"y holds labels outside [0, {self.num_classes})")
        picked = self._probs.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)
        return picked.clamp_min(torch.finfo(self.dtype).tiny).log()

    def joint_log_prob(self, y: Tensor) -> Tensor:
        """Joint log mass of the labels of all ``n`` points.

        With ``prob_samples`` this is the mixture's joint, ``log mean_s prod_i p_s(y_i)``
        (points are dependent through the shared draw); otherwise the points are independent.
        """
        if self.prob_samples is None:
            return self.log_prob(y).sum(-1)
        y = torch.as_tensor(y, device=self.device)
        self.log_prob(y)  # validates y
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


class SamplePosterior(Posterior):
    """Equal-weight mixture of function draws, optionally with Gaussian observation noise.

    The predictive is ``p(y) = (1/S) sum_s N(y | f_s, noise_s)``; without noise, densities use
    the moment-matched Gaussian (the empirical distribution of draws has none).

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
            if bool((noise_variance < 0).any()):
                raise ValueError("noise_variance must be non-negative")
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

    def rsample_from_base_samples(self, sample_shape: torch.Size, base_samples: Tensor) -> Tensor:
        """Deterministic draws: draw ``j`` (flattened over ``sample_shape``) is member ``j mod S``.

        ``base_samples`` (standard normal, shape ``(*sample_shape, ..., n, m)``) drive the
        observation noise when there is any; when ``prod(sample_shape)`` is a multiple of
        ``S`` every member is used equally often.
        """
        sample_shape = _as_size(sample_shape)
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
        sample_shape = _as_size(sample_shape)
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
        """log N(y_i | f_s,i, noise_s,i) summed over outputs, shape (S, ..., n)."""
        # align the draw axis in front of any extra leading batch dims of y
        extra = max(y.dim() - (self.samples.dim() - 1), 0)
        shape = self.samples.shape[:1] + (1,) * extra + self.samples.shape[1:]
        f, var = self.samples.reshape(shape), self.noise_variance.reshape(shape)
        per_output = -0.5 * ((y - f) ** 2 / var + var.log() + _LOG_2PI)
        return per_output.sum(-1)

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

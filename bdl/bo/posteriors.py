"""Our posterior kinds as BoTorch posteriors.

- :class:`~bdl.core.gaussian.GaussianPosterior` becomes BoTorch's ``GPyTorchPosterior`` over a
  gpytorch ``MultivariateNormal`` (one output) or ``MultitaskMultivariateNormal`` (several
  outputs, interleaved covariance), so BoTorch's quasi-Monte Carlo normal samplers, posterior
  transforms and analytic acquisitions work unchanged.
- :class:`~bdl.core.samples.SamplePosterior` becomes BoTorch's ``EnsemblePosterior`` (values
  ``batch x s x q x m``), whose index sampler fixes the members across optimiser iterations.
  Observation noise, where the draws carry it, is one fixed standard-normal realisation per
  member (a seeded generator, so the acquisition surface is deterministic): the ensemble of
  ``f_s + sqrt(noise_s) z_s`` is an equal-weight draw from the noisy mixture.
- :class:`~bdl.core.categorical.CategoricalPosterior` is refused: a distribution over class
  labels is not a surrogate of a real-valued objective.
"""

from __future__ import annotations

import torch
from botorch.posteriors import GPyTorchPosterior
from botorch.posteriors import Posterior as BotorchPosterior
from botorch.posteriors.ensemble import EnsemblePosterior
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from linear_operator.operators import DenseLinearOperator, DiagLinearOperator
from torch import Tensor

from bdl.core.categorical import CategoricalPosterior
from bdl.core.gaussian import GaussianPosterior
from bdl.core.posterior_base import Posterior
from bdl.core.samples import SamplePosterior

__all__ = ["NOISE_SEED", "select_outputs", "to_botorch_posterior"]

#: seed of the fixed noise realisation added to the members of a noisy sample posterior
NOISE_SEED = 20240601


def to_botorch_posterior(post: Posterior) -> BotorchPosterior:
    """BoTorch posterior with the same distribution as ``post``.

    Parameters
    ----------
    post : Posterior
        Mean shape ``(..., q, m)``; Gaussian (marginal or joint) or a sample ensemble.

    Returns
    -------
    botorch.posteriors.Posterior
        ``GPyTorchPosterior`` for a Gaussian, ``EnsemblePosterior`` for samples; mean
        ``(..., q, m)``, differentiable wherever ``post`` is.

    Raises
    ------
    TypeError
        For a categorical posterior (classification models are not BO surrogates).
    """
    if isinstance(post, GaussianPosterior):
        return GPyTorchPosterior(_gaussian_distribution(post))
    if isinstance(post, SamplePosterior):
        return EnsemblePosterior(_ensemble_values(post))
    if isinstance(post, CategoricalPosterior):
        raise TypeError(
            "a classification model's posterior (over class labels) cannot be a Bayesian-"
            "optimisation surrogate; use a regression model of the objective"
        )
    raise TypeError(f"no BoTorch posterior for {type(post).__name__}")


def _gaussian_distribution(post: GaussianPosterior) -> MultivariateNormal:
    mean = post.mean  # (..., q, m)
    m = mean.shape[-1]
    if post.is_joint:
        # a lazy operator: singular covariances (a last layer's rank-limited joint, point
        # masses) are factorised when sampling, with gpytorch's bounded jitter
        cov = DenseLinearOperator(post.covariance_matrix)  # (..., q*m, q*m) interleaved
    else:
        cov = DiagLinearOperator(post.variance.flatten(-2))
    if m == 1:
        return MultivariateNormal(mean.squeeze(-1), cov)
    return MultitaskMultivariateNormal(mean, cov, interleaved=True)


def _ensemble_values(post: SamplePosterior) -> Tensor:
    """``(..., s, q, m)`` member values, with one fixed noise realisation where noisy."""
    values = post.samples  # (S, ..., q, m)
    if post.noise_variance is not None:
        generator = torch.Generator(device=values.device).manual_seed(NOISE_SEED)
        z = torch.randn(values.shape, generator=generator, device=values.device)
        values = values + post.noise_variance.sqrt() * z.to(values.dtype)
    return values.movedim(0, -3)


def select_outputs(post: Posterior, output_indices: list[int] | None) -> Posterior:
    """``post`` restricted to the outputs ``output_indices`` (all when None)."""
    if output_indices is None:
        return post
    m = post.mean.shape[-1]
    index = torch.as_tensor(output_indices, dtype=torch.long, device=post.device)
    if index.dim() != 1 or bool(((index < 0) | (index >= m)).any()):
        raise ValueError(f"output_indices must index the {m} outputs, got {output_indices}")
    if isinstance(post, SamplePosterior):
        noise = None if post.noise_variance is None else post.noise_variance[..., index]
        return SamplePosterior(post.samples[..., index], noise_variance=noise)
    if not isinstance(post, GaussianPosterior):
        raise TypeError(f"output_indices is not available for {type(post).__name__}")
    mean = post.mean[..., index]
    if not post.is_joint:
        return GaussianPosterior(mean, variance=post.variance[..., index])
    q = mean.shape[-2]
    rows = (torch.arange(q, device=post.device)[:, None] * m + index).flatten()  # interleaved
    cov = post.covariance_matrix[..., rows[:, None], rows]
    return GaussianPosterior(mean, covariance=cov)

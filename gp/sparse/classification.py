"""Class probabilities of a GP classifier as a :class:`bdl.core.Model` with a categorical
posterior."""

from __future__ import annotations

import torch
from gpytorch.distributions import MultivariateNormal
from gpytorch.likelihoods import SoftmaxLikelihood
from linear_operator.operators import DiagLinearOperator
from torch import Tensor, nn

from bdl.core.model import Model
from bdl.core.posterior import CategoricalPosterior
from bdl.core.validation import check_int

__all__ = ["ClassProbabilities"]


class ClassProbabilities(nn.Module, Model):
    """The predictive class probabilities of a latent-GP classifier.

    Wraps a GP whose ``posterior`` is Gaussian over its latent functions (an
    :class:`~gp.sparse.svgp.SVGP` or :class:`~gp.sparse.swsgp.SWSGP` with a classification
    likelihood) so that ``posterior(X)`` is the
    :class:`~bdl.core.posterior.CategoricalPosterior` of the labels:

    - one latent GP and a binary likelihood (labels {0, 1}): ``P(y = 1)`` from the
      likelihood's marginal under the latent marginal ``N(m, v)`` (for the probit
      ``BernoulliLikelihood`` exactly ``Phi(m / sqrt(1 + v))``); columns ``[1 - p, p]``;
    - ``C`` latent GPs and a softmax likelihood: the Monte Carlo average of
      ``softmax(m + sqrt(v) * eps)`` over ``num_samples`` standard-normal draws ``eps`` of
      shape ``(S, C)``, drawn from a generator seeded with ``seed`` and shared by all
      rows, so that each row's probabilities depend on that row alone; the per-draw
      probabilities are kept as ``prob_samples``.

    Parameters
    ----------
    gp : Model
        The latent GP (its ``likelihood`` attribute is the observation model).
    num_samples : int, default 256
        Monte Carlo draws for the softmax likelihood.
    seed : int, default 0
        Seed of those draws (the global random state is untouched).
    """

    def __init__(self, gp: Model, num_samples: int = 256, seed: int = 0) -> None:
        super().__init__()
        self.gp = gp
        self.num_samples = check_int("num_samples", num_samples)
        self.seed = int(seed)

    @property
    def _softmax(self) -> bool:
        return isinstance(self.gp.likelihood, SoftmaxLikelihood)

    @property
    def _dtype(self) -> torch.dtype:
        param = next(self.gp.parameters(), None)
        return torch.get_default_dtype() if param is None else param.dtype

    @property
    def num_outputs(self) -> int:
        """Number of classes ``C``."""
        return self.gp.num_outputs if self._softmax else 2

    @property
    def batch_shape(self) -> torch.Size:
        return self.gp.batch_shape

    def posterior(
        self, X: Tensor, *, observation_noise: bool = False, joint: bool = False
    ) -> CategoricalPosterior:
        """Predictive class probabilities at ``X``.

        Parameters
        ----------
        X : Tensor, shape (..., n, d)
        observation_noise : bool, default False
            No effect: class probabilities are already the predictive of the labels.
        joint : bool, default False
            Must be False (the labels' predictive is given per point).

        Returns
        -------
        CategoricalPosterior
            ``probs`` of shape (..., n, C), in ``X``'s dtype, differentiable in ``X``.
        """
        if joint:
            raise ValueError("class probabilities are given per point: joint=True is not available")
        latent = self.gp.posterior(X)
        mean, var = latent.mean, latent.variance.clamp_min(0)
        if self._softmax:
            gen = torch.Generator(device=mean.device).manual_seed(self.seed)
            shape = (self.num_samples, 1, mean.shape[-1])  # shared by all rows
            # drawn in the model's dtype, so that the draws do not depend on X's dtype
            eps = torch.randn(shape, generator=gen, dtype=self._dtype, device=mean.device)
            eps = eps.to(mean.dtype).reshape(self.num_samples, *[1] * (mean.dim() - 1), -1)
            samples = torch.softmax(mean + var.sqrt() * eps, -1)
            return CategoricalPosterior(samples.mean(0), prob_samples=samples)
        marginal = self.gp.likelihood.marginal(
            MultivariateNormal(mean[..., 0], DiagLinearOperator(var[..., 0]))
        )
        p = marginal.probs
        return CategoricalPosterior(torch.stack([1 - p, p], -1))

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, seed={self.seed}"

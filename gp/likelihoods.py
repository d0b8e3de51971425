"""The one set of likelihoods every GP of ``gp`` uses: gpytorch's, plus two it lacks.

- ``GaussianLikelihood`` (gpytorch): ``y ~ N(f, noise)``; built by :func:`make_likelihood`
  with the noise bounded below by :data:`NOISE_LOWER_BOUND` (as gpytorch's and BoTorch's
  defaults do, so that the noise of a GP fitted to noiseless or constant targets stays a
  usable jitter instead of collapsing towards zero); pass ``noise_lower_bound`` to change it.
- ``BernoulliLikelihood`` (gpytorch): ``p(y = 1 | f) = Phi(f)`` (probit), labels in {0, 1}.
- :class:`BernoulliLogitLikelihood`: ``p(y = 1 | f) = sigmoid(f)``, labels in {0, 1}.
- :class:`PoissonLikelihood`: ``y ~ Poisson(exp(f))`` (log link), counts.
- ``SoftmaxLikelihood`` (gpytorch, no mixing weights): one latent GP per class.

:func:`make_likelihood` turns a name (``"gaussian"``, ``"bernoulli"``, ``"poisson"``,
``"softmax"``) or a gpytorch likelihood into the likelihood object a GP uses.
"""

from __future__ import annotations

import torch
from gpytorch.constraints import GreaterThan
from gpytorch.distributions import MultivariateNormal
from gpytorch.likelihoods import (
    BernoulliLikelihood,
    GaussianLikelihood,
    SoftmaxLikelihood,
    _OneDimensionalLikelihood,
)
from gpytorch.likelihoods.likelihood import Likelihood
from torch import Tensor
from torch.distributions import Bernoulli, Poisson

__all__ = [
    "LIKELIHOODS",
    "LENGTHSCALE_LOWER_BOUND",
    "NOISE_LOWER_BOUND",
    "BernoulliLikelihood",
    "BernoulliLogitLikelihood",
    "GaussianLikelihood",
    "PoissonLikelihood",
    "SoftmaxLikelihood",
    "likelihood_kind",
    "make_likelihood",
]

LIKELIHOODS = ("gaussian", "bernoulli", "poisson", "softmax")

#: Default lower bound of a Gaussian noise variance (in the units the GP is fitted in;
#: standardised targets in the estimators), as BoTorch's ``MIN_INFERRED_NOISE_LEVEL``.
NOISE_LOWER_BOUND = 1e-6

#: Lower bound of the default kernels' lengthscales in the estimators (standardised inputs).
LENGTHSCALE_LOWER_BOUND = 1e-3


class PoissonLikelihood(_OneDimensionalLikelihood):
    """Poisson counts with a log link: ``y | f ~ Poisson(exp(f))``.

    gpytorch has no Poisson likelihood; this one plugs into its variational machinery
    (``forward`` gives the conditional distribution, Gauss-Hermite quadrature is inherited for
    everything else) and overrides :meth:`expected_log_prob` with the closed form

    .. math:: \\mathbb E_{N(f; m, v)}[\\log p(y|f)] = y\\,m - e^{m + v/2} - \\log\\Gamma(y + 1),

    using ``E[exp(f)] = exp(m + v/2)`` for ``f ~ N(m, v)``.
    """

    def forward(self, function_samples: Tensor, *args: object, **kwargs: object) -> Poisson:
        """Conditional distribution ``Poisson(exp(f))`` of ``y`` given latent values ``f``."""
        return Poisson(rate=function_samples.exp())

    def expected_log_prob(
        self,
        observations: Tensor,
        function_dist: MultivariateNormal,
        *args: object,
        **kwargs: object,
    ) -> Tensor:
        """Closed-form ``E_q[log p(y|f)]`` per point, shape (..., n)."""
        mean, var = function_dist.mean, function_dist.variance
        return observations * mean - torch.exp(mean + 0.5 * var) - torch.lgamma(observations + 1)


class BernoulliLogitLikelihood(_OneDimensionalLikelihood):
    """Binary labels with a logistic link: ``p(y = 1 | f) = sigmoid(f)``, labels in {0, 1}.

    gpytorch's ``BernoulliLikelihood`` is the probit version; expectations under a Gaussian
    ``f`` use gpytorch's Gauss-Hermite quadrature.
    """

    def forward(self, function_samples: Tensor, *args: object, **kwargs: object) -> Bernoulli:
        """Conditional distribution ``Bernoulli(sigmoid(f))`` of ``y`` given ``f``."""
        return Bernoulli(logits=function_samples)


def likelihood_kind(likelihood: Likelihood) -> str:
    """The name (one of :data:`LIKELIHOODS`) of a likelihood object, or ``"other"``."""
    if isinstance(likelihood, GaussianLikelihood):
        return "gaussian"
    if isinstance(likelihood, BernoulliLikelihood):
        return "bernoulli"
    if isinstance(likelihood, PoissonLikelihood):
        return "poisson"
    if isinstance(likelihood, SoftmaxLikelihood):
        return "softmax"
    return "other"


def make_likelihood(
    likelihood: str | Likelihood,
    num_classes: int | None = None,
    batch_shape: torch.Size = torch.Size(),
    noise_lower_bound: float = NOISE_LOWER_BOUND,
) -> Likelihood:
    """The likelihood object for a name, or the given gpytorch likelihood unchanged.

    Parameters
    ----------
    likelihood : {"gaussian", "bernoulli", "poisson", "softmax"} or gpytorch Likelihood
        ``"gaussian"``: ``GaussianLikelihood`` with one noise variance per GP of the batch;
        ``"bernoulli"``: probit ``BernoulliLikelihood`` (labels in {0, 1});
        ``"poisson"``: :class:`PoissonLikelihood`; ``"softmax"``: ``SoftmaxLikelihood``
        without mixing weights (one latent GP per class, labels in {0, ..., C-1}).
    num_classes : int, optional
        Number of classes ``C >= 2``; required for ``"softmax"`` and only allowed there.
    batch_shape : torch.Size
        Batch shape of independent GPs (for the Gaussian noise).
    noise_lower_bound : float
        Lower bound of the Gaussian noise variance (gpytorch ``GreaterThan`` constraint).

    Returns
    -------
    gpytorch.likelihoods.Likelihood
    """
    if isinstance(likelihood, Likelihood):
        return likelihood
    if not isinstance(likelihood, str) or likelihood not in LIKELIHOODS:
        raise ValueError(
            f"likelihood must be one of {LIKELIHOODS} or a gpytorch Likelihood, got {likelihood!r}"
        )
    if likelihood == "softmax":
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                "num_classes must be an integer >= 2 for the softmax likelihood, "
                f"got {num_classes!r}"
            )
        return SoftmaxLikelihood(num_classes=num_classes, mixing_weights=False)
    if num_classes is not None:
        raise ValueError(f"num_classes is only used with likelihood='softmax', got {num_classes!r}")
    if likelihood == "gaussian":
        constraint = GreaterThan(float(noise_lower_bound))
        return GaussianLikelihood(batch_shape=batch_shape, noise_constraint=constraint)
    if likelihood == "bernoulli":
        return BernoulliLikelihood()
    return PoissonLikelihood()

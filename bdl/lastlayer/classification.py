"""Discriminative VBLL classification head (D-VBLL; Harrison, Willes and Snoek, ICLR 2024).

Logits ``z = W phi + b + eps`` with ``eps ~ N(0, diag(sigma^2))`` and ``q(w_k) = N(wbar_k, S_k)``,
so each logit is marginally ``N(wbar_k^T phi + b_k, v_k)``, ``v_k = phi^T S_k phi + sigma_k^2``.
Training maximises the sampling-free Jensen bound

    log p(y | x) >= wbar_y^T phi + b_y - log sum_k exp(wbar_k^T phi + b_k + v_k / 2)

minus ``KL / N``. Predictions integrate the Gaussian logits either with the mean-field
(probit-style) approximation ``softmax(mu_k / sqrt(1 + pi v_k / 8))`` (deterministic,
single pass) or by Monte Carlo.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bdl.core.posterior import CategoricalPosterior
from bdl.core.validation import check_choice, check_inputs, check_int
from bdl.lastlayer._base import (
    flatten_features,
)
from bdl.lastlayer._dtype import posterior_in_input_dtype
from bdl.lastlayer._head import GaussianLastLayer

PREDICTIVE_METHODS = ("meanfield", "mc")


def check_labels(y: Tensor, n: int, num_classes: int) -> Tensor:
    """Validate integer class labels of shape (n,) in ``[0, num_classes)``."""
    if not isinstance(y, Tensor):
        raise ValueError(f"y must be a torch.Tensor of class labels, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.shape != (n,):
        raise ValueError(
            f"y must hold integer class labels of shape ({n},), got dtype {y.dtype} and "
            f"shape {tuple(y.shape)}"
        )
    # the range check reads values back (a sync): done on CPU only; on an accelerator an
    # out-of-range label fails inside gather instead
    if n and y.device.type == "cpu" and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"y holds labels outside [0, {num_classes})")
    return y


def gaussian_softmax(
    mean: Tensor, var: Tensor, method: str, num_samples: int, generator: torch.Generator | None
) -> CategoricalPosterior:
    """Class probabilities of ``softmax(z)`` with ``z_k ~ N(mean_k, var_k)`` independent.

    Parameters
    ----------
    mean, var : Tensor, shape (..., n, C)
    method : {"meanfield", "mc"}
    num_samples : int
        Monte Carlo draws for ``method="mc"``.
    """
    if method == "meanfield":
        return CategoricalPosterior(
            torch.softmax(mean / torch.sqrt(1.0 + (math.pi / 8.0) * var), -1)
        )
    base = torch.randn(
        (num_samples,) + mean.shape, dtype=mean.dtype, device=mean.device, generator=generator
    )
    draws = torch.softmax(mean + var.sqrt() * base, -1)
    return CategoricalPosterior(draws.mean(0), prob_samples=draws)


class VBLLClassification(GaussianLastLayer):
    """Discriminative Bayesian last layer for ``C``-class classification.

    A :class:`bdl.core.Model` on features: ``posterior(features)`` (class probabilities) and
    ``fit((features, labels))`` (minibatch Adam; :meth:`fit_covariance` afterwards sets the
    covariance to the bound's optimum given the means).

    Parameters
    ----------
    in_features : int
        Feature width ``d``.
    num_classes : int
        Number of classes ``C`` (>= 2).
    num_data : int, optional
        Training-set size ``N`` (weights the KL by ``1/N``); needed before :meth:`loss`.
    covariance : {"dense", "diagonal", "lowrank"}
        Covariance family of each class's weight posterior.
    rank : int
        Rank for ``covariance="lowrank"``.
    prior_scale : float
        ``s_p = prior_scale / d``. The default 30 lets a logit ``w^T phi`` have a prior spread
        of about ``sqrt(30 * mean(phi^2))``, i.e. logits of order 10 for unit-scale features:
        a tighter prior (vbll's 1, i.e. ``2/d``) shrinks the logits and leaves the classifier
        underconfident.
    noise_std : float
        Initial logit-noise standard deviation (deterministic).
    learn_noise : bool
        Learn the logit noise (point estimate under the IW-type prior).
    wishart_scale : float or None
        Scale of the prior on the logit noise (None: no prior).
    dof : float
        Degrees of freedom of that prior.
    predictive : {"meanfield", "mc"}
        How :meth:`posterior` integrates the Gaussian logits.
    num_samples : int
        Draws for ``predictive="mc"``.
    bias : bool
        Learn a point-estimated logit offset.
    learn_prior : bool
        Learn the prior variance by maximising the bound (empirical Bayes); ``prior_scale``
        is then only its starting value.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        num_data: int | None = None,
        covariance: str = "dense",
        rank: int = 4,
        prior_scale: float = 30.0,
        noise_std: float = 0.1,
        learn_noise: bool = True,
        wishart_scale: float | None = 1.0,
        dof: float = 1.0,
        predictive: str = "meanfield",
        num_samples: int = 64,
        bias: bool = True,
        learn_prior: bool = False,
    ) -> None:
        check_int("num_classes", num_classes, minimum=2)
        check_choice("predictive", predictive, PREDICTIVE_METHODS)
        check_int("num_samples", num_samples)
        super().__init__(
            in_features,
            num_classes,
            num_data=num_data,
            covariance=covariance,
            rank=rank,
            prior_scale=prior_scale,
            # start well inside the prior: early logits are then close to a plain linear head
            init_scale=0.1,
            noise_std=noise_std,
            learn_noise=learn_noise,
            wishart_scale=wishart_scale,
            dof=dof,
            bias=bias,
            learn_prior=learn_prior,
        )
        self.num_classes = num_classes
        self.predictive, self.num_samples = predictive, num_samples

    _task = "classification"
    _outputs_name = "num_classes"

    def _check_target(self, y: Tensor, n: int) -> Tensor:
        return check_labels(y, n, self.num_classes)

    def logit_moments(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of the Gaussian logits, each of shape (..., C)."""
        phi, lead = flatten_features(
            features, self.in_features, finite=True, dtype=self.weights.mean.dtype
        )
        mean, var = self._logit_moments(phi)
        shape = lead + (self.num_classes,)
        return mean.reshape(shape), var.reshape(shape)

    def _logit_moments(self, phi: Tensor) -> tuple[Tensor, Tensor]:
        """Logit mean and variance for features ``phi`` (B, d) in the head's dtype; (B, C)."""
        return self._mean(phi), self.weights.cov.quad(phi) + torch.exp(2.0 * self.log_noise_std)

    def log_likelihood_bound(self, features: Tensor, y: Tensor) -> Tensor:
        """Jensen lower bound on ``E_q log p(y_i | x_i)`` per point; shape (B,)."""
        phi, _ = flatten_features(features, self.in_features)
        y = check_labels(y, phi.shape[0], self.num_classes)
        mean = self._mean(phi)
        var = self.weights.cov.quad(phi) + torch.exp(2.0 * self.log_noise_std)
        picked = mean.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(mean + 0.5 * var, -1)

    def data_term(self, features: Tensor, y: Tensor) -> Tensor:
        return self.log_likelihood_bound(features, y)

    @torch.no_grad()
    def fit_covariance(
        self, features: Tensor, *, max_iter: int = 20, tol: float = 1e-6, chunk_size: int = 4096
    ) -> int:
        """Set the covariance (and learned logit noise) to the bound's optimum given the means.

        Setting the gradient of ``N * ELBO`` with respect to ``S_k`` to zero gives the fixed
        point ``S_k^-1 = I / s_p + sum_i pt_ik phi_i phi_i^T`` with
        ``pt_i = softmax(mu_i + v_i / 2)`` (the weights of the Jensen bound's log-sum-exp),
        which depends on ``S`` only through ``v``; it is iterated to convergence. For the logit
        noise the same condition with the inverse-Wishart prior gives
        ``sum_i pt_ik sigma_k^4 + 2 nu' sigma_k^2 - scale = 0``. ``dense`` and ``diagonal``
        covariances get the exact optimum of their family; ``lowrank`` the nearest member.
        Use it after training on the training features (the labels do not enter).

        Parameters
        ----------
        features : Tensor, shape (N, d)
            Features of the whole training set.

        Returns
        -------
        int
            Number of iterations run.
        """
        phi, _ = flatten_features(
            features, self.in_features, finite=True, dtype=self.weights.mean.dtype
        )
        phi64 = phi.double()
        eye = torch.eye(self.in_features, dtype=torch.float64, device=phi.device)
        previous = None
        iteration = 0
        while iteration < max_iter:
            iteration += 1
            weights = []
            for start in range(0, phi.shape[0], chunk_size):
                mean, var = self.logit_moments(phi[start : start + chunk_size])
                weights.append(torch.softmax(mean + 0.5 * var, -1).double())
            pt = torch.cat(weights)  # (N, C)
            precision = torch.stack(
                [(phi64 * pt[:, k : k + 1]).T @ phi64 for k in range(self.num_classes)]
            )
            precision = precision + eye / self.weights.prior_variance
            self.weights.assign_from_precision(self.weights.mean.detach().clone(), precision)
            if isinstance(self.log_noise_std, nn.Parameter):
                mass = pt.sum(0)
                if self.wishart_scale is None:
                    noise_var = torch.full_like(mass, 1e-12)
                else:
                    nu = 0.5 * (self.dof + self.num_classes + 1.0)
                    # positive root of mass * s^2 + 2 nu s - scale = 0 (s = sigma^2)
                    noise_var = self.wishart_scale / (
                        nu + torch.sqrt(nu**2 + mass * self.wishart_scale)
                    )
                self.log_noise_std.copy_(0.5 * noise_var.log().to(self.log_noise_std.dtype))
            if previous is not None and (pt - previous).abs().max() < tol:
                break
            previous = pt
        return iteration

    def posterior(
        self,
        X: Tensor,
        *,
        observation_noise: bool = False,
        joint: bool = False,
        generator: torch.Generator | None = None,
    ) -> CategoricalPosterior:
        """Predictive class probabilities at the features ``X``.

        Parameters
        ----------
        X : Tensor, shape (..., n, d)
            Features, any leading batch shape; computed in the promoted dtype of ``X`` and
            the head, returned in ``X``'s dtype, differentiable in ``X``.
        observation_noise : bool
            Ignored: the predictive is over labels (the logit noise is always included).
        joint : bool
            Not available (``ValueError``): a predictive over labels has no joint covariance.
        generator : torch.Generator, optional
            Source of the Monte Carlo draws for ``predictive="mc"``.

        Returns
        -------
        CategoricalPosterior, probs shape (..., n, C)
        """
        if joint:
            raise ValueError("joint=True is not available for a classification head")
        X = check_inputs(X, self.in_features, name="features")
        return posterior_in_input_dtype(self, X, "_posterior", generator=generator)

    def _posterior(self, phi: Tensor, generator: torch.Generator | None) -> CategoricalPosterior:
        mean, var = self._logit_moments(phi.reshape(-1, self.in_features))
        shape = phi.shape[:-1] + (self.num_classes,)
        return gaussian_softmax(
            mean.reshape(shape), var.reshape(shape), self.predictive, self.num_samples, generator
        )

"""Generative VBLL classification head (G-VBLL; Harrison, Willes and Snoek, ICLR 2024).

Class-conditional features ``phi | y=k ~ N(mu_k, Sigma)`` with a shared diagonal ``Sigma``
(point estimate) and ``q(mu_k) = N(mubar_k, S_k)``, ``S_k`` diagonal, prior
``mu_k ~ N(0, prior_scale I)``. With class priors ``rho_k`` the bound per point is

    log N(phi | mubar_y, Sigma) - 1/2 tr(Sigma^-1 S_y) + log rho_y
        - log sum_k rho_k N(phi | mubar_k, Sigma + S_k)

and the predictive is the closed form ``p(y=k | x) = softmax_k[log rho_k + log N(phi | mubar_k,
Sigma + S_k)]``: no sampling anywhere.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bdl.core.model import Model
from bdl.core.posterior import CategoricalPosterior
from bdl.core.validation import check_inputs, check_positive
from bdl.lastlayer._base import (
    LOG_2PI,
    GaussianWeights,
    check_finite_loss,
    check_head_args,
    flatten_features,
    inverse_wishart_log_prior,
    loss_features,
    require_num_data,
)
from bdl.lastlayer._dtype import posterior_in_input_dtype
from bdl.lastlayer._fit import HeadFitMixin
from bdl.lastlayer.classification import check_labels


def diagonal_gaussian_log_density(phi: Tensor, means: Tensor, variances: Tensor) -> Tensor:
    """``log N(phi_b | means_k, diag(variances_k))`` for all pairs by three GEMMs.

    Parameters
    ----------
    phi : Tensor, shape (B, d)
    means, variances : Tensor, shape (k, d)

    Returns
    -------
    Tensor, shape (B, k)
    """
    # a shared reference point keeps the expanded square from cancelling in float32
    ref = means.mean(0)
    phi, means = phi - ref, means - ref
    inv = 1.0 / variances
    # sum_j (phi_j - mu_j)^2 / v_j expanded so that no (B, k, d) tensor is formed
    quad = (phi * phi) @ inv.T - 2.0 * phi @ (means * inv).T + (means * means * inv).sum(-1)
    return -0.5 * (quad + variances.log().sum(-1) + phi.shape[-1] * LOG_2PI)


class GenerativeVBLLClassification(HeadFitMixin, nn.Module, Model):
    """Generative (Gaussian class-conditional) Bayesian last layer.

    A :class:`bdl.core.Model` on features: ``posterior(features)`` and ``fit((features, y))``
    (minibatch Adam on :meth:`loss`; the class prior is left as set by
    :meth:`set_class_prior`).

    Parameters
    ----------
    in_features : int
        Feature width ``d``.
    num_classes : int
        Number of classes ``C`` (>= 2).
    num_data : int, optional
        Training-set size ``N`` (weights the KL by ``1/N``).
    prior_scale : float
        Prior variance of each class mean (not divided by ``d``: features are the data here).
    noise_std : float
        Initial standard deviation of the shared feature noise ``Sigma``.
    wishart_scale : float or None
        Scale of the inverse-Wishart-type prior on ``Sigma`` (default None: no prior, a
        maximum-likelihood ``Sigma``). That prior has ``nu' = (dof + d + 1) / 2``, so its mode
        ``scale / (d + 2)`` pulls the feature noise towards zero as ``d`` grows and makes the
        predictive overconfident.
    dof : float
        Degrees of freedom of that prior.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        num_data: int | None = None,
        prior_scale: float = 1.0,
        noise_std: float = 1.0,
        wishart_scale: float | None = None,
        dof: float = 1.0,
    ) -> None:
        super().__init__()
        check_head_args(in_features, num_classes, prior_scale, num_data, outputs_name="num_classes")
        check_positive("noise_std", noise_std)
        if wishart_scale is not None:
            check_positive("wishart_scale", wishart_scale)
        self.in_features, self.num_classes = in_features, num_classes
        self.num_data = num_data
        self.wishart_scale, self.dof = wishart_scale, dof
        self.class_means = GaussianWeights(
            num_classes,
            in_features,
            covariance="diagonal",
            rank=None,
            prior_variance=prior_scale,
            # small, prior-independent start: class means are found from the features, and a
            # draw from a broad prior would place them far from every feature vector
            init_std=0.1 * min(1.0, math.sqrt(prior_scale)),
            mean_init_std=0.1,
        )
        self.log_noise_std = nn.Parameter(torch.full((in_features,), math.log(noise_std)))
        self.register_buffer("log_class_prior", torch.full((num_classes,), -math.log(num_classes)))

    @property
    def num_outputs(self) -> int:
        """Number of classes ``C``."""
        return self.num_classes

    def set_class_prior(self, counts_or_probs: Tensor) -> None:
        """Set ``rho`` from class counts or probabilities, shape (C,)."""
        p = torch.as_tensor(counts_or_probs, dtype=self.log_class_prior.dtype)
        # NaN fails every comparison and inf normalises to NaN: require finite positive entries
        if p.shape != (self.num_classes,) or not bool(((p > 0) & p.isfinite()).all()):
            raise ValueError(
                f"counts_or_probs must be finite and positive with shape ({self.num_classes},)"
            )
        self.log_class_prior.copy_((p / p.sum()).log().to(self.log_class_prior.device))

    def _class_log_scores(self, phi: Tensor) -> Tensor:
        """``log rho_k + log N(phi | mubar_k, Sigma + S_k)``, shape (B, C)."""
        noise = torch.exp(2.0 * self.log_noise_std)
        total = noise + self.class_means.cov.variances()
        return self.log_class_prior + diagonal_gaussian_log_density(
            phi, self.class_means.mean, total
        )

    def forward(self, features: Tensor) -> Tensor:
        """Predictive log-probabilities, shape (..., C)."""
        phi, lead = flatten_features(features, self.in_features)
        return torch.log_softmax(self._class_log_scores(phi), -1).reshape(
            lead + (self.num_classes,)
        )

    def log_likelihood_bound(self, features: Tensor, y: Tensor) -> Tensor:
        """Lower bound on ``E_q log p(y_i | phi_i)`` per point; shape (B,)."""
        phi, _ = flatten_features(features, self.in_features)
        y = check_labels(y, phi.shape[0], self.num_classes)
        noise = torch.exp(2.0 * self.log_noise_std)
        mean_y = self.class_means.mean[y]
        var_y = self.class_means.cov.variances()[y]
        inv_noise = 1.0 / noise
        log_joint = -0.5 * (
            ((phi - mean_y).pow(2) * inv_noise).sum(-1)
            + (var_y * inv_noise).sum(-1)
            + 2.0 * self.log_noise_std.sum()
            + phi.shape[-1] * LOG_2PI
        )
        return (
            log_joint + self.log_class_prior[y] - torch.logsumexp(self._class_log_scores(phi), -1)
        )

    def kl_divergence(self) -> Tensor:
        """``KL(q || p)`` of the class means, a scalar."""
        return self.class_means.kl_divergence()

    def loss(self, features: Tensor, y: Tensor) -> Tensor:
        """Negative ELBO per datum: ``-mean_i bound_i + (KL - log p(Sigma)) / N``.

        Raises
        ------
        ValueError
            Naming ``features`` (a dtype other than the head's outside autocast, NaN or inf)
            or ``y``; the finiteness check is one device sync per call.
        """
        num_data = require_num_data(self.num_data)
        phi = loss_features(features, self.in_features, self.log_noise_std.dtype)
        bound = self.log_likelihood_bound(phi, y).mean()
        log_prior = inverse_wishart_log_prior(self.log_noise_std, self.wishart_scale, self.dof)
        loss = -bound + (self.kl_divergence() - log_prior) / num_data
        return check_finite_loss(loss, phi, y)

    def posterior(
        self, X: Tensor, *, observation_noise: bool = False, joint: bool = False
    ) -> CategoricalPosterior:
        """Closed-form predictive class probabilities at the features ``X``.

        Parameters
        ----------
        X : Tensor, shape (..., n, d)
            Features, any leading batch shape; computed in the promoted dtype of ``X`` and
            the head, returned in ``X``'s dtype, differentiable in ``X``.
        observation_noise : bool
            Ignored: the predictive is over labels.
        joint : bool
            Not available (``ValueError``): a predictive over labels has no joint covariance.

        Returns
        -------
        CategoricalPosterior, probs shape (..., n, C)
        """
        if joint:
            raise ValueError("joint=True is not available for a classification head")
        X = check_inputs(X, self.in_features, name="features")
        return posterior_in_input_dtype(self, X, "_posterior")

    def _posterior(self, phi: Tensor) -> CategoricalPosterior:
        scores = self._class_log_scores(phi.reshape(-1, self.in_features))
        probs = torch.softmax(scores, -1)
        return CategoricalPosterior(probs.reshape(phi.shape[:-1] + (self.num_classes,)))

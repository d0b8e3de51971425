"""The skeleton shared by the regression and discriminative classification heads."""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
from torch import Tensor, nn

from bdl.core.model import Model
from bdl.core.validation import check_choice, check_positive
from bdl.lastlayer._base import (
    GaussianWeights,
    check_finite_loss,
    check_head_args,
    flatten_features,
    inverse_wishart_log_prior,
    loss_features,
    require_num_data,
)
from bdl.lastlayer._covariance import COVARIANCE_KINDS
from bdl.lastlayer._fit import HeadFitMixin
from bdl.lastlayer._fused import LossSpec, fused_loss


class GaussianLastLayer(HeadFitMixin, nn.Module, Model):
    """``k`` Gaussian weight rows over ``d`` features, an offset and a per-row noise scale.

    Subclasses define the likelihood: ``_task`` names the fused loss, ``_check_target``
    validates targets and ``data_term`` is the per-point expected log-likelihood (or its bound)
    written op by op, which :meth:`reference_loss` uses and the fused :meth:`loss` equals.
    A head is a :class:`bdl.core.Model` whose inputs are features: ``posterior(features)``
    and ``fit((features, y))``.

    Parameters
    ----------
    in_features, k : int
        Feature width ``d`` and number of rows (outputs or classes).
    init_scale : float
        Initial posterior standard deviation as a multiple of the prior's.
    Other parameters are documented on the subclasses.
    """

    _task: str
    _outputs_name: str  # constructor name of ``k``, for error messages

    def __init__(
        self,
        in_features: int,
        k: int,
        *,
        num_data: int | None,
        covariance: str,
        rank: int,
        prior_scale: float,
        init_scale: float,
        noise_std: float,
        learn_noise: bool,
        wishart_scale: float | None,
        dof: float,
        bias: bool,
        learn_prior: bool,
    ) -> None:
        super().__init__()
        check_head_args(in_features, k, prior_scale, num_data, outputs_name=self._outputs_name)
        check_choice("covariance", covariance, COVARIANCE_KINDS)
        check_positive("noise_std", noise_std)
        if wishart_scale is not None:
            check_positive("wishart_scale", wishart_scale)
        self.in_features, self._k = in_features, k
        self.num_data = num_data
        self.covariance = covariance
        self.wishart_scale, self.dof = wishart_scale, dof
        prior_variance = prior_scale / in_features
        self.weights = GaussianWeights(
            k,
            in_features,
            covariance=covariance,
            rank=rank,
            prior_variance=prior_variance,
            init_std=init_scale * math.sqrt(prior_variance),
            mean_init_std=math.sqrt(prior_variance),
            learn_prior=learn_prior,
        )
        self.bias = nn.Parameter(torch.zeros(k)) if bias else None
        log_noise = torch.full((k,), math.log(noise_std))
        if learn_noise:
            self.log_noise_std = nn.Parameter(log_noise)
        else:
            self.register_buffer("log_noise_std", log_noise)

    @property
    def num_outputs(self) -> int:
        """Number of outputs ``m`` (regression) or classes ``C``."""
        return self._k

    def _mean(self, phi: Tensor) -> Tensor:
        mean = phi @ self.weights.mean.T
        return mean if self.bias is None else mean + self.bias

    def forward(self, features: Tensor) -> Tensor:
        """Mean output (regression mean or logits), shape (..., k): a drop-in for ``nn.Linear``."""
        phi, lead = flatten_features(features, self.in_features)
        return self._mean(phi).reshape(lead + (self._k,))

    def kl_divergence(self) -> Tensor:
        """``KL(q(W) || p(W))``, a scalar."""
        return self.weights.kl_divergence()

    @abstractmethod
    def _check_target(self, y: Tensor, n: int) -> Tensor:
        """Validated targets for ``n`` feature rows."""

    @abstractmethod
    def data_term(self, features: Tensor, y: Tensor) -> Tensor:
        """Per-point expected log-likelihood (or its lower bound), shape (B,)."""

    def loss(self, features: Tensor, y: Tensor) -> Tensor:
        """Negative ELBO per datum on a minibatch (minimise this).

        ``-mean_i data_term_i + (KL - log p(noise)) / N``, computed as one hand-differentiated
        autograd node (see ``bdl.lastlayer._fused``).

        Parameters
        ----------
        features : Tensor, shape (B, d)
            In the head's dtype (or under autocast).
        y : Tensor
            Targets, (B, m) or (B,) for regression; integer labels (B,) for classification.

        Raises
        ------
        ValueError
            Naming ``features`` or ``y``: bad shape or dtype, or NaN / inf entries (found
            through the loss itself: one device sync per call).
        RuntimeError
            If the loss overflows with finite inputs.
        """
        num_data = require_num_data(self.num_data)
        phi = loss_features(features, self.in_features, self.weights.mean.dtype)
        y = self._check_target(y, phi.shape[0])
        spec = LossSpec(self._task, self.weights.cov, num_data, self.wishart_scale, self.dof)
        with torch.autocast(phi.device.type, enabled=False):
            loss = fused_loss(
                spec, phi, y, self.weights.mean, self.bias, self.log_noise_std,
                self.weights.log_prior_variance,
            )  # fmt: skip
        return check_finite_loss(loss, phi, y)

    def reference_loss(self, features: Tensor, y: Tensor) -> Tensor:
        """:meth:`loss` written op by op with autograd (slower; the definition it must equal)."""
        num_data = require_num_data(self.num_data)
        data = self.data_term(features, y).mean()
        log_prior = inverse_wishart_log_prior(self.log_noise_std, self.wishart_scale, self.dof)
        return -data + (self.kl_divergence() - log_prior) / num_data

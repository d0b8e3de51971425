"""Heteroscedastic VBLL regression: input-dependent noise with its own Bayesian last layer.

Model: ``y = W phi + b + eps``, ``eps ~ N(0, sigma^2(x))``, ``log sigma_k^2(x) = m_k^T phi + c_k``,
with independent Gaussian posteriors ``q(w_k) = N(wbar_k, S_k)`` and ``q(m_k) = N(mbar_k, R_k)``.
With ``l = log sigma^2 ~ N(mu_l, s_l^2)``, ``mu_l = mbar^T phi + c``, ``s_l^2 = phi^T R phi``:

    E_q log N(y | w^T phi + b, e^l)
        = -1/2 [log 2 pi + mu_l + exp(-mu_l + s_l^2 / 2) ((y - wbar^T phi - b)^2 + phi^T S phi)]

exactly (``E[e^{-l}]`` is a log-normal moment). Unlike the vbll package, ``S`` is the weight
covariance itself, not a covariance relative to the noise. The predictive is summarised by
its first two moments, ``variance = phi^T S phi + exp(mu_l + s_l^2 / 2)`` (a moment-matched
Gaussian; the exact predictive is a log-normal scale mixture with slightly heavier tails).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bdl.core.model import Model
from bdl.core.posterior import GaussianPosterior
from bdl.core.validation import check_choice, check_inputs, check_positive
from bdl.lastlayer._base import (
    LOG_2PI,
    GaussianWeights,
    check_finite_loss,
    check_head_args,
    flatten_features,
    loss_features,
    require_num_data,
)
from bdl.lastlayer._dtype import posterior_in_input_dtype
from bdl.lastlayer._fit import HeadFitMixin
from bdl.lastlayer.regression import interleave_block_diagonal

#: initial posterior standard deviation of the log-noise weights, relative to their prior's
NOISE_INIT_SCALE = 0.1


class HeteroscedasticVBLLRegression(HeadFitMixin, nn.Module, Model):
    """Bayesian last layer with a Bayesian log-noise layer.

    A :class:`bdl.core.Model` on features: ``posterior(features)`` and ``fit((features, y))``
    (minibatch Adam on :meth:`loss`).

    Parameters
    ----------
    in_features : int
        Feature width ``d``.
    out_features : int
        Number of outputs ``m``.
    num_data : int, optional
        Training-set size ``N`` (weights the KL terms by ``1/N``).
    covariance : {"dense", "diagonal", "lowrank"}
        Covariance family of the mean weights.
    noise_covariance : {"dense", "diagonal", "lowrank"}
        Covariance family of the log-noise weights.
    rank : int
        Rank for low-rank families.
    prior_scale : float
        Mean-weight prior variance times ``d``.
    noise_prior_scale : float
        Log-noise-weight prior variance times ``d`` (small: the noise varies smoothly).
    noise_std : float
        Initial noise standard deviation (sets the initial offset ``c``).
    bias : bool
        Learn a point-estimated offset of the mean.

    Notes
    -----
    The expected log-likelihood falls monotonically with the log-noise variance
    ``s_l^2 = phi^T R phi``: ``d E_q log p / d s_l^2 = -exp(-mu_l + s_l^2 / 2) ((y - wbar^T
    phi - b)^2 + phi^T S phi) / 4 < 0``. The optimal ``R`` is therefore below the prior
    ``s_m I`` along the features, where the KL term's pull ``(1/s_m - R^-1) / 2`` balances
    it, and starting ``q(m)`` at the prior is the worst start: there ``s_l^2 = s_m |phi|^2``
    grows with the squared feature scale and ``E_q[1/sigma^2] = exp(-mu_l + s_l^2 / 2)``
    overflows float32 (``s_l^2 > 177``) for features of scale 100 at the defaults. ``R``
    starts at ``NOISE_INIT_SCALE^2 = 1e-2`` times the prior instead (as the classification
    head starts inside its prior), which keeps the bound finite up to about a hundred times
    larger squared feature norms; the bound then raises ``R`` only as far as the data allow.
    An overflow that remains is a ``RuntimeError`` from :meth:`loss`, not an inf.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int = 1,
        *,
        num_data: int | None = None,
        covariance: str = "dense",
        noise_covariance: str = "diagonal",
        rank: int = 4,
        prior_scale: float = 1.0,
        noise_prior_scale: float = 0.01,
        noise_std: float = 1.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_head_args(in_features, out_features, prior_scale, num_data)
        check_choice("covariance", covariance, ("dense", "diagonal", "lowrank"))
        check_choice("noise_covariance", noise_covariance, ("dense", "diagonal", "lowrank"))
        check_positive("noise_prior_scale", noise_prior_scale)
        check_positive("noise_std", noise_std)
        self.in_features, self.out_features = in_features, out_features
        self.num_data = num_data
        s_w = prior_scale / in_features
        s_m = noise_prior_scale / in_features
        self.weights = GaussianWeights(
            out_features, in_features, covariance=covariance, rank=rank,
            prior_variance=s_w, init_std=math.sqrt(s_w), mean_init_std=math.sqrt(s_w),
        )  # fmt: skip
        # q(m) starts well inside its prior (see the class notes): E_q[1/sigma^2] grows like
        # exp(s_l^2 / 2), and at the prior s_l^2 = s_m |phi|^2 overflows for large features
        self.noise_weights = GaussianWeights(
            out_features, in_features, covariance=noise_covariance, rank=rank,
            prior_variance=s_m, init_std=NOISE_INIT_SCALE * math.sqrt(s_m), mean_init_std=0.0,
        )  # fmt: skip
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.noise_offset = nn.Parameter(torch.full((out_features,), 2.0 * math.log(noise_std)))

    @property
    def num_outputs(self) -> int:
        """Number of outputs ``m``."""
        return self.out_features

    def _mean(self, phi: Tensor) -> Tensor:
        mean = phi @ self.weights.mean.T
        return mean if self.bias is None else mean + self.bias

    def log_noise_moments(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of ``log sigma^2(x)`` under ``q``, each (..., m)."""
        phi, lead = flatten_features(features, self.in_features)
        mu = phi @ self.noise_weights.mean.T + self.noise_offset
        var = self.noise_weights.cov.quad(phi)
        shape = lead + (self.out_features,)
        return mu.reshape(shape), var.reshape(shape)

    def noise_variance(self, features: Tensor) -> Tensor:
        """Expected noise variance ``E_q sigma^2(x) = exp(mu_l + s_l^2 / 2)``, shape (..., m)."""
        mu, var = self.log_noise_moments(features)
        return torch.exp(mu + 0.5 * var)

    def forward(self, features: Tensor) -> Tensor:
        """Predictive mean, shape (..., m)."""
        phi, lead = flatten_features(features, self.in_features)
        return self._mean(phi).reshape(lead + (self.out_features,))

    def expected_log_likelihood(self, features: Tensor, y: Tensor) -> Tensor:
        """Exact ``E_q log p(y_i | x_i)`` per point, summed over outputs; shape (n,)."""
        phi, _ = flatten_features(features, self.in_features)
        if not isinstance(y, Tensor):
            raise ValueError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if y.dim() == 1 and self.out_features == 1:
            y = y.unsqueeze(-1)
        if y.shape != (phi.shape[0], self.out_features):
            raise ValueError(
                f"y must have shape ({phi.shape[0]}, {self.out_features}), got {tuple(y.shape)}"
            )
        mu_l = phi @ self.noise_weights.mean.T + self.noise_offset
        s_l = self.noise_weights.cov.quad(phi)
        inv_noise = torch.exp(-mu_l + 0.5 * s_l)  # E[exp(-l)]
        sq = (y - self._mean(phi)).pow(2) + self.weights.cov.quad(phi)
        return (-0.5 * (LOG_2PI + mu_l + inv_noise * sq)).sum(-1)

    def kl_divergence(self) -> Tensor:
        """``KL(q || p)`` of both layers, a scalar."""
        return self.weights.kl_divergence() + self.noise_weights.kl_divergence()

    def loss(self, features: Tensor, y: Tensor) -> Tensor:
        """Negative ELBO per datum.

        Raises
        ------
        ValueError
            Naming ``features`` (a dtype other than the head's outside autocast, NaN or inf)
            or ``y`` (NaN or inf); the finiteness check is one device sync per call.
        RuntimeError
            If ``E_q[1/sigma^2]`` overflows with finite inputs (features of very large scale).
        """
        num_data = require_num_data(self.num_data)
        phi = loss_features(features, self.in_features, self.noise_offset.dtype)
        ell = self.expected_log_likelihood(phi, y).mean()
        loss = -ell + self.kl_divergence() / num_data
        if bool(torch.isfinite(loss.detach())):
            return loss
        with torch.no_grad():
            s_l = self.noise_weights.cov.quad(phi.to(self.noise_offset.dtype))
        largest = float(s_l.max()) if bool(torch.isfinite(s_l).all()) else float("inf")
        overflow = (
            f" (E_q[1/sigma^2] = exp(-mu_l + s_l^2 / 2) with log-noise variance s_l^2 up to "
            f"{largest:.3g} at these features; it grows with their squared scale)"
        )
        return check_finite_loss(loss, phi, y, overflow)

    def elbo(self, features: Tensor, y: Tensor) -> Tensor:
        """Full-data evidence lower bound."""
        return self.expected_log_likelihood(features, y).sum() - self.kl_divergence()

    def posterior(
        self, X: Tensor, *, observation_noise: bool = False, joint: bool = False
    ) -> GaussianPosterior:
        """Predictive at the features ``X``; latent ``f`` unless ``observation_noise``.

        With noise, the variance is ``phi^T S phi + E sigma^2(x)`` (moment matched).

        Parameters
        ----------
        X : Tensor, shape (..., n, d)
            Features, any leading batch shape; computed in the promoted dtype of ``X`` and
            the head, returned in ``X``'s dtype, differentiable in ``X``.
        observation_noise : bool
            Add the expected noise variance at each point.
        joint : bool
            Full joint covariance across the ``n`` points (the noise is independent across
            points and adds to the diagonal).

        Returns
        -------
        GaussianPosterior, mean shape (..., n, m)
        """
        X = check_inputs(X, self.in_features, name="features")
        return posterior_in_input_dtype(
            self, X, "_posterior", observation_noise=observation_noise, joint=joint
        )

    def _posterior(self, phi: Tensor, observation_noise: bool, joint: bool) -> GaussianPosterior:
        mean = self._mean(phi)
        noise = self.noise_variance(phi) if observation_noise else None  # (..., n, m)
        if noise is not None and not bool(torch.isfinite(noise).all()):
            raise ValueError(
                f"X lies so far from the training features that the predicted noise variance "
                f"E[sigma^2(x)] = exp(mu + s^2 / 2) overflows {phi.dtype}: query in float64 "
                "or closer to the data"
            )
        if joint:
            blocks = self.weights.cov.cross(phi, phi)  # (..., m, n, n)
            if noise is not None:
                blocks = blocks + torch.diag_embed(noise.mT)
            return GaussianPosterior(mean, covariance=interleave_block_diagonal(blocks))
        var = self.weights.cov.quad(phi.reshape(-1, self.in_features)).reshape(mean.shape)
        return GaussianPosterior(mean, variance=var if noise is None else var + noise)

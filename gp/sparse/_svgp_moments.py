"""Whitened moments of an SVGP: ``q(v)``, the marginals and joint of ``q(f)`` (the
posterior), the KL term, the expected log-likelihood and the per-datum ELBO (a mixin of
:class:`gp.sparse.svgp.SVGP`)."""

from __future__ import annotations

import math

import torch
from gpytorch.distributions import MultivariateNormal
from gpytorch.settings import num_likelihood_samples
from linear_operator.operators import CholLinearOperator, DiagLinearOperator
from torch import Tensor

from bdl.core.linalg import psd_safe_cholesky
from bdl.core.posterior import GaussianPosterior
from gp.sparse._svgp_parts import interleave_blocks
from gp.sparse._whitened import whitened_marginal_updates

__all__ = ["PREDICT_CHUNK", "WhitenedMoments"]

#: marginal predictions are computed in chunks of this many points (memory O(chunk * M))
PREDICT_CHUNK = 8192
_LOG_2PI = math.log(2.0 * math.pi)


class WhitenedMoments:
    """``q(v)``, ``q(f)`` and the ELBO's terms from the parameters of an SVGP (whitened
    ``u = L v``, ``L L^T = K_ZZ + jitter I``; Hensman, Matthews, Ghahramani 2015)."""

    # -- q(u) and q(f) --------------------------------------------------------------------
    def _q_moments(self) -> tuple[Tensor, Tensor]:
        """Whitened ``q(v) = N(m, S)``: ``m`` (*latent, M) and a root ``R`` (*latent, M, M)
        with ``S = R R^T`` (gradients reach natural parameters as natural gradients)."""
        q = self._strategy._variational_distribution()
        cov = q.lazy_covariance_matrix
        if isinstance(cov, CholLinearOperator):
            root = cov.root.to_dense()
        else:
            root = psd_safe_cholesky(cov.to_dense())
        return q.mean, root

    def _whitening_factor(self, Z: Tensor) -> Tensor:
        """Cholesky ``L`` of ``K_ZZ + jitter I``, shape (*, M, M), computed and returned in
        float64 (as gpytorch's ``VariationalStrategy`` does, for float32 robustness)."""
        Kzz = self.kernel(Z).to_dense().to(torch.float64)
        eye = torch.eye(Z.shape[-2], dtype=torch.float64, device=Z.device)
        return psd_safe_cholesky(Kzz + self.jitter * eye)

    def _latent_inputs(self, X: Tensor) -> Tensor:
        return X.unsqueeze(-3) if self.num_classes is not None else X

    def _marginals(
        self, X: Tensor, moments: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Mean and variance of ``q(f)`` at ``X``, each (..., n) or (..., C, n) for softmax;
        ``moments`` are those of :meth:`_q_moments` when already computed."""
        Z = self.inducing_points
        Xl = self._latent_inputs(X)
        Kzz = self.kernel(Z).to_dense()
        Kzx = self.kernel(Z, Xl).to_dense()
        m, R = self._q_moments() if moments is None else moments
        middle = R @ R.mT - torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)  # S - I
        mean_update, var_update = whitened_marginal_updates(Kzz, Kzx, middle, m, self.jitter)
        kxx = self.kernel(Xl, diag=True)
        mean = self.gp.mean_module(Xl) + mean_update
        return mean, kxx + self.jitter + var_update

    def _chunked_marginals(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`_marginals` in row chunks of :data:`PREDICT_CHUNK` points (bounded memory
        for large prediction sets)."""
        if X.shape[-2] <= PREDICT_CHUNK:
            return self._marginals(X)
        moments = self._q_moments()
        parts = [self._marginals(x, moments) for x in X.split(PREDICT_CHUNK, dim=-2)]
        return torch.cat([p[0] for p in parts], -1), torch.cat([p[1] for p in parts], -1)

    def _joint(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """Mean (..., n) and joint covariance (..., n, n) of ``q(f)`` (leading C for softmax)."""
        Z = self.inducing_points
        Xl = self._latent_inputs(X)
        L = self._whitening_factor(Z).to(X.dtype)
        A = torch.linalg.solve_triangular(L, self.kernel(Z, Xl).to_dense(), upper=False)
        m, R = self._q_moments()
        B = R.mT @ A
        Kxx = self.kernel(Xl).to_dense()
        eye = torch.eye(X.shape[-2], dtype=X.dtype, device=X.device)
        cov = Kxx + self.jitter * eye - A.mT @ A + B.mT @ B  # K_xx + A^T (S - I) A
        mean = self.gp.mean_module(Xl) + (A.mT @ m.unsqueeze(-1)).squeeze(-1)
        return mean, 0.5 * (cov + cov.mT)

    def _posterior(self, X: Tensor, observation_noise: bool, joint: bool) -> GaussianPosterior:
        """:meth:`~gp.sparse.svgp.SVGP.posterior` in the parameters' dtype."""
        X = self._inputs(X)
        if joint:
            return self._joint_posterior(X, observation_noise)
        mean, var = self._chunked_marginals(X)
        if observation_noise:
            var = var + self.likelihood.noise
        if self.num_classes is not None:
            mean, var = mean.mT, var.mT
        else:
            mean, var = mean.unsqueeze(-1), var.unsqueeze(-1)
        batch = torch.broadcast_shapes(mean.shape, var.shape)
        return GaussianPosterior(mean.expand(batch), variance=var.expand(batch).clamp_min(0))

    def _joint_posterior(self, X: Tensor, observation_noise: bool) -> GaussianPosterior:
        mean, cov = self._joint(X)
        if observation_noise:
            eye = torch.eye(X.shape[-2], dtype=X.dtype, device=X.device)
            cov = cov + self.likelihood.noise.unsqueeze(-1) * eye
        if self.num_classes is not None:
            mean, cov = mean.mT, interleave_blocks(cov)
            batch = torch.broadcast_shapes(mean.shape[:-2], cov.shape[:-2])
            return GaussianPosterior(
                mean.expand(*batch, *mean.shape[-2:]),
                covariance=cov.expand(*batch, *cov.shape[-2:]),
            )
        batch = torch.broadcast_shapes(mean.shape[:-1], cov.shape[:-2])
        mean = mean.expand(*batch, mean.shape[-1]).unsqueeze(-1)
        return GaussianPosterior(mean, covariance=cov.expand(*batch, *cov.shape[-2:]))

    def kl_divergence(self, moments: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``KL(q(u) || p(u)) = KL(N(m, S) || N(0, I))`` (whitened), shape ``batch_shape``.

        .. math:: \\tfrac12\\big(\\operatorname{tr} S + m^\\top m - M - \\log|S|\\big)

        ``moments``: ``(m, R)`` with ``S = R R^T`` if already computed (internal).
        """
        m, R = self._q_moments() if moments is None else moments
        log_det = 2.0 * R.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
        kl = 0.5 * (R.square().sum((-2, -1)) + m.square().sum(-1) - m.shape[-1] - log_det)
        return kl.sum(-1) if self.num_classes is not None else kl

    def _expected_log_lik(self, y: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """``E_q(f_i)[log p(y_i | f_i)]``, shape (..., n)."""
        if self.kind == "gaussian":  # closed form
            noise = self.likelihood.noise
            return -0.5 * (_LOG_2PI + noise.log() + ((y - mean).square() + var) / noise)
        if self.kind == "softmax":  # Monte Carlo over the C latent GPs (gpytorch's estimator)
            mean, std = mean.mT, var.clamp_min(0).sqrt().mT  # (..., n, C)
            num = int(num_likelihood_samples.value())
            eps = torch.randn((num, *mean.shape), dtype=mean.dtype, device=mean.device)
            logits = mean + std * eps
            return self.likelihood.forward(logits).log_prob(y.long()).mean(0)
        dist = MultivariateNormal(mean, DiagLinearOperator(var))
        return self.likelihood.expected_log_prob(y, dist)

    def _elbo(self, X: Tensor, y: Tensor, num_data: int) -> Tensor:
        """Per-datum ELBO of validated data (see :meth:`~gp.sparse.svgp.SVGP.elbo`)."""
        moments = self._q_moments()  # once per evaluation (NGD: several O(M^3) steps)
        mean, var = self._marginals(X, moments)
        ell = self._expected_log_lik(y, mean, var)
        total = ell.sum(-1) * (num_data / X.shape[-2]) - self.kl_divergence(moments)
        return total / num_data

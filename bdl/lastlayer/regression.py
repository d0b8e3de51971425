"""Variational Bayesian last layer for regression with homoscedastic Gaussian noise.

Model (Harrison, Willes and Snoek, "Variational Bayesian last layers", ICLR 2024):
``y = W phi + b + eps`` with ``eps ~ N(0, diag(sigma^2))``, rows
``w_k ~ N(0, s_p I)`` a priori, ``s_p = prior_scale / d``, and ``q(w_k) = N(wbar_k, S_k)``.
The expected log-likelihood is exact (no Jensen gap):

    E_q log N(y | W phi + b, Sigma)
        = log N(y | Wbar phi + b, Sigma) - 1/2 sum_k phi^T S_k phi / sigma_k^2

so that ``N * elbo`` at the optimum equals the exact log evidence of Bayesian linear regression.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bdl.core.posterior import GaussianPosterior
from bdl.core.validation import check_inputs
from bdl.lastlayer._base import (
    LOG_2PI,
    flatten_features,
)
from bdl.lastlayer._dtype import posterior_in_input_dtype
from bdl.lastlayer._head import GaussianLastLayer


def interleave_block_diagonal(blocks: Tensor) -> Tensor:
    """Joint covariance of ``m`` independent outputs in interleaved order.

    Parameters
    ----------
    blocks : Tensor, shape (..., m, n, n)
        Covariance of each output across the ``n`` points.

    Returns
    -------
    Tensor, shape (..., n*m, n*m)
        Row ``i*m + j`` is point ``i``, output ``j``.
    """
    m, n = blocks.shape[-3], blocks.shape[-1]
    if m == 1:
        return blocks[..., 0, :, :]
    eye = torch.eye(m, dtype=blocks.dtype, device=blocks.device)
    joint = torch.einsum("...jil,jk->...ijlk", blocks, eye)  # (..., n, m, n, m)
    return joint.reshape(blocks.shape[:-3] + (n * m, n * m))


class VBLLRegression(GaussianLastLayer):
    """Bayesian linear regression head trained by a sampling-free variational bound.

    A :class:`bdl.core.Model` on features: ``posterior(features)`` (joint across points on
    request) and ``fit((features, y))`` (minibatch Adam, or ``closed_form=True``).

    Parameters
    ----------
    in_features : int
        Feature width ``d``.
    out_features : int
        Number of regression outputs ``m``.
    num_data : int, optional
        Training-set size ``N``; the KL term of :meth:`loss` is weighted by ``1/N``. Needed
        before calling :meth:`loss` (can be set later as ``head.num_data = N``).
    covariance : {"dense", "diagonal", "lowrank"}
        Posterior covariance family of each output's weight vector.
    rank : int
        Rank of the low-rank factor when ``covariance="lowrank"``.
    prior_scale : float
        Prior variance of the weights times ``d`` (``s_p = prior_scale / d``).
    noise_std : float
        Initial observation-noise standard deviation (same for every output). The default 1.0
        is the marginal spread of standardised targets: the noise starts at the data scale and
        shrinks as the fit improves (a deterministic, scale-aware start).
    learn_noise : bool
        Learn the noise as a point estimate; otherwise keep it at ``noise_std``.
    wishart_scale : float or None
        Scale of the inverse-Wishart-type prior on the noise (None: no prior).
    dof : float
        Degrees of freedom of that prior.
    bias : bool
        Learn a point-estimated output offset ``b``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int = 1,
        *,
        num_data: int | None = None,
        covariance: str = "dense",
        rank: int = 4,
        prior_scale: float = 1.0,
        noise_std: float = 1.0,
        learn_noise: bool = True,
        wishart_scale: float | None = 1e-2,
        dof: float = 1.0,
        bias: bool = True,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            num_data=num_data,
            covariance=covariance,
            rank=rank,
            prior_scale=prior_scale,
            # start at the prior spread: the bound then pulls S down as data accumulates
            init_scale=1.0,
            noise_std=noise_std,
            learn_noise=learn_noise,
            wishart_scale=wishart_scale,
            dof=dof,
            bias=bias,
            learn_prior=False,
        )
        self.out_features = out_features

    # -- pieces ----------------------------------------------------------------------------
    @property
    def noise_variance(self) -> Tensor:
        """Observation-noise variance per output, shape (m,)."""
        return torch.exp(2.0 * self.log_noise_std)

    _task = "regression"
    _outputs_name = "out_features"

    def _check_target(self, y: Tensor, n: int) -> Tensor:
        if not isinstance(y, Tensor):
            raise ValueError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if not y.is_floating_point():
            raise ValueError(f"y must be a floating-point tensor, got dtype {y.dtype}")
        y = y.to(self.weights.mean.dtype)
        if y.dim() == 1 and self.out_features == 1:
            y = y.unsqueeze(-1)
        if y.dim() != 2 or y.shape != (n, self.out_features):
            raise ValueError(
                f"y must have shape ({n}, {self.out_features}) to match features, "
                f"got {tuple(y.shape)}"
            )
        return y

    def expected_log_likelihood(self, features: Tensor, y: Tensor) -> Tensor:
        """``E_q log p(y_i | phi_i)`` per point, summed over outputs; shape (n,)."""
        phi, _ = flatten_features(features, self.in_features)
        y = self._check_target(y, phi.shape[0])
        inv_noise = torch.exp(-2.0 * self.log_noise_std)
        sq = (y - self._mean(phi)).pow(2) + self.weights.cov.quad(phi)
        per_output = -0.5 * (sq * inv_noise + LOG_2PI) - self.log_noise_std
        return per_output.sum(-1)

    def data_term(self, features: Tensor, y: Tensor) -> Tensor:
        return self.expected_log_likelihood(features, y)

    def elbo(self, features: Tensor, y: Tensor) -> Tensor:
        """Full-data evidence lower bound ``sum_i E_q log p(y_i) - KL`` (no noise prior)."""
        return self.expected_log_likelihood(features, y).sum() - self.kl_divergence()

    # -- prediction ------------------------------------------------------------------------
    def posterior(
        self, X: Tensor, *, observation_noise: bool = False, joint: bool = False
    ) -> GaussianPosterior:
        """Predictive distribution at the features ``X``.

        Parameters
        ----------
        X : Tensor, shape (..., n, d)
            Features, any leading batch shape. The posterior is computed in the promoted
            dtype of ``X`` and the head and returned in ``X``'s dtype; it is differentiable in
            ``X``.
        observation_noise : bool
            Include the noise ``sigma^2`` (the predictive of ``y``) or not (latent ``f``).
        joint : bool
            Return the full joint covariance across the ``n`` points (per batch), e.g. for
            batch acquisition functions.

        Returns
        -------
        GaussianPosterior, mean shape (..., n, m)
        """
        X = check_inputs(X, self.in_features, name="features")
        return posterior_in_input_dtype(
            self, X, "_posterior", observation_noise=observation_noise, joint=joint
        )

    def _posterior(self, phi: Tensor, observation_noise: bool, joint: bool) -> GaussianPosterior:
        mean = self._mean(phi)  # (..., n, m)
        noise = self.noise_variance if observation_noise else None
        if joint:
            blocks = self.weights.cov.cross(phi, phi)  # (..., m, n, n)
            if noise is not None:
                eye = torch.eye(phi.shape[-2], dtype=phi.dtype, device=phi.device)
                blocks = blocks + noise[:, None, None] * eye
            return GaussianPosterior(mean, covariance=interleave_block_diagonal(blocks))
        var = self.weights.cov.quad(phi.reshape(-1, self.in_features)).reshape(mean.shape)
        return GaussianPosterior(mean, variance=var if noise is None else var + noise)

    def fit(
        self,
        data: tuple[Tensor, Tensor],
        *,
        epochs: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        verbose: bool = False,
        max_grad_norm: float | None = 1.0,
        closed_form: bool = False,
    ) -> VBLLRegression:
        """Fit the head to fixed features; returns self with ``history_``.

        Parameters
        ----------
        data : tuple (features, y) of Tensor
            ``features`` of shape (N, d) and targets (N, m) or (N,); ``num_data`` becomes N.
        epochs, lr, batch_size : int, float, int
            Minibatch Adam on the per-datum negative ELBO (defaults 100, 1e-2, 128).
        seed : int, optional
            Seed of the minibatch order (None: torch's global random state).
        verbose : bool
            Show a progress bar.
        max_grad_norm : float or None
            Gradient-norm clipping (default 1).
        closed_form : bool
            Instead of Adam, the exact optimum (:meth:`fit_closed_form`, the noise by type-II
            maximum likelihood when the head learns it); ``history_`` then holds the loss at
            that optimum and the optimiser arguments are not used.
        """
        if not closed_form:
            return super().fit(
                data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                verbose=verbose, max_grad_norm=max_grad_norm,
            )  # fmt: skip
        features, y = self._fit_tensors(data)
        self.num_data = features.shape[0]
        self.fit_closed_form(features, y)
        with torch.no_grad():
            self.history_ = [float(self.loss(features, y))]
        return self

    # -- closed form -----------------------------------------------------------------------
    @torch.no_grad()
    def fit_closed_form(
        self,
        features: Tensor,
        y: Tensor,
        *,
        learn_noise: bool | None = None,
        learn_prior: bool = False,
        max_iter: int = 200,
        tol: float = 1e-10,
    ) -> dict[str, Tensor]:
        """Set ``q(W)`` (and optionally the noise and prior) to the exact optimum given features.

        With fixed features the bound's maximiser is the Bayesian linear regression posterior
        ``S_k = (Phi^T Phi / sigma_k^2 + I / s_p)^-1``, ``wbar_k = S_k Phi^T y_k / sigma_k^2``.
        The noise (and, if asked, ``s_p``) are set by type-II maximum likelihood with MacKay's
        fixed point (``gamma = sum_i lam_i / (lam_i + sigma^2 / s_p)``,
        ``sigma^2 = ||y - Phi wbar||^2 / (n - gamma)``, ``s_p = ||wbar||^2 / gamma``) on one
        eigendecomposition of ``Phi^T Phi``. With ``bias=True`` features and targets are
        centred for the hyperparameters and the mean (the offset is profiled out), and ``S``
        is the bound's optimum given the point-estimated offset (uncentred Gram matrix). The
        returned ``log_evidence`` integrates the offset out under a flat prior (``n - 1``
        effective points), so it is not directly comparable with :meth:`elbo`, which treats
        the offset as fixed. The noise prior is not used here.

        Parameters
        ----------
        features : Tensor, shape (n, d)
        y : Tensor, shape (n, m) or (n,)
        learn_noise : bool, optional
            Set the noise by type-II maximum likelihood. Default: whether the head learns its
            noise (``learn_noise`` of the constructor); otherwise the current noise is kept.
        learn_prior : bool
            Set the prior variance by type-II maximum likelihood.

        Returns
        -------
        dict with ``log_evidence`` (m,), ``noise_variance`` (m,), ``prior_variance`` (m,).

        Raises
        ------
        ValueError
            Naming ``features`` or ``y`` (shape, dtype, NaN or inf), or for a single sample
            with ``bias=True`` when the noise or the prior is to be learned (the offset takes
            the only degree of freedom).

        Notes
        -----
        The learned noise is floored at ``1e-10`` times the targets' second moment (centred
        with ``bias=True``), or their squared level if they are constant, or 1 if they are
        all zero, so that a perfect fit leaves a positive noise and a finite ``S``.
        """
        if learn_noise is None:
            learn_noise = isinstance(self.log_noise_std, nn.Parameter)
        phi, _ = flatten_features(
            features, self.in_features, finite=True, dtype=self.weights.mean.dtype
        )
        y = self._check_target(y, phi.shape[0])
        if not bool(torch.isfinite(y).all()):
            raise ValueError("y contains NaN or inf")
        phi64, y64 = phi.double(), y.double()
        n, d = phi64.shape
        if self.bias is not None and n < 2 and (learn_noise or learn_prior):
            raise ValueError(
                f"fit_closed_form needs at least 2 samples to learn the noise or the prior "
                f"variance with bias=True, got features with {n} row: the offset takes the "
                "only degree of freedom (pass learn_noise=False, learn_prior=False to keep them)"
            )
        level = y64.pow(2).mean(0)  # (m,) uncentred second moment of the targets
        if self.bias is not None:
            phi_mean, y_mean = phi64.mean(0), y64.mean(0)
            phi64, y64 = phi64 - phi_mean, y64 - y_mean
        evals, evecs = torch.linalg.eigh(phi64.T @ phi64)
        evals = evals.clamp_min(0.0)
        proj = evecs.T @ (phi64.T @ y64)  # (d, m) rotated Phi^T y
        yy = y64.pow(2).sum(0)  # (m,)
        # the noise floor is relative to the targets' (centred) second moment, to their level
        # when they are constant, and to 1 when they are all zero: a positive noise keeps S
        # finite
        floor_scale = torch.where(yy > 0, yy / n, torch.where(level > 0, level, 1.0))
        n_eff = n - 1 if self.bias is not None else n
        noise, prior = evidence_fixed_point(
            (evals, proj, yy, n_eff), self.noise_variance.double().clone(),
            torch.full_like(yy, self.weights.prior_variance), 1e-10 * floor_scale,
            learn_noise=learn_noise, learn_prior=learn_prior, max_iter=max_iter, tol=tol,
        )  # fmt: skip
        prec, w_rot, resid = _rotated_solution(evals, proj, yy, noise, prior)
        log_evidence = -0.5 * (
            n_eff * torch.log(2 * math.pi * noise)
            + d * torch.log(prior)
            + prec.log().sum(0)
            + resid / noise
            + w_rot.pow(2).sum(0) / prior
        )
        mean = (evecs @ w_rot).T  # (m, d)
        # q(W) given the point-estimated offset: its covariance uses the *uncentred* Gram
        # matrix (the ELBO's optimum in S), while the mean is the centred (profiled) solution.
        gram = phi64.T @ phi64
        if self.bias is not None:
            gram = gram + n * torch.outer(phi_mean, phi_mean)
        eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
        precision = torch.stack([gram / noise[k] + eye / prior[k] for k in range(len(noise))])
        if learn_prior:
            self.weights.prior_variance = float(prior[0])
        self.weights.assign_from_precision(mean, precision)
        if self.bias is not None:
            self.bias.copy_((y_mean - phi_mean @ mean.T).to(self.bias.dtype))
        if learn_noise:
            self.log_noise_std.copy_((0.5 * noise.log()).to(self.log_noise_std.dtype))
        return {"log_evidence": log_evidence, "noise_variance": noise, "prior_variance": prior}


def _rotated_solution(
    evals: Tensor, proj: Tensor, yy: Tensor, noise: Tensor, prior: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Posterior precision eigenvalues (d, m), rotated mean (d, m) and residual sum of
    squares (m,) of Bayesian linear regression in the eigenbasis of ``Phi^T Phi``."""
    prec = evals[:, None] / noise + 1.0 / prior
    w_rot = proj / noise / prec
    resid = yy - 2.0 * (w_rot * proj).sum(0) + (evals[:, None] * w_rot.pow(2)).sum(0)
    return prec, w_rot, resid


def evidence_fixed_point(
    stats: tuple[Tensor, Tensor, Tensor, int],
    noise: Tensor,
    prior: Tensor,
    noise_floor: Tensor,
    *,
    learn_noise: bool,
    learn_prior: bool,
    max_iter: int,
    tol: float,
) -> tuple[Tensor, Tensor]:
    """MacKay's fixed point for the noise (per output) and the pooled prior variance.

    ``gamma = sum_i lam_i / (lam_i + sigma^2 / s_p)``, ``sigma^2 = ||y - Phi wbar||^2 /
    (n_eff - gamma)`` and ``s_p = sum ||wbar||^2 / sum gamma``, from ``stats = (evals, proj,
    yy, n_eff)``: eigenvalues of ``Phi^T Phi`` (d,), rotated ``Phi^T y`` (d, m), ``y^T y``
    (m,) and the effective number of points. The floors keep it away from the degenerate
    maxima at 0 (a perfect fit drives the noise to 0; a target with no signal the prior).
    """
    evals, proj, yy, n_eff = stats
    for _ in range(max_iter):
        prec, w_rot, resid = _rotated_solution(evals, proj, yy, noise, prior)
        gamma = (evals[:, None] / noise / prec).sum(0)
        new_noise = noise
        if learn_noise:
            new_noise = (resid / (n_eff - gamma).clamp_min(1e-12)).maximum(noise_floor)
        new_prior = prior
        if learn_prior:  # one prior variance shared by all outputs: pooled fixed point
            pooled = (w_rot.pow(2).sum() / gamma.sum().clamp_min(1e-12)).clamp(1e-10, 1e6)
            new_prior = pooled.expand_as(prior)
        change = ((new_noise - noise).abs() / noise).max() + (
            (new_prior - prior).abs() / prior
        ).max()
        noise, prior = new_noise, new_prior
        if change < tol:
            break
    return noise, prior

"""Pieces shared by the VBLL heads: Gaussian weight posteriors, KL terms, noise priors."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bdl.core.linalg import psd_safe_cholesky
from bdl.core.validation import check_int, check_positive
from bdl.lastlayer._covariance import (
    COVARIANCE_KINDS,
    Covariance,
    DiagonalCovariance,
    make_covariance,
)

LOG_2PI = math.log(2.0 * math.pi)


class GaussianWeights(nn.Module):
    """``k`` independent Gaussian rows ``q(w_j) = N(mean_j, S_j)`` over ``d`` features.

    Parameters
    ----------
    k, d : int
        Number of rows (outputs or classes) and feature width.
    covariance : {"dense", "diagonal", "lowrank"}
        Covariance family of each ``S_j``.
    rank : int, optional
        Rank of the low-rank factor (``covariance="lowrank"``).
    prior_variance : float
        Variance ``s_p`` of the isotropic prior ``N(0, s_p I)`` on each row.
    init_std : float
        Initial posterior standard deviation along every axis.
    mean_init_std : float
        Standard deviation of the random initial means (0 gives zeros).
    learn_prior : bool
        Treat ``log s_p`` as a parameter (empirical Bayes: the bound is maximised over the
        prior variance too, whose optimum is ``(sum_j ||mean_j||^2 + tr S_j) / (k d)``).
    """

    def __init__(
        self,
        k: int,
        d: int,
        *,
        covariance: str,
        rank: int | None,
        prior_variance: float,
        init_std: float,
        mean_init_std: float,
        learn_prior: bool = False,
    ) -> None:
        super().__init__()
        if covariance not in COVARIANCE_KINDS:
            raise ValueError(f"covariance must be one of {COVARIANCE_KINDS}, got {covariance!r}")
        self.mean = nn.Parameter(mean_init_std * torch.randn(k, d))
        self.cov: Covariance = make_covariance(covariance, k, d, init_std, rank)
        log_prior = torch.tensor(math.log(prior_variance))
        if learn_prior:
            self.log_prior_variance = nn.Parameter(log_prior)
        else:
            self.register_buffer("log_prior_variance", log_prior)

    @property
    def prior_variance(self) -> float:
        """Prior variance ``s_p`` of every weight."""
        return float(self.log_prior_variance.exp())

    @prior_variance.setter
    def prior_variance(self, value: float) -> None:
        with torch.no_grad():
            self.log_prior_variance.fill_(math.log(value))

    def kl_divergence(self) -> Tensor:
        """``sum_j KL(N(mean_j, S_j) || N(0, s_p I))`` including the ``-d`` constant."""
        log_s_p = self.log_prior_variance
        k, d = self.mean.shape
        quad = (self.mean.pow(2).sum() + self.cov.trace().sum()) * torch.exp(-log_s_p)
        return 0.5 * (quad - self.cov.logdet().sum() + k * d * (log_s_p - 1.0))

    def assign_from_precision(self, mean: Tensor, precision: Tensor) -> None:
        """Set ``q`` to the KL(q || N(mean, precision^-1))-optimal member of the family.

        Exact for ``dense`` (``S = precision^-1``) and ``diagonal`` (``S_ii = 1 / precision_ii``,
        the mean-field optimum); for ``lowrank`` the top eigenpairs of ``precision^-1`` plus a
        diagonal remainder (an approximation).

        Parameters
        ----------
        mean : Tensor, shape (k, d)
        precision : Tensor, shape (k, d, d)
        """
        dtype = self.mean.dtype
        with torch.no_grad():
            self.mean.copy_(mean.to(dtype))
            if isinstance(self.cov, DiagonalCovariance):
                variances = 1.0 / precision.diagonal(dim1=-2, dim2=-1)
                self.cov.assign(torch.diag_embed(variances).to(dtype))
            else:
                # float64 with bounded, reported jitter: a precision built from nearly collinear
                # features (e.g. clustered Bayesian-optimisation inputs) can lose definiteness
                # in float32 round-off
                chol = psd_safe_cholesky(precision.double())
                self.cov.assign(torch.cholesky_inverse(chol).to(dtype))


def check_head_args(
    in_features: int,
    out_features: int,
    prior_scale: float,
    num_data: int | None,
    *,
    outputs_name: str = "out_features",
) -> None:
    """Validate the constructor arguments every head shares."""
    check_int("in_features", in_features)
    check_int(outputs_name, out_features, minimum=2 if outputs_name == "num_classes" else 1)
    check_positive("prior_scale", prior_scale)
    if num_data is not None:
        check_int("num_data", num_data)


def inverse_wishart_log_prior(log_std: Tensor, scale: float | None, dof: float) -> Tensor:
    """Log density (up to a constant) of a diagonal noise covariance under an IW-type prior.

    ``nu' * sum log sigma^-2 - 0.5 * scale * sum sigma^-2`` with ``nu' = (dof + k + 1) / 2``
    for ``k = log_std.numel()``; zero when ``scale`` is None (no prior, maximum likelihood).
    """
    if scale is None:
        return log_std.new_zeros(())
    nu = 0.5 * (dof + log_std.numel() + 1.0)
    return -2.0 * nu * log_std.sum() - 0.5 * scale * torch.exp(-2.0 * log_std).sum()


def flatten_features(
    features: Tensor, in_features: int, *, finite: bool = False, dtype: torch.dtype | None = None
) -> tuple[Tensor, torch.Size]:
    """Check ``features`` (..., d) and return it as (n, d) plus the leading shape.

    ``finite=True`` also rejects NaN/inf (a device sync: used on prediction and closed-form
    paths, not in the per-step training loss, where a NaN shows up in the loss itself).
    """
    if not isinstance(features, Tensor):
        raise ValueError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() < 1 or features.shape[-1] != in_features:
        raise ValueError(
            f"features must have shape (..., {in_features}), got {tuple(features.shape)}"
        )
    if dtype is not None and features.dtype != dtype:
        raise ValueError(
            f"features have dtype {features.dtype} but the head's parameters are {dtype}: "
            "convert one of them (e.g. head.to(features.dtype))"
        )
    if finite and not bool(torch.isfinite(features).all()):
        raise ValueError("features contain NaN or inf")
    lead = features.shape[:-1]
    return features.reshape(-1, in_features), lead


def loss_features(features: Tensor, in_features: int, dtype: torch.dtype) -> Tensor:
    """``features`` (..., d) as (B, d) for a head's ``loss`` in the head's ``dtype``.

    Under autocast the features are cast to the head's precision; otherwise a different
    dtype is a ValueError naming ``features`` (a training loss is computed in one dtype).
    """
    phi, _ = flatten_features(features, in_features)
    if torch.is_autocast_enabled(phi.device.type):
        return phi.to(dtype)  # the bound is computed in the head's precision
    if phi.dtype != dtype:
        flatten_features(phi, in_features, dtype=dtype)  # raises, naming features
    return phi


def check_finite_loss(loss: Tensor, features: Tensor, y: Tensor, overflow: str = "") -> Tensor:
    """``loss`` if it is finite; otherwise the reason as an error (one device sync per call).

    A NaN or inf in ``features`` or in floating ``y`` always makes the loss non-finite, so
    checking the scalar loss is enough to catch them: only then are the inputs scanned.

    Raises
    ------
    ValueError
        Naming ``features`` or ``y`` when they contain NaN or inf.
    RuntimeError
        When the loss overflowed with finite inputs (``overflow`` says why it can).
    """
    if bool(torch.isfinite(loss.detach())):
        return loss
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features contain NaN or inf")
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        raise ValueError("y contains NaN or inf")
    raise RuntimeError(
        f"the loss overflowed to {float(loss.detach())} in {loss.dtype} with finite features and y"
        f"{overflow}; standardise the features, compute in float64, or (while training) "
        "lower the learning rate"
    )


def require_num_data(num_data: int | None) -> int:
    """The dataset size that scales the KL term; an error if the user never set it."""
    if num_data is None:
        raise ValueError(
            "num_data is not set: pass num_data=len(train_set) to the head (the KL term of the "
            "per-datum ELBO is weighted by 1/num_data)"
        )
    return num_data

"""``ExactGP``: exact GP regression by Cholesky, with an analytic (trace-form) gradient."""

from __future__ import annotations

import math
import warnings

import torch
from gpytorch.kernels import Kernel
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bdl.core.linalg import JitterWarning, psd_safe_cholesky
from bdl.core.model import Model, cast_posterior
from bdl.core.posterior import GaussianPosterior
from bdl.core.validation import check_inputs
from gp._noise import NoiseMixin
from gp.fitting import MarginalLikelihoodFit
from gp.kernels.matvec import cross_covariance_chunks, kernel_diag
from gp.likelihoods import NOISE_LOWER_BOUND

__all__ = ["ExactGP", "gaussian_log_marginal_likelihood", "psd_posterior_covariance"]

_LOG_2PI = math.log(2.0 * math.pi)
_MEANS = ("constant", "zero")


class _CholeskyLML(torch.autograd.Function):
    """``log N(r; 0, K)`` with the analytic gradient ``dL/dK = (alpha alpha^T - K^-1) / 2``."""

    @staticmethod
    def forward(ctx, K: Tensor, r: Tensor) -> Tensor:
        L = psd_safe_cholesky(K)
        alpha = torch.cholesky_solve(r.unsqueeze(-1), L).squeeze(-1)
        n = r.shape[-1]
        log_det = 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        lml = -0.5 * ((r * alpha).sum(-1) + log_det + n * _LOG_2PI)
        ctx.save_for_backward(L, alpha)
        return lml

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        L, alpha = ctx.saved_tensors
        grad_K = grad_r = None
        g = grad.unsqueeze(-1)
        if ctx.needs_input_grad[0]:
            # dL/dK = 1/2 (alpha alpha^T - K^{-1}); built in place on the K^{-1} buffer.
            grad_K = torch.cholesky_inverse(L)
            grad_K.mul_(-0.5)
            grad_K.add_(0.5 * alpha.unsqueeze(-1) * alpha.unsqueeze(-2))
            grad_K.mul_(g.unsqueeze(-1))
        if ctx.needs_input_grad[1]:
            grad_r = -alpha * g
        return grad_K, grad_r


def gaussian_log_marginal_likelihood(K: Tensor, r: Tensor) -> Tensor:
    """Exact ``log N(r; 0, K)`` by Cholesky, differentiable through an analytic gradient.

    .. math::
        \\mathcal{L} = -\\tfrac12 r^\\top K^{-1} r - \\tfrac12 \\log|K| - \\tfrac n2 \\log 2\\pi,
        \\qquad
        \\frac{\\partial \\mathcal{L}}{\\partial K} = \\tfrac12(\\alpha\\alpha^\\top - K^{-1}),
        \\quad \\frac{\\partial \\mathcal{L}}{\\partial r} = -\\alpha, \\quad \\alpha = K^{-1} r,

    with ``K^{-1}`` from ``torch.cholesky_inverse`` (one extra O(n^3) pass, no autograd graph
    through the factorisation). If ``K`` is numerically not positive definite, bounded jitter
    is added and reported (:func:`bdl.core.linalg.psd_safe_cholesky`, ``JitterWarning``); the value
    and gradient are then those of the jittered matrix.

    Parameters
    ----------
    K : Tensor, shape (..., n, n)
        Symmetric positive-definite covariance (kernel matrix plus noise).
    r : Tensor, shape (..., n)
        Residual ``y - mean``.

    Returns
    -------
    Tensor, shape (...)
        The log density, summed over the ``n`` points.
    """
    batch = torch.broadcast_shapes(K.shape[:-2], r.shape[:-1])
    K = K.expand(*batch, *K.shape[-2:])
    r = r.expand(*batch, r.shape[-1])
    return _CholeskyLML.apply(K, r)


def psd_posterior_covariance(cov: Tensor, prior: Tensor, n: int, max_tries: int = 7) -> Tensor:
    """``cov`` itself if it has a Cholesky factor, else ``cov + jitter I`` with the smallest
    jitter of a bounded ladder that has one, reported by a ``JitterWarning``.

    A posterior covariance ``K_** - K_*X (K + s I)^-1 K_X*`` is positive semi-definite, but at
    (or next to) the training inputs of a nearly noiseless fit its eigenvalues are of the
    order of the noise, below the rounding error of the subtraction, which is about
    ``eps * n * max diag K_**`` (``n`` terms of size up to ``K_**`` in each entry). The jitter
    therefore starts at that size, relative to the *prior* variance (a jitter relative to
    the posterior's own, tiny, diagonal cannot reach the rounding error) and grows tenfold
    per try, at most ``max_tries`` times.

    Parameters
    ----------
    cov : Tensor, shape (..., k, k)
        Posterior covariance (symmetric).
    prior : Tensor, shape (..., k, k)
        Prior covariance ``K_**`` of the same points.
    n : int
        Number of training points.

    Raises
    ------
    torch.linalg.LinAlgError
        If even the largest jitter leaves ``cov`` without a Cholesky factor.
    """
    _, info = torch.linalg.cholesky_ex(cov)
    if not bool(info.any()):
        return cov
    scale = prior.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(torch.finfo(cov.dtype).tiny)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    relative = torch.finfo(cov.dtype).eps * max(n, 1)
    for _ in range(max_tries):
        jittered = cov + (relative * scale)[..., None, None] * eye
        _, info = torch.linalg.cholesky_ex(jittered)
        if not bool(info.any()):
            warnings.warn(
                f"the posterior covariance was not numerically positive definite; added "
                f"jitter {relative:.1e} x the largest prior variance "
                f"({float(relative * scale.max()):.1e}) to its diagonal",
                JitterWarning,
                stacklevel=3,
            )
            return jittered
        relative *= 10.0
    raise torch.linalg.LinAlgError(
        f"the posterior covariance is not positive definite even with jitter "
        f"{relative / 10:.1e} x the largest prior variance; compute in float64"
    )


def _as_targets(y: object, X: Tensor) -> Tensor:
    """Validate targets against inputs ``X`` (..., n, d): shape (..., n) or (..., n, 1)."""
    if not isinstance(y, Tensor):
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"y must be a tensor of shape (..., n), got {y!r}") from err
    if not (y.dtype.is_floating_point or y.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"y must hold real numbers, got dtype {y.dtype}")
    if not y.dtype.is_floating_point:
        y = y.to(torch.get_default_dtype())
    expected = X.shape[:-1]
    if y.shape == expected + (1,):
        y = y.squeeze(-1)
    if y.shape != expected:
        raise ValueError(
            f"y has shape {tuple(y.shape)} but X has shape {tuple(X.shape)}; expected y of "
            f"shape {tuple(expected)} (one target per row of X)"
        )
    if not bool(torch.isfinite(y).all()):
        raise ValueError("y contains NaN or inf; targets must be finite")
    if y.device != X.device:
        raise ValueError(f"y is on {y.device} but X is on {X.device}; use one device")
    return y


class ExactGP(nn.Module, NoiseMixin, MarginalLikelihoodFit, Model):
    """Exact GP regression: Cholesky factorisation, analytic gradients, joint posteriors.

    The model is ``y_i = f(x_i) + eps_i`` with ``f ~ GP(mu, k)``, ``mu`` a learned constant
    (or zero) and ``eps_i ~ N(0, noise)``. Everything is exact: the log marginal likelihood
    is computed from a Cholesky factor of ``K + noise I`` (O(n^3) time, O(n^2) memory), never
    by conjugate gradients or stochastic trace estimators, whatever the size of ``n``.
    Implements :class:`bdl.core.Model`.

    Usage::

        model = ExactGP(ScaleKernel(MaternKernel(nu=1.5)), noise=0.1).double()
        model.fit((X, y))                             # type-II ML (L-BFGS), history_
        loss = -model.log_marginal_likelihood(X, y)   # full sum over points
        post = model.posterior(X_new)                 # GaussianPosterior, marginal variances
        post = model.posterior(X_new, joint=True)     # ... with the joint covariance

    Several independent GPs are handled by a leading batch shape: ``X`` of shape
    ``(b, n, d)`` and ``y`` of shape ``(b, n)`` give ``b`` log marginal likelihoods. They share
    hyperparameters unless the kernel has ``batch_shape=(b,)`` and ``batch_shape=(b,)`` is
    given here too (for the noise and the constant mean).

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel
        Prior covariance ``k``; its hyperparameters are parameters of this module.
    noise : float or Tensor, default 0.1
        Initial observation-noise variance, > ``noise_lower_bound``. Stored as
        ``raw_noise`` (shape ``batch_shape``) behind a gpytorch ``GreaterThan`` constraint
        (``raw_noise_constraint``): ``noise = softplus(raw_noise) + noise_lower_bound``.
    mean : {"constant", "zero"}, default "constant"
        Prior mean: a learned constant ``constant`` (shape ``batch_shape``, initially 0) or 0.
    batch_shape : torch.Size, default ()
        Batch shape of the noise and constant-mean parameters.
    noise_lower_bound : float, default :data:`gp.likelihoods.NOISE_LOWER_BOUND` (1e-6)
        Lower bound of the noise variance (0 allows any positive noise).

    Attributes
    ----------
    train_X : Tensor or None, shape (..., n, d)
    train_y : Tensor or None, shape (..., n)
        Data from :meth:`set_data` (non-persistent buffers: moved and cast by ``.to()``, not
        part of ``state_dict``).
    history_ : list of float
        ``-log p(y)`` during the last :meth:`fit`.

    Notes
    -----
    Gradient: the log marginal likelihood is a custom autograd function of ``K + noise I`` and
    the residual ``r = y - mu`` whose backward pass returns
    ``dL/dK = (alpha alpha^T - K^{-1}) / 2`` with ``alpha = K^{-1} r`` (``K^{-1}`` from
    ``torch.cholesky_inverse``); autograd then carries it through the kernel evaluation to the
    hyperparameters. This is the trace form ``dL/dtheta = tr((alpha alpha^T - K^{-1}) dK/dtheta)
    / 2`` without differentiating through the factorisation.

    Computation happens in the dtype of the data (cast the module with ``.double()`` for
    float64); :meth:`posterior` computes in the promoted dtype of the data and ``X`` and
    answers in ``X``'s. Non-positive-definite matrices get bounded jitter with a
    ``JitterWarning``; a joint posterior covariance gets it relative to the prior variance
    (:func:`psd_posterior_covariance`), so that posteriors at the training inputs of a
    nearly noiseless fit can be sampled and scored. The noise stays above
    ``noise_lower_bound``, so constant or noiseless targets keep a positive noise.
    """

    def __init__(
        self,
        kernel: Kernel,
        noise: float | Tensor = 0.1,
        mean: str = "constant",
        batch_shape: torch.Size | tuple[int, ...] = torch.Size(),
        noise_lower_bound: float = NOISE_LOWER_BOUND,
    ) -> None:
        super().__init__()
        if not isinstance(kernel, Kernel):
            raise ValueError(f"kernel must be a gpytorch Kernel, got {type(kernel).__name__}")
        if mean not in _MEANS:
            raise ValueError(f"mean must be one of {_MEANS}, got {mean!r}")
        self._batch_shape = torch.Size(batch_shape)
        self.kernel = kernel
        self.mean_type = mean
        self._init_noise(noise, noise_lower_bound, self._batch_shape)
        if mean == "constant":
            self.constant = nn.Parameter(torch.zeros(self._batch_shape))
        else:
            self.register_parameter("constant", None)
        # the data (not state: non-persistent buffers, so they follow .to() and pickling)
        self.register_buffer("train_X", None, persistent=False)
        self.register_buffer("train_y", None, persistent=False)

    @property
    def num_outputs(self) -> int:
        """One output."""
        return 1

    @property
    def batch_shape(self) -> torch.Size:
        """Batch shape of the parameters broadcast with that of the data set (if any)."""
        if self.train_X is None:
            return self._batch_shape
        return torch.broadcast_shapes(
            self._batch_shape, self.train_X.shape[:-2], self.train_y.shape[:-1]
        )

    # -- data -----------------------------------------------------------------------------
    def set_data(self, X: Tensor, y: Tensor) -> ExactGP:
        """Condition on observations ``y`` at inputs ``X`` for :meth:`posterior`.

        Parameters
        ----------
        X : Tensor, shape (..., n, d) or (n,)
            Finite inputs (a 1-D ``X`` is ``n`` one-dimensional inputs).
        y : Tensor, shape (..., n) or (..., n, 1)
            Finite targets.

        Returns
        -------
        ExactGP
            ``self``.
        """
        X = check_inputs(X)
        self.train_X, self.train_y = X, _as_targets(y, X)
        return self

    def _resolve_data(self, X: Tensor | None, y: Tensor | None) -> tuple[Tensor, Tensor]:
        if X is None and y is None:
            if self.train_X is None:
                raise RuntimeError("no data: pass X and y, or call set_data(X, y) first")
            return self.train_X, self.train_y
        if X is None or y is None:
            raise ValueError("give both X and y (or neither, to use the data from set_data)")
        X = check_inputs(X)
        return X, _as_targets(y, X)

    def _prior_mean(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Constant prior mean ``mu``, shape ``batch_shape + (1,)`` (zeros if ``mean='zero'``)."""
        if self.constant is None:
            return torch.zeros(self._batch_shape + (1,), dtype=dtype, device=device)
        return self.constant.to(dtype=dtype, device=device).unsqueeze(-1)

    def _train_covariance(self, X: Tensor) -> Tensor:
        """``K(X, X) + noise I``, shape (..., n, n)."""
        K = self.kernel(X).to_dense().to(X.dtype)
        noise = self.noise.to(dtype=X.dtype, device=X.device)
        batch = torch.broadcast_shapes(K.shape[:-2], noise.shape)
        K = K.expand(*batch, *K.shape[-2:])
        eye = torch.eye(X.shape[-2], dtype=X.dtype, device=X.device)
        return K + noise.expand(batch)[..., None, None] * eye

    # -- inference ------------------------------------------------------------------------
    def log_marginal_likelihood(self, X: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        """Exact log marginal likelihood ``log p(y | X)``, summed over the ``n`` points.

        .. math:: \\log p(y|X) = -\\tfrac12 r^\\top (K + \\sigma^2 I)^{-1} r
            - \\tfrac12 \\log|K + \\sigma^2 I| - \\tfrac n2 \\log 2\\pi,\\quad r = y - \\mu

        Parameters
        ----------
        X : Tensor, shape (..., n, d), optional
        y : Tensor, shape (..., n), optional
            Data; default: the data given to :meth:`set_data`.

        Returns
        -------
        Tensor, shape (...)
            One value per independent GP in the batch; differentiable (analytic gradient)
            with respect to the kernel hyperparameters, ``raw_noise`` and ``constant``.
        """
        X, y = self._resolve_data(X, y)
        K = self._train_covariance(X)
        r = y - self._prior_mean(y.dtype, y.device)
        return gaussian_log_marginal_likelihood(K, r)

    def posterior(
        self, X: Tensor, *, observation_noise: bool = False, joint: bool = False
    ) -> GaussianPosterior:
        """Exact posterior of ``f`` (or ``y``) at ``X`` given the data from :meth:`set_data`.

        .. math::
            \\mu_* = \\mu + K_{*X} (K + \\sigma^2 I)^{-1} (y - \\mu), \\qquad
            \\Sigma_* = K_{**} - K_{*X} (K + \\sigma^2 I)^{-1} K_{X*}

        Parameters
        ----------
        X : Tensor, shape (..., n_s, d) or (n_s,)
            Finite test inputs; the batch shape broadcasts with :attr:`batch_shape`.
        observation_noise : bool, default False
            Add the noise variance to the diagonal (predictive of ``y``, not ``f``).
        joint : bool, default False
            Return the full joint covariance ``(..., n_s, n_s)``; if False only the marginal
            variances, computed in row tiles without forming ``K_{**}`` or ``K_{*X}`` whole.

        Returns
        -------
        GaussianPosterior
            In ``X``'s dtype, differentiable in ``X`` and the hyperparameters: ``mean`` of
            shape (..., n_s, 1) and either ``covariance`` (..., n_s, n_s) or ``variance``
            (..., n_s, 1).
        """
        if self.train_X is None:
            raise RuntimeError("no data: call set_data(X, y) before posterior(X)")
        X_train = self.train_X
        Xs = check_inputs(X)
        if Xs.shape[-1] != X_train.shape[-1]:
            raise ValueError(
                f"X has {Xs.shape[-1]} input dimensions but the training X has "
                f"{X_train.shape[-1]}; they must match"
            )
        if Xs.device != X_train.device:
            raise ValueError(f"X is on {Xs.device} but the training X is on {X_train.device}")
        dtype = torch.promote_types(X_train.dtype, Xs.dtype)
        X_train, y, Xs_c = X_train.to(dtype), self.train_y.to(dtype), Xs.to(dtype)
        mu = self._prior_mean(dtype, X_train.device)
        L = psd_safe_cholesky(self._train_covariance(X_train))  # (..., n, n)
        alpha = torch.cholesky_solve((y - mu).unsqueeze(-1), L)  # (..., n, 1)
        noise = self.noise.to(dtype=dtype, device=X_train.device)[..., None]
        parts = (Xs_c, X_train, mu, L, alpha, noise, observation_noise)
        post = self._joint_posterior(*parts) if joint else self._marginal_posterior(*parts)
        return cast_posterior(post, Xs.dtype)

    def _joint_posterior(
        self, Xs: Tensor, X: Tensor, mu: Tensor, L: Tensor, alpha: Tensor, noise: Tensor,
        observation_noise: bool,
    ) -> GaussianPosterior:  # fmt: skip
        dtype = X.dtype
        Ksx = self.kernel(Xs, X).to_dense().to(dtype)  # (..., n_s, n)
        Kss = self.kernel(Xs).to_dense().to(dtype)  # (..., n_s, n_s)
        mean = mu.unsqueeze(-1) + Ksx @ alpha
        V = torch.linalg.solve_triangular(L, Ksx.mT, upper=False)  # (..., n, n_s)
        cov = Kss - V.mT @ V
        cov = 0.5 * (cov + cov.mT)
        if observation_noise:
            eye = torch.eye(Xs.shape[-2], dtype=dtype, device=X.device)
            cov = cov + noise[..., None] * eye
        cov = psd_posterior_covariance(cov, Kss, X.shape[-2])
        batch = torch.broadcast_shapes(mean.shape[:-2], cov.shape[:-2])
        mean = mean.expand(*batch, *mean.shape[-2:])
        return GaussianPosterior(mean, covariance=cov.expand(*batch, *cov.shape[-2:]))

    def _marginal_posterior(
        self, Xs: Tensor, X: Tensor, mu: Tensor, L: Tensor, alpha: Tensor, noise: Tensor,
        observation_noise: bool,
    ) -> GaussianPosterior:  # fmt: skip
        dtype = X.dtype
        means, variances = [], []
        for _, Ksx in cross_covariance_chunks(self.kernel, Xs, X):
            Ksx = Ksx.to(dtype)
            means.append(Ksx @ alpha)
            V = torch.linalg.solve_triangular(L, Ksx.mT, upper=False)
            variances.append(V.square().sum(-2))
        batch = torch.broadcast_shapes(*(m.shape[:-2] for m in means), L.shape[:-2])
        mean = mu.unsqueeze(-1) + torch.cat([m.expand(*batch, *m.shape[-2:]) for m in means], -2)
        reduction = torch.cat([v.expand(*batch, v.shape[-1]) for v in variances], -1)
        var = (kernel_diag(self.kernel, Xs).to(dtype) - reduction).clamp_min(0)
        if observation_noise:
            var = var + noise
        var = var.unsqueeze(-1)
        batch = torch.broadcast_shapes(mean.shape[:-2], var.shape[:-2])
        return GaussianPosterior(
            mean.expand(*batch, *mean.shape[-2:]), variance=var.expand(*batch, *var.shape[-2:])
        )

    def extra_repr(self) -> str:
        noise = self.noise.detach()
        text = f"{noise.item():.4g}" if noise.numel() == 1 else f"shape {tuple(noise.shape)}"
        return f"noise={text}, mean={self.mean_type!r}"

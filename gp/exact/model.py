"""``ExactGP``: exact GP regression by Cholesky, with an analytic (trace-form) gradient."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F_
from gpytorch.kernels import Kernel
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bdl.core.linalg import psd_safe_cholesky
from bdl.core.posterior import GaussianPosterior
from gp.kernels.matvec import cross_covariance_chunks, kernel_diag

__all__ = ["ExactGP", "gaussian_log_marginal_likelihood"]

_LOG_2PI = math.log(2.0 * math.pi)
_MEANS = ("constant", "zero")


def _inverse_softplus(x: Tensor) -> Tensor:
    """``log(exp(x) - 1)`` computed stably for ``x > 0``."""
    return x + torch.log(-torch.expm1(-x))


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


def _as_inputs(X: object, name: str) -> Tensor:
    """Validate inputs: shape (n,), (n, d) or (..., n, d); finite; n >= 1. Returns (..., n, d)."""
    if not isinstance(X, Tensor):
        try:
            X = torch.as_tensor(X)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be a tensor of shape (..., n, d), got {X!r}") from err
    if not (X.dtype.is_floating_point or X.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must hold real numbers, got dtype {X.dtype}")
    if not X.dtype.is_floating_point:
        X = X.to(torch.get_default_dtype())
    if X.dim() == 1:
        X = X.unsqueeze(-1)
    if X.dim() < 2:
        raise ValueError(f"{name} must have shape (n, d) or (..., n, d), got {tuple(X.shape)}")
    if X.shape[-2] == 0 or X.shape[-1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(X.shape)}); give at least one point")
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"{name} contains NaN or inf; inputs must be finite")
    return X


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


class ExactGP(nn.Module):
    """Exact GP regression: Cholesky factorisation, analytic gradients, joint posteriors.

    The model is ``y_i = f(x_i) + eps_i`` with ``f ~ GP(mu, k)``, ``mu`` a learned constant
    (or zero) and ``eps_i ~ N(0, noise)``. Everything is exact: the log marginal likelihood
    is computed from a Cholesky factor of ``K + noise I`` (O(n^3) time, O(n^2) memory), never
    by conjugate gradients or stochastic trace estimators, whatever the size of ``n``.

    Usage::

        model = ExactGP(ScaleKernel(MaternKernel(nu=1.5)), noise=0.1).double()
        loss = -model.log_marginal_likelihood(X, y)    # full sum over points
        loss.backward()
        model.set_data(X, y)
        post = model.posterior(X_new)                 # GaussianPosterior, joint covariance

    Several independent GPs are handled by a leading batch shape: ``X`` of shape
    ``(b, n, d)`` and ``y`` of shape ``(b, n)`` give ``b`` log marginal likelihoods. They share
    hyperparameters unless the kernel has ``batch_shape=(b,)`` and ``batch_shape=(b,)`` is
    given here too (for the noise and the constant mean).

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel
        Prior covariance ``k``; its hyperparameters are parameters of this module.
    noise : float or Tensor, default 0.1
        Initial observation-noise variance, > 0. Stored as ``raw_noise`` with
        ``noise = softplus(raw_noise)`` (shape ``batch_shape``).
    mean : {"constant", "zero"}, default "constant"
        Prior mean: a learned constant ``constant`` (shape ``batch_shape``, initially 0) or 0.
    batch_shape : torch.Size, default ()
        Batch shape of the noise and constant-mean parameters.

    Attributes
    ----------
    train_X : Tensor or None, shape (..., n, d)
    train_y : Tensor or None, shape (..., n)
        Data from :meth:`set_data` (plain attributes, not part of ``state_dict``).

    Notes
    -----
    Gradient: the log marginal likelihood is a custom autograd function of ``K + noise I`` and
    the residual ``r = y - mu`` whose backward pass returns
    ``dL/dK = (alpha alpha^T - K^{-1}) / 2`` with ``alpha = K^{-1} r`` (``K^{-1}`` from
    ``torch.cholesky_inverse``); autograd then carries it through the kernel evaluation to the
    hyperparameters. This is the trace form ``dL/dtheta = tr((alpha alpha^T - K^{-1}) dK/dtheta)
    / 2`` without differentiating through the factorisation.

    Computation happens in the dtype of the data (cast the module with ``.double()`` for
    float64). Non-positive-definite matrices get bounded jitter with a ``JitterWarning``.
    """

    def __init__(
        self,
        kernel: Kernel,
        noise: float | Tensor = 0.1,
        mean: str = "constant",
        batch_shape: torch.Size | tuple[int, ...] = torch.Size(),
    ) -> None:
        super().__init__()
        if not isinstance(kernel, Kernel):
            raise ValueError(f"kernel must be a gpytorch Kernel, got {type(kernel).__name__}")
        if mean not in _MEANS:
            raise ValueError(f"mean must be one of {_MEANS}, got {mean!r}")
        self.batch_shape = torch.Size(batch_shape)
        self.kernel = kernel
        self.mean_type = mean
        self.raw_noise = nn.Parameter(_inverse_softplus(self._check_noise(noise)))
        if mean == "constant":
            self.constant = nn.Parameter(torch.zeros(self.batch_shape))
        else:
            self.register_parameter("constant", None)
        self.train_X: Tensor | None = None
        self.train_y: Tensor | None = None

    def _check_noise(self, noise: float | Tensor, dtype: torch.dtype | None = None) -> Tensor:
        if dtype is None:  # keep a float64 tensor's precision; python floats get the default
            floating = isinstance(noise, Tensor) and noise.is_floating_point()
            dtype = noise.dtype if floating else torch.get_default_dtype()
        try:
            value = torch.as_tensor(noise, dtype=dtype).detach().clone()
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"noise must be a positive number, got {noise!r}") from err
        if not bool((torch.isfinite(value) & (value > 0)).all()):
            raise ValueError(f"noise must be a finite positive variance, got {noise!r}")
        try:
            return value.expand(self.batch_shape).clone()
        except RuntimeError as err:
            raise ValueError(
                f"noise has shape {tuple(value.shape)}, expected one broadcastable to "
                f"batch_shape {tuple(self.batch_shape)}"
            ) from err

    @property
    def noise(self) -> Tensor:
        """Observation-noise variance ``softplus(raw_noise)``, shape ``batch_shape``."""
        return F_.softplus(self.raw_noise)

    @noise.setter
    def noise(self, value: float | Tensor) -> None:
        raw = _inverse_softplus(self._check_noise(value, self.raw_noise.dtype))
        with torch.no_grad():
            self.raw_noise.copy_(raw)

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
        X = _as_inputs(X, "X")
        self.train_X, self.train_y = X, _as_targets(y, X)
        return self

    def _resolve_data(self, X: Tensor | None, y: Tensor | None) -> tuple[Tensor, Tensor]:
        if X is None and y is None:
            if self.train_X is None:
                raise RuntimeError("no data: pass X and y, or call set_data(X, y) first")
            return self.train_X, self.train_y
        if X is None or y is None:
            raise ValueError("give both X and y (or neither, to use the data from set_data)")
        X = _as_inputs(X, "X")
        return X, _as_targets(y, X)

    def _prior_mean(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Constant prior mean ``mu``, shape ``batch_shape + (1,)`` (zeros if ``mean='zero'``)."""
        if self.constant is None:
            return torch.zeros(self.batch_shape + (1,), dtype=dtype, device=device)
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
        self, Xs: Tensor, observation_noise: bool = False, joint: bool = True
    ) -> GaussianPosterior:
        """Exact posterior of ``f`` (or ``y``) at ``Xs`` given the data from :meth:`set_data`.

        .. math::
            \\mu_* = \\mu + K_{*X} (K + \\sigma^2 I)^{-1} (y - \\mu), \\qquad
            \\Sigma_* = K_{**} - K_{*X} (K + \\sigma^2 I)^{-1} K_{X*}

        Parameters
        ----------
        Xs : Tensor, shape (..., n_s, d) or (n_s,)
            Finite test inputs.
        observation_noise : bool, default False
            Add the noise variance to the diagonal (predictive of ``y``, not ``f``).
        joint : bool, default True
            Return the full joint covariance ``(..., n_s, n_s)``; if False only the marginal
            variances, computed in row tiles without forming ``K_{**}`` or ``K_{*X}`` whole.

        Returns
        -------
        GaussianPosterior
            ``mean`` of shape (..., n_s, 1) and either ``covariance`` (..., n_s, n_s) or
            ``variance`` (..., n_s, 1).
        """
        if self.train_X is None:
            raise RuntimeError("no data: call set_data(X, y) before posterior(Xs)")
        X, y = self.train_X, self.train_y
        Xs = _as_inputs(Xs, "Xs")
        if Xs.shape[-1] != X.shape[-1]:
            raise ValueError(
                f"Xs has {Xs.shape[-1]} input dimensions but the training X has "
                f"{X.shape[-1]}; they must match"
            )
        if Xs.device != X.device:
            raise ValueError(f"Xs is on {Xs.device} but the training X is on {X.device}")
        dtype = torch.promote_types(X.dtype, Xs.dtype)
        X, y, Xs = X.to(dtype), y.to(dtype), Xs.to(dtype)
        mu = self._prior_mean(dtype, X.device)
        L = psd_safe_cholesky(self._train_covariance(X))  # (..., n, n)
        alpha = torch.cholesky_solve((y - mu).unsqueeze(-1), L)  # (..., n, 1)
        noise = self.noise.to(dtype=dtype, device=X.device)[..., None]
        if joint:
            Ksx = self.kernel(Xs, X).to_dense().to(dtype)  # (..., n_s, n)
            Kss = self.kernel(Xs).to_dense().to(dtype)  # (..., n_s, n_s)
            mean = mu.unsqueeze(-1) + Ksx @ alpha
            V = torch.linalg.solve_triangular(L, Ksx.mT, upper=False)  # (..., n, n_s)
            cov = Kss - V.mT @ V
            cov = 0.5 * (cov + cov.mT)
            if observation_noise:
                eye = torch.eye(Xs.shape[-2], dtype=dtype, device=X.device)
                cov = cov + noise[..., None] * eye
            batch = torch.broadcast_shapes(mean.shape[:-2], cov.shape[:-2])
            mean = mean.expand(*batch, *mean.shape[-2:])
            return GaussianPosterior(mean, covariance=cov.expand(*batch, *cov.shape[-2:]))
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

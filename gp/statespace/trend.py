"""A state-space GP plus a polynomial mean whose coefficients have a flat prior.

The model (Rasmussen & Williams 2006, Sec. 2.7) is ``y = h(t)^T beta + f(t) + eps`` with
``h(t) = (1, u, ..., u^p)``, ``u = t / t_scale``, ``f ~ GP(0, k)`` in state-space form and
``beta`` given a flat (improper) prior. With ``K = K_f + noise I`` on the observed points,
``H`` the ``(p + 1, n)`` basis there, ``A = H K^{-1} H^T`` and
``beta_hat = A^{-1} H K^{-1} y`` (the generalised least-squares estimate), the posterior at
new times is Gaussian with (R&W eqs. 2.41, 2.42 in the flat-prior limit)

.. math::

    \\bar f_* = k_*^\\top K^{-1} (y - H^\\top \\hat\\beta) + h_*^\\top \\hat\\beta, \\qquad
    \\operatorname{cov}(f_*) = \\operatorname{cov}_{GP}(f_*) + R^\\top A^{-1} R, \\quad
    R = h_* - H K^{-1} k_* ,

and the restricted log likelihood is R&W eq. 2.45 without its divergent ``log |B|``,
``-1/2 r^T K^{-1} r - 1/2 log |K| - 1/2 log |A| - (n - p - 1)/2 log 2 pi`` with
``r = y - H^T beta_hat``. Every ``K^{-1}`` product comes from the Kalman filter and RTS
smoother run on the series ``(y, h_0, ..., h_p)`` at once (``a^T K^{-1} b`` is the sum of the
products of the two series' innovations over the innovation variances; ``k_*^T K^{-1} h_j``
is the smoothed mean of the series ``h_j``), so everything stays O(n).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn

from bdl.core.model import Model
from bdl.core.validation import check_choice

from .ffbs import StateSpacePosterior
from .grid import make_grid
from .model import StateSpaceGP
from .parallel import resolve_method
from .smoothing import filter_grid, smoothing_posterior

__all__ = ["TrendGP", "trend_degree"]

_LOG_2PI = math.log(2.0 * math.pi)


def trend_degree(mean: Any) -> int | None:
    """Polynomial degree of a ``mean`` option (``None``: the constant mean, no trend).

    ``"constant"`` and ``0`` give ``None``, ``"linear"`` gives 1, an int ``p >= 1`` gives
    ``p``.

    Raises
    ------
    ValueError
        Naming ``mean``: not ``"constant"``, ``"linear"`` or an int >= 0.
    """
    if isinstance(mean, str):
        check_choice("mean", mean, ("constant", "linear"))
        return None if mean == "constant" else 1
    if isinstance(mean, numbers.Integral) and not isinstance(mean, bool) and mean >= 0:
        return None if mean == 0 else int(mean)
    raise ValueError(
        f"mean must be 'constant', 'linear' or a polynomial degree (an int >= 0), got {mean!r}"
    )


class TrendGP(nn.Module, Model):
    """:class:`gp.StateSpaceGP` plus a polynomial mean of degree ``degree`` (flat prior).

    :meth:`fit` fits the kernel hyperparameters and the noise by maximising the GP's log
    marginal likelihood of the residuals of the ordinary least-squares trend (the compiled
    filter's fast objective), then conditions on the data exactly: ``coef`` holds the
    generalised least-squares coefficients ``beta_hat`` and ``coef_cov`` their posterior
    covariance ``A^{-1}`` at the fitted hyperparameters, and the GP holds the residuals
    ``y - H^T beta_hat``. :meth:`posterior` adds the trend ``h_*^T beta_hat`` to the GP's
    posterior mean and the trend's uncertainty ``R^T A^{-1} R`` to its covariance and its
    draws (module docstring). One series only.

    Parameters
    ----------
    gp : StateSpaceGP
        The GP of the departures from the trend.
    degree : int
        Polynomial degree, >= 1.
    """

    def __init__(self, gp: StateSpaceGP, degree: int) -> None:
        super().__init__()
        self.gp = gp
        self.degree = int(degree)
        m = self.degree + 1
        self.register_buffer("coef", torch.zeros(m, dtype=torch.float64))
        self.register_buffer("coef_cov", torch.zeros(m, m, dtype=torch.float64))
        self.register_buffer("t_scale", torch.ones((), dtype=torch.float64))

    # -- delegation (what the estimator reads and sets) ---------------------------------
    @property
    def kernel(self) -> nn.Module:
        return self.gp.kernel

    @property
    def noise(self) -> Tensor:
        return self.gp.noise

    @noise.setter
    def noise(self, value: float | Tensor) -> None:
        self.gp.noise = value

    @property
    def history_(self) -> list[float]:
        return self.gp.history_

    @property
    def train_y(self) -> Tensor | None:
        """The GP's training targets: the residuals ``y - H^T beta_hat`` (NaN = missing)."""
        return self.gp.train_y

    @property
    def num_outputs(self) -> int:
        return 1

    @property
    def batch_shape(self) -> torch.Size:
        return self.gp.batch_shape

    # -- the trend ----------------------------------------------------------------------
    def basis(self, t: Tensor) -> Tensor:
        """``h(t) = ((t / t_scale)^j)_j``, shape ``(*t.shape, degree + 1)``."""
        u = t / self.t_scale.to(t)
        return u.unsqueeze(-1) ** torch.arange(self.degree + 1, device=t.device)

    def trend(self, t: Tensor) -> Tensor:
        """``h(t)^T coef`` at times ``t`` (any shape), differentiable in ``t``."""
        return self.basis(t) @ self.coef.to(t)

    def fit(self, data: tuple[Tensor, Tensor], **kwargs: Any) -> TrendGP:
        """Fit to ``data = (t, y)``: ``t`` (n,) or (n, 1), ``y`` (n,) with NaN = missing.

        ``kwargs`` go to :meth:`gp.StateSpaceGP.fit`.

        Raises
        ------
        ValueError
            Naming ``mean`` when fewer than ``degree + 1`` targets are observed.
        """
        t, y = data
        t = t.reshape(-1)
        observed = ~torch.isnan(y)
        n_obs = int(observed.sum())
        if n_obs <= self.degree:
            raise ValueError(
                f"mean asks for a polynomial trend of degree {self.degree}, which needs at "
                f"least {self.degree + 1} observed targets; got {n_obs}"
            )
        scale = t.detach().abs().max().to(self.t_scale)
        self.t_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        basis = self.basis(t.detach().to(torch.float64))[observed]
        target = y.detach().to(torch.float64)[observed].unsqueeze(-1)
        self.coef = torch.linalg.lstsq(basis.cpu(), target.cpu()).solution[:, 0].to(self.coef)
        self.gp.fit((t, y - self.trend(t).to(y)), **kwargs)
        self.condition(t, y)
        return self

    def _gram(self, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``a^T K^{-1} b`` for ``a, b`` in ``(r, h_0, ..., h_p)`` with ``r = y - trend(t)``,
        and ``log |K|``, from one batched Kalman filter; also the basis series."""
        gp = self.gp
        dtype, device = y.dtype, y.device
        observed = ~torch.isnan(y)
        basis = self.basis(t).mT.to(dtype)  # (m, n)
        basis = torch.where(observed, basis, torch.full_like(basis, float("nan")))
        series = torch.cat([(y - self.trend(t).to(y)).unsqueeze(0), basis])
        sde = gp.sde(dtype=dtype, device=device)
        noise = gp.noise.to(dtype=dtype, device=device)
        grid = make_grid(t, series)
        result = filter_grid(sde, grid, noise, resolve_method(gp.method, device))[1]
        h = sde.H.reshape(-1)
        seen = ~torch.isnan(grid.y[0])
        innovation = torch.where(seen, grid.y - result.pred_mean @ h, torch.zeros_like(grid.y))
        var = (result.pred_cov[0] @ h) @ h + noise
        var = torch.where(seen, var, torch.ones_like(var))
        gram = (innovation.unsqueeze(1) * innovation.unsqueeze(0) / var).sum(-1)
        return gram, var.log().sum(), basis

    def condition(self, t: Tensor, y: Tensor) -> TrendGP:
        """Set ``coef`` to the GLS estimate and ``coef_cov`` to ``A^{-1}`` at the current
        hyperparameters; the GP's data becomes ``(t, y - H^T coef)``. Returns self."""
        t = t.reshape(-1)
        with torch.no_grad():
            gram = self._gram(t, y)[0].to(torch.float64)
            A = 0.5 * (gram[1:, 1:] + gram[1:, 1:].mT)
            self.coef = self.coef + torch.linalg.solve(A, gram[1:, 0]).to(self.coef)
            cov = torch.linalg.inv(A)
            self.coef_cov = (0.5 * (cov + cov.mT)).to(self.coef_cov)
        self.gp.set_data(t, y - self.trend(t).to(y))
        return self

    def log_marginal_likelihood(self) -> Tensor:
        """Restricted log likelihood of the GP's data (R&W eq. 2.45, flat prior), at the
        current hyperparameters, differentiable in them."""
        t, r = self.gp.train_t, self.gp.train_y  # r = y - H^T coef, coef = GLS (condition)
        gram, logdet, _ = self._gram(t, r + self.trend(t).to(r))
        A = gram[1:, 1:]
        quad = gram[0, 0] - gram[1:, 0] @ torch.linalg.solve(A, gram[1:, 0])
        n_obs = int((~torch.isnan(r)).sum())
        m = self.degree + 1
        return -0.5 * (quad + logdet + torch.linalg.slogdet(A)[1] + (n_obs - m) * _LOG_2PI)

    # -- prediction ---------------------------------------------------------------------
    def posterior(
        self, X: Tensor, *, observation_noise: bool = False, joint: bool = False, **kwargs: Any
    ) -> StateSpacePosterior:
        """Posterior at times ``X`` (n_new, 1) or (n_new,): the GP's posterior of the
        residuals, shifted by the trend and widened by the trend's uncertainty."""
        gp = self.gp
        post = gp.posterior(X, observation_noise=observation_noise, joint=joint, **kwargs)
        times = X.reshape(-1)
        dtype = torch.promote_types(gp.train_t.dtype, times.dtype)
        t, r = gp.train_t.to(dtype), gp.train_y.to(dtype)
        device = t.device
        basis = self.basis(t).mT.to(dtype)
        basis = torch.where(~torch.isnan(r), basis, torch.full_like(basis, float("nan")))
        sde = gp.sde(dtype=dtype, device=device)
        noise = gp.noise.to(dtype=dtype, device=device)
        method = resolve_method(gp.method, device)
        smoothed = smoothing_posterior(sde, t, basis, noise, times.to(dtype), method)
        R = self.basis(times.to(dtype)).mT - smoothed.mean[..., 0]  # (m, n_new)
        factor = torch.linalg.cholesky(self.coef_cov.to(dtype=dtype, device=device))
        trend = self.trend(times).unsqueeze(-1).to(post.dtype)
        return post.shifted(trend).with_low_rank((R.mT @ factor).to(post.dtype))

    def extra_repr(self) -> str:
        return f"degree={self.degree}"

"""``StateSpaceGP``: exact GP regression on a 1-D input in O(n) via Kalman filtering."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F_
from gpytorch.kernels import Kernel
from gpytorch.likelihoods import GaussianLikelihood, Likelihood
from torch import Tensor, nn

from bdl.core.posterior import GaussianPosterior

from .cvi import CVIConfig, CVISites, cvi_elbo, cvi_posterior
from .discretise import discretise
from .fast import fast_log_marginal_likelihood, numba_available
from .ffbs import StateSpacePosterior
from .grid import make_grid
from .kalman import FilterResult, kalman_filter, rts_smoother
from .kernels import kernel_to_sde
from .likelihoods import check_likelihood
from .parallel import (
    parallel_kalman_filter,
    parallel_rts_smoother,
    resolve_method,
    smoothing_elements,
)
from .sde import LTISDE

__all__ = ["StateSpaceGP"]


def _inverse_softplus(x: float) -> float:
    """``log(exp(x) - 1)`` computed stably for ``x > 0``."""
    return x + math.log(-math.expm1(-x))


def _as_times(t: object, name: str) -> Tensor:
    """Validate times: shape (..., n) or (..., n, 1), n >= 1, finite; returns (..., n), floating.

    A trailing axis of size 1 (with at least two dims) is the column form of one time input.
    """
    t = torch.as_tensor(t)
    if not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if not t.dtype.is_floating_point:
        t = t.to(torch.get_default_dtype())
    if t.dim() >= 2 and t.shape[-1] == 1:
        t = t.squeeze(-1)
    if t.dim() == 0:
        raise ValueError(
            f"{name} must have shape (n,) or (n, 1) (one time input), or (..., n) for a batch "
            "of series; got a scalar"
        )
    if t.shape[-1] == 0:
        raise ValueError(f"{name} is empty; give at least one time point")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf; times must be finite")
    return t


def _as_targets(y: object, t: Tensor) -> Tensor:
    """Validate observations at times ``t`` (..., n): shape (..., n) or (..., n, 1), no inf
    (NaN = missing), batch shape broadcastable with ``t``'s."""
    n = t.shape[-1]
    y = torch.as_tensor(y)
    if not (y.dtype.is_floating_point or y.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"y must hold real numbers, got dtype {y.dtype}")
    if not y.dtype.is_floating_point:
        y = y.to(torch.get_default_dtype())
    if y.dim() >= 2 and y.shape[-1] == 1 and y.shape[-2] == n:
        y = y.squeeze(-1)  # column form (..., n, 1)
    if y.dim() == 0:
        raise ValueError("y must have shape (n,) or (n, 1), or (..., n) for a batch; got a scalar")
    if y.shape[-1] != n:
        raise ValueError(
            f"y has {y.shape[-1]} values but t has {n}; they must match "
            f"(y must have shape (..., {n}) or (..., {n}, 1), got {tuple(y.shape)})"
        )
    try:
        torch.broadcast_shapes(t.shape[:-1], y.shape[:-1])
    except RuntimeError as err:
        raise ValueError(
            f"t has batch shape {tuple(t.shape[:-1])} and y has batch shape "
            f"{tuple(y.shape[:-1])}; they must broadcast"
        ) from err
    if bool(torch.isinf(y).any()):
        raise ValueError("y contains inf; use NaN to mark missing observations")
    return y


def _common(**tensors: Tensor) -> tuple[torch.dtype, torch.device]:
    """Promoted floating dtype and the one shared device of the named tensors."""
    (first, ref), *rest = tensors.items()
    dtype = ref.dtype
    for name, x in rest:
        if x.device != ref.device:
            raise ValueError(
                f"{name} is on {x.device} but {first} is on {ref.device}; use one device"
            )
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype, ref.device


class StateSpaceGP(nn.Module):
    """Exact GP regression on a 1-D (time) input by Kalman filtering and RTS smoothing.

    The model is ``y_i = f(t_i) + eps_i``, ``f ~ GP(0, k)``, ``eps_i ~ N(0, noise)``, with a
    kernel ``k`` that has an exact state-space form (see
    :func:`gp.statespace.kernel_to_sde`): Matérn-1/2, 3/2, 5/2, ``CosineKernel``,
    ``PeriodicKernel`` (as a truncated cosine series), their ``ScaleKernel``, sums and
    products (e.g. quasi-periodic Matérn x periodic). Cost is O(n d^3) for ``n`` points and
    state dimension ``d`` (instead of O(n^3)).

    Usage::

        model = StateSpaceGP(ScaleKernel(MaternKernel(nu=1.5)), noise=0.1)
        model.log_marginal_likelihood(t, y)        # differentiable; maximise it to fit
        model.set_data(t, y)                       # condition (stores t, y; no fitting)
        post = model.posterior(t_new)              # GaussianPosterior, mean (n_new, 1)
        post.rsample(torch.Size([100]))            # joint draws (FFBS, O(n)), (100, n_new, 1)
        model.log_marginal_likelihood(t_b, y_b)    # batch: y_b (..., n), t_b (n,) or (..., n)

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel
        Prior covariance; its hyperparameters are this module's parameters.
    noise : float, default 0.1
        Initial observation-noise variance, > 0. Stored as ``raw_noise`` with
        ``noise = softplus(raw_noise)``.
    method : {"auto", "fast", "parallel", "sequential"}, default "auto"
        Algorithm; all are exact and agree to rounding. ``"sequential"``: the Kalman loop in
        torch (:mod:`.kalman`). ``"parallel"``: ``O(log n)``-depth associative scans
        (:mod:`.parallel`). ``"fast"``: the log marginal likelihood and its gradient by a
        compiled filter with a hand-written adjoint (:mod:`.fast`; numba, ``pip install
        bdlgp[fast]``; without numba it falls back to the parallel scan) — smoothing and
        batches of series use the parallel scan. ``"auto"``: ``"fast"`` for one Gaussian
        series on CPU when numba is installed, the parallel scan otherwise. Can be
        overridden per call.
    periodic_order : int, optional
        Number of harmonics of every ``PeriodicKernel`` (fixed order: the likelihood is then
        a smooth function of the hyperparameters). Default: the smallest order whose
        worst-case kernel error is at most ``periodic_tol``.
    periodic_tol : float, default 1e-6
        Truncation tolerance of the periodic series when ``periodic_order`` is None.
    likelihood : gpytorch Likelihood, optional
        ``None`` or a ``GaussianLikelihood`` (whose current noise then initialises ``noise``)
        give the exact Gaussian model. ``BernoulliLikelihood`` (probit),
        :class:`gp.statespace.BernoulliLogitLikelihood` or
        :class:`gp.statespace.PoissonLikelihood` give a non-Gaussian model fitted by
        conjugate-computation VI in O(n) (:mod:`gp.statespace.cvi`); ``noise`` is then unused
        (``raw_noise`` is frozen).
    cvi : CVIConfig, optional
        Settings of the CVI iteration (non-Gaussian likelihoods only).

    Attributes
    ----------
    train_t, train_y : Tensor or None
        Data set by :meth:`set_data` (plain attributes, not part of ``state_dict``).
    sites : CVISites or None
        Non-Gaussian likelihoods: CVI site parameters of the training points (buffers, so
        they are saved in ``state_dict`` and warm-start the next CVI run).

    Notes
    -----
    Times may be unsorted and repeated; NaN in ``y`` marks missing observations. Computation
    happens in the dtype and on the device of the data (the hyperparameters are cast).
    Float32 is supported; grids whose steps are much shorter than the lengthscale lose
    precision there (see :func:`gp.statespace.discretise`) and are better run in float64.
    """

    def __init__(
        self,
        kernel: Kernel,
        noise: float = 0.1,
        method: str = "auto",
        *,
        periodic_order: int | None = None,
        periodic_tol: float = 1e-6,
        likelihood: Likelihood | None = None,
        cvi: CVIConfig | None = None,
    ) -> None:
        super().__init__()
        self.sde_options = {"periodic_order": periodic_order, "periodic_tol": periodic_tol}
        kernel_to_sde(kernel, **self.sde_options)  # a clear ValueError for unsupported kernels
        resolve_method(method)  # validates the name
        self.method = method
        self.kernel = kernel
        self.raw_noise = nn.Parameter(torch.tensor(_inverse_softplus(self._check_noise(noise))))
        likelihood = check_likelihood(likelihood)
        if isinstance(likelihood, GaussianLikelihood):  # exact path; its noise initialises noise
            self.noise, likelihood = likelihood.noise.detach().reshape(-1)[0], None
        self.likelihood = likelihood
        self.sites = None if likelihood is None else CVISites()  # CVI sites (buffers)
        self.cvi = CVIConfig() if cvi is None else cvi
        if likelihood is not None:
            self.raw_noise.requires_grad_(False)  # no Gaussian noise in a non-Gaussian model
        self.train_t: Tensor | None = None
        self.train_y: Tensor | None = None

    @staticmethod
    def _check_noise(noise: float | Tensor) -> float:
        try:
            value = float(noise)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"noise must be a positive number, got {noise!r}") from err
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"noise must be a finite positive variance, got {value}")
        return value

    @property
    def noise(self) -> Tensor:
        """Observation-noise variance ``softplus(raw_noise)``, shape ()."""
        return F_.softplus(self.raw_noise)

    @noise.setter
    def noise(self, value: float | Tensor) -> None:
        raw = _inverse_softplus(self._check_noise(value))
        with torch.no_grad():
            self.raw_noise.fill_(raw)

    def sde(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> LTISDE:
        """The kernel's state-space form (differentiable in the kernel hyperparameters)."""
        return kernel_to_sde(self.kernel, dtype=dtype, device=device, **self.sde_options)

    # -- data -----------------------------------------------------------------------------
    def set_data(self, t: Tensor, y: Tensor) -> StateSpaceGP:
        """Condition on observations ``y`` at times ``t`` for :meth:`posterior`.

        Parameters
        ----------
        t : Tensor, shape (n,) or (n, 1), or (..., n) / (..., n, 1)
            Finite times, any order, repeats allowed; shared by every series of a batch, or
            one row per series (each sorted independently).
        y : Tensor, shape (n,) or (n, 1), or (..., n) for a batch of independent series
            Observations; NaN marks a missing value. A trailing axis of size 1 following
            the ``n`` axis is read as the column form.

        Returns
        -------
        StateSpaceGP
            ``self``.
        """
        t = _as_times(t, "t")
        y = _as_targets(y, t)
        _common(t=t, y=y)
        self.train_t, self.train_y = t, y
        return self

    def _resolve_data(self, t: Tensor | None, y: Tensor | None) -> tuple[Tensor, Tensor]:
        if t is None and y is None:
            if self.train_t is None:
                raise RuntimeError("no data: pass t and y, or call set_data(t, y) first")
            return self.train_t, self.train_y
        if t is None or y is None:
            raise ValueError("give both t and y (or neither, to use the data from set_data)")
        t = _as_times(t, "t")
        return t, _as_targets(y, t)

    # -- inference ------------------------------------------------------------------------
    def _filter(
        self, times_dt: Tensor, zero_step: Tensor, y: Tensor, dtype: torch.dtype, method: str
    ) -> tuple[Tensor, FilterResult, LTISDE]:
        sde = self.sde(dtype=dtype, device=y.device)
        A, Q = discretise(sde, times_dt.reshape(-1))  # all series' steps in one batch
        A = A.reshape(*times_dt.shape, *A.shape[-2:])
        Q = Q.reshape(*times_dt.shape, *Q.shape[-2:])
        noise = self.noise.to(dtype=dtype, device=y.device)
        run = parallel_kalman_filter if method == "parallel" else kalman_filter
        result = run(A, Q, sde.H, sde.Pinf, y, noise, zero_step=zero_step)
        return A, result, sde

    @staticmethod
    def _use_fast(requested: str, t: Tensor, y: Tensor, device: torch.device) -> bool:
        """Whether the compiled LML path (:mod:`.fast`) handles this call: one series, and
        ``"fast"`` asked for, or ``"auto"`` on CPU with numba installed."""
        if t.dim() != 1 or y.dim() != 1:
            return False  # batches of series: the (vectorised) parallel scan
        if requested == "fast":
            return True
        return requested == "auto" and device.type == "cpu" and numba_available()

    def log_marginal_likelihood(
        self, t: Tensor | None = None, y: Tensor | None = None, method: str | None = None
    ) -> Tensor:
        """Exact log marginal likelihood ``log p(y | t)``, summed over the observed points.

        Equals ``log N(y_obs; 0, K_obs + noise I)`` of the dense GP on the non-NaN points.
        With a non-Gaussian ``likelihood`` it is the evidence lower bound ``ELBO <= log p(y)``
        of the Gaussian-VI optimum instead: CVI is first run to convergence on the stored
        sites (no graph, see :func:`gp.statespace.cvi_elbo`), then the ELBO is differentiable
        in the hyperparameters (and its gradient is the optimal ELBO's).

        A batch of independent series sharing the hyperparameters (``y`` of shape
        ``(..., n)``, ``t`` shared ``(n,)`` or per series ``(..., n)``) gives one value per
        series, vectorised over the batch (sum it for a joint fit).

        Parameters
        ----------
        t, y : Tensor, optional
            Data, shapes as in :meth:`set_data`; default: the data given to
            :meth:`set_data`.
        method : {"auto", "fast", "parallel", "sequential"}, optional
            Overrides the constructor's ``method`` for this call.

        Returns
        -------
        Tensor, shape () for one series, (...) for a batch
            Differentiable with respect to the kernel hyperparameters and ``raw_noise``.
        """
        t, y = self._resolve_data(t, y)
        dtype, device = _common(t=t, y=y)
        requested = self.method if method is None else method
        method = resolve_method(requested, device)
        if self.likelihood is None and self._use_fast(requested, t, y, device):
            grid = make_grid(t.to(dtype), y.to(dtype))
            sde = self.sde(dtype=dtype, device=device)
            noise = self.noise.to(dtype=dtype, device=device)
            return fast_log_marginal_likelihood(sde, grid.dt, grid.y, noise)
        if self.likelihood is not None:  # non-Gaussian: the CVI lower bound (.cvi)
            sde = self.sde(dtype=dtype, device=device)
            return cvi_elbo(
                self.likelihood, sde, t.to(dtype), y.to(dtype), self.sites, self.cvi, method
            )
        grid = make_grid(t.to(dtype), y.to(dtype))
        _, result, _ = self._filter(grid.dt, grid.zero_step, grid.y, dtype, method)
        return result.log_likelihood

    def posterior(
        self, t_new: Tensor, observation_noise: bool = False, method: str | None = None
    ) -> GaussianPosterior:
        """Posterior marginals at ``t_new`` given the data from :meth:`set_data`.

        Exact RTS smoothing on the training times merged with ``t_new`` (as missing
        observations): covers interpolation, prediction at training times and forecasting
        before or after the data. With a non-Gaussian ``likelihood``: the CVI posterior
        ``q(f)`` (see :func:`gp.statespace.cvi_posterior`); probabilities / rates of ``y``
        follow from :func:`gp.statespace.predictive_moments`.

        For a batch of series (see :meth:`set_data`) the posterior has batch shape
        ``(...)``. The returned :class:`gp.statespace.StateSpacePosterior` holds the
        marginals, and its ``rsample`` draws *joint* samples of ``f`` at ``t_new``
        (correlated across times as the GP posterior) by forward-filtering
        backward-sampling in O(n) (:mod:`gp.statespace.ffbs`).

        Parameters
        ----------
        t_new : Tensor, shape (n_new,) or (n_new, 1), or ``(*batch_shape, n_new)``
            Finite prediction times, any order; shared by all series or one row per series.
        observation_noise : bool, default False
            Add the noise variance (predictive of ``y``) instead of the latent ``f``
            (Gaussian likelihood only).
        method : {"auto", "fast", "parallel", "sequential"}, optional
            Overrides the constructor's ``method`` for this call (``"auto"`` and ``"fast"``
            smooth with the parallel scan).

        Returns
        -------
        StateSpacePosterior
            A ``GaussianPosterior``: ``mean`` and marginal ``variance`` of shape
            (..., n_new, 1); FFBS joint draws; dense ``covariance_matrix`` on request.
        """
        if self.train_t is None:
            raise RuntimeError("no data: call set_data(t, y) before posterior(t_new)")
        t_new = _as_times(t_new, "t_new")
        batch = torch.broadcast_shapes(self.train_t.shape[:-1], self.train_y.shape[:-1])
        if t_new.dim() > 1 and t_new.shape[:-1] != batch:
            raise ValueError(
                f"t_new must have shape (n_new,) or (*batch_shape, n_new) with the data's "
                f"batch_shape {tuple(batch)}, got {tuple(t_new.shape)}"
            )
        dtype, device = _common(t=self.train_t, y=self.train_y, t_new=t_new)
        method = resolve_method(self.method if method is None else method, device)
        if self.likelihood is not None:  # non-Gaussian: q(f) from the CVI sites (.cvi)
            if observation_noise:
                raise ValueError(
                    "observation_noise=True needs a Gaussian likelihood; for "
                    f"{type(self.likelihood).__name__} use gp.statespace.predictive_moments("
                    "model.likelihood, post.mean, post.variance)"
                )
            t_tr, y_tr = self.train_t.to(dtype), self.train_y.to(dtype)
            sde = self.sde(dtype=dtype, device=device)
            return cvi_posterior(
                self.likelihood, sde, t_tr, y_tr, t_new.to(dtype), self.sites, self.cvi, method
            )
        grid = make_grid(self.train_t.to(dtype), self.train_y.to(dtype), t_new.to(dtype))
        A, result, sde = self._filter(grid.dt, grid.zero_step, grid.y, dtype, method)
        smoother = parallel_rts_smoother if method == "parallel" else rts_smoother
        m_s, P_s = smoother(A, result, zero_step=grid.zero_step)
        h = sde.H.reshape(-1)
        index = grid.new_index
        if index.dim() == 1:  # shared grid
            m_new, P_new = m_s[..., index, :], P_s[..., index, :, :]
        else:
            m_new = m_s.gather(-2, index[..., None].expand(*index.shape, m_s.shape[-1]))
            P_new = P_s.gather(-3, index[..., None, None].expand(*index.shape, *P_s.shape[-2:]))
        cov_h = P_new @ h  # (..., n_new, d)
        post = StateSpacePosterior(
            mean=(m_new @ h).unsqueeze(-1),
            variance=(cov_h @ h).clamp_min(0).unsqueeze(-1),
            elements=smoothing_elements(A, result, zero_step=grid.zero_step),
            h=h,
            new_index=index,
            cov_h=cov_h,
            prior_scale=sde.Pinf.detach().diagonal(),  # per state: diag(Pinf) spans lambda^2k
            method=method,
        )
        if observation_noise:
            post = post.add_observation_noise(self.noise.to(dtype=dtype, device=device))
        return post

    def extra_repr(self) -> str:
        return f"noise={self.noise.item():.4g}, method={self.method!r}"

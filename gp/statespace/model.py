"""``StateSpaceGP``: exact GP regression on a 1-D input in O(n) via Kalman filtering."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F_
from gpytorch.kernels import Kernel
from torch import Tensor, nn

from bdl.posterior import GaussianPosterior

from .discretise import discretise
from .grid import make_grid
from .kalman import FilterResult, kalman_filter, rts_smoother
from .kernels import kernel_to_sde
from .parallel import parallel_kalman_filter, parallel_rts_smoother, resolve_method
from .sde import LTISDE

__all__ = ["StateSpaceGP"]


def _inverse_softplus(x: float) -> float:
    """``log(exp(x) - 1)`` computed stably for ``x > 0``."""
    return x + math.log(-math.expm1(-x))


def _as_times(t: object, name: str) -> Tensor:
    """Validate times: shape (n,) or (n, 1), n >= 1, finite; returns shape (n,), floating."""
    t = torch.as_tensor(t)
    if not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if not t.dtype.is_floating_point:
        t = t.to(torch.get_default_dtype())
    if t.dim() == 2 and t.shape[-1] == 1:
        t = t.squeeze(-1)
    if t.dim() != 1:
        raise ValueError(
            f"{name} must have shape (n,) or (n, 1) (one time input), got {tuple(t.shape)}"
        )
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty; give at least one time point")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf; times must be finite")
    return t


def _as_targets(y: object, n: int) -> Tensor:
    """Validate observations: shape (n,) or (n, 1), no inf (NaN = missing)."""
    y = torch.as_tensor(y)
    if not (y.dtype.is_floating_point or y.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"y must hold real numbers, got dtype {y.dtype}")
    if not y.dtype.is_floating_point:
        y = y.to(torch.get_default_dtype())
    if y.dim() == 2 and y.shape[-1] == 1:
        y = y.squeeze(-1)
    if y.dim() != 1:
        raise ValueError(f"y must have shape (n,) or (n, 1), got {tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} values but t has {n}; they must match")
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

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel
        Prior covariance; its hyperparameters are this module's parameters.
    noise : float, default 0.1
        Initial observation-noise variance, > 0. Stored as ``raw_noise`` with
        ``noise = softplus(raw_noise)``.
    method : {"auto", "sequential", "parallel"}, default "auto"
        Filtering/smoothing algorithm: the sequential Kalman loop (:mod:`.kalman`), or the
        ``O(log n)``-depth parallel scan (:mod:`.parallel`); both are exact and agree to
        rounding. ``"auto"`` uses the parallel scan on CUDA and the sequential loop
        elsewhere (see :func:`gp.statespace.resolve_method`). Can be overridden per call.
    periodic_order : int, optional
        Number of harmonics of every ``PeriodicKernel`` (fixed order: the likelihood is then
        a smooth function of the hyperparameters). Default: the smallest order whose
        worst-case kernel error is at most ``periodic_tol``.
    periodic_tol : float, default 1e-6
        Truncation tolerance of the periodic series when ``periodic_order`` is None.

    Attributes
    ----------
    train_t, train_y : Tensor or None
        Data set by :meth:`set_data` (plain attributes, not part of ``state_dict``).

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
    ) -> None:
        super().__init__()
        self.sde_options = {"periodic_order": periodic_order, "periodic_tol": periodic_tol}
        kernel_to_sde(kernel, **self.sde_options)  # a clear ValueError for unsupported kernels
        resolve_method(method)  # validates the name
        self.method = method
        self.kernel = kernel
        self.raw_noise = nn.Parameter(torch.tensor(_inverse_softplus(self._check_noise(noise))))
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
        t : Tensor, shape (n,) or (n, 1)
            Finite times, any order, repeats allowed.
        y : Tensor, shape (n,) or (n, 1)
            Observations; NaN marks a missing value.

        Returns
        -------
        StateSpaceGP
            ``self``.
        """
        t = _as_times(t, "t")
        y = _as_targets(y, t.shape[0])
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
        return t, _as_targets(y, t.shape[0])

    # -- inference ------------------------------------------------------------------------
    def _filter(
        self, times_dt: Tensor, zero_step: Tensor, y: Tensor, dtype: torch.dtype, method: str
    ) -> tuple[Tensor, FilterResult, LTISDE]:
        sde = self.sde(dtype=dtype, device=y.device)
        A, Q = discretise(sde, times_dt)
        noise = self.noise.to(dtype=dtype, device=y.device)
        run = parallel_kalman_filter if method == "parallel" else kalman_filter
        result = run(A, Q, sde.H, sde.Pinf, y, noise, zero_step=zero_step)
        return A, result, sde

    def log_marginal_likelihood(
        self, t: Tensor | None = None, y: Tensor | None = None, method: str | None = None
    ) -> Tensor:
        """Exact log marginal likelihood ``log p(y | t)``, summed over the observed points.

        Equals ``log N(y_obs; 0, K_obs + noise I)`` of the dense GP on the non-NaN points.

        Parameters
        ----------
        t, y : Tensor, shape (n,) or (n, 1), optional
            Data; default: the data given to :meth:`set_data`.
        method : {"auto", "sequential", "parallel"}, optional
            Overrides the constructor's ``method`` for this call.

        Returns
        -------
        Tensor, shape ()
            Differentiable with respect to the kernel hyperparameters and ``raw_noise``.
        """
        t, y = self._resolve_data(t, y)
        dtype, device = _common(t=t, y=y)
        method = resolve_method(self.method if method is None else method, device)
        grid = make_grid(t.to(dtype), y.to(dtype))
        _, result, _ = self._filter(grid.dt, grid.zero_step, grid.y, dtype, method)
        return result.log_likelihood

    def posterior(
        self, t_new: Tensor, observation_noise: bool = False, method: str | None = None
    ) -> GaussianPosterior:
        """Posterior marginals at ``t_new`` given the data from :meth:`set_data`.

        Exact RTS smoothing on the training times merged with ``t_new`` (as missing
        observations): covers interpolation, prediction at training times and forecasting
        before or after the data.

        Parameters
        ----------
        t_new : Tensor, shape (n_new,) or (n_new, 1)
            Finite prediction times, any order.
        observation_noise : bool, default False
            Add the noise variance (predictive of ``y``) instead of the latent ``f``.
        method : {"auto", "sequential", "parallel"}, optional
            Overrides the constructor's ``method`` for this call.

        Returns
        -------
        GaussianPosterior
            ``mean`` and marginal ``variance`` of shape (n_new, 1) (no joint covariance).
        """
        if self.train_t is None:
            raise RuntimeError("no data: call set_data(t, y) before posterior(t_new)")
        t_new = _as_times(t_new, "t_new")
        dtype, device = _common(t=self.train_t, y=self.train_y, t_new=t_new)
        method = resolve_method(self.method if method is None else method, device)
        grid = make_grid(self.train_t.to(dtype), self.train_y.to(dtype), t_new.to(dtype))
        A, result, sde = self._filter(grid.dt, grid.zero_step, grid.y, dtype, method)
        smoother = parallel_rts_smoother if method == "parallel" else rts_smoother
        m_s, P_s = smoother(A, result, zero_step=grid.zero_step)
        h = sde.H.reshape(-1)
        m_new, P_new = m_s[grid.new_index], P_s[grid.new_index]
        mean = (m_new @ h).unsqueeze(-1)
        var = (P_new @ h @ h).clamp_min(0).unsqueeze(-1)
        if observation_noise:
            var = var + self.noise.to(dtype=dtype, device=device)
        return GaussianPosterior(mean, variance=var)

    def extra_repr(self) -> str:
        return f"noise={self.noise.item():.4g}, method={self.method!r}"

"""``StateSpaceGP``: exact GP regression on a 1-D input in O(n) via Kalman filtering."""

from __future__ import annotations

import torch
from gpytorch.kernels import Kernel
from gpytorch.likelihoods import GaussianLikelihood, Likelihood
from torch import Tensor, nn

from bdl.core.model import Model, cast_posterior
from bdl.core.validation import check_inputs
from gp._noise import NoiseMixin
from gp.fitting import MarginalLikelihoodFit
from gp.likelihoods import NOISE_LOWER_BOUND

from .cvi import CVIConfig, CVISites, cvi_elbo, cvi_pseudo_data
from .fast import fast_log_marginal_likelihood, numba_available
from .ffbs import StateSpacePosterior
from .grid import make_grid
from .kernels import kernel_to_sde
from .likelihoods import check_likelihood
from .parallel import resolve_method
from .sde import LTISDE
from .smoothing import filter_grid, smoothing_posterior

__all__ = ["StateSpaceGP"]


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


class StateSpaceGP(nn.Module, NoiseMixin, MarginalLikelihoodFit, Model):
    """Exact GP regression on a 1-D (time) input by Kalman filtering and RTS smoothing.

    The model is ``y_i = f(t_i) + eps_i``, ``f ~ GP(0, k)``, ``eps_i ~ N(0, noise)``, with a
    kernel ``k`` that has an exact state-space form (see
    :func:`gp.statespace.kernel_to_sde`): Matérn-1/2, 3/2, 5/2, ``CosineKernel``,
    ``PeriodicKernel`` (as a truncated cosine series), their ``ScaleKernel``, sums and
    products (e.g. quasi-periodic Matérn x periodic). Cost is O(n d^3) for ``n`` points and
    state dimension ``d`` (instead of O(n^3)). Implements :class:`bdl.core.Model` with
    inputs ``X`` of shape ``(..., n, 1)`` (the times).

    Usage::

        model = StateSpaceGP(ScaleKernel(MaternKernel(nu=1.5)), noise=0.1)
        model.fit((t, y))                          # type-II ML (L-BFGS); history_
        model.log_marginal_likelihood(t, y)        # differentiable; the full sum
        post = model.posterior(t_new[:, None])     # StateSpacePosterior, mean (n_new, 1)
        post.rsample(torch.Size([100]))            # joint draws (FFBS, O(n)), (100, n_new, 1)
        model.log_marginal_likelihood(t_b, y_b)    # batch: y_b (..., n), t_b (n,) or (..., n)

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel
        Prior covariance; its hyperparameters are this module's parameters.
    noise : float, default 0.1
        Initial observation-noise variance, > ``noise_lower_bound``. Stored as ``raw_noise``
        behind a gpytorch ``GreaterThan`` constraint (``raw_noise_constraint``):
        ``noise = softplus(raw_noise) + noise_lower_bound``.
    method : {"auto", "fast", "parallel", "sequential"}, default "auto"
        Algorithm; all are exact and agree to rounding. ``"sequential"``: the Kalman loop in
        torch (:mod:`.kalman`). ``"parallel"``: ``O(log n)``-depth associative scans
        (:mod:`.parallel`). ``"fast"``: the log marginal likelihood and its gradient by a
        compiled filter with a hand-written adjoint (:mod:`.fast`; numba, ``pip install
        bdlgp[fast]``; without numba it falls back to the parallel scan) — smoothing and
        batches of series use the parallel scan. ``"auto"``: ``"fast"`` for one Gaussian
        series on CPU when numba is installed, the parallel scan otherwise. Can be
        overridden per call (keyword ``method``).
    periodic_order : int, optional
        Number of harmonics of every ``PeriodicKernel`` (fixed order: the likelihood is then
        a smooth function of the hyperparameters). Default: the smallest order whose
        worst-case kernel error is at most ``periodic_tol``.
    periodic_tol : float, default 1e-6
        Truncation tolerance of the periodic series when ``periodic_order`` is None.
    likelihood : gpytorch Likelihood, optional
        ``None`` or a ``GaussianLikelihood`` (whose current noise then initialises ``noise``)
        give the exact Gaussian model. ``BernoulliLikelihood`` (probit),
        :class:`gp.BernoulliLogitLikelihood` or :class:`gp.PoissonLikelihood` give a
        non-Gaussian model fitted by conjugate-computation VI in O(n)
        (:mod:`gp.statespace.cvi`); ``noise`` is then unused (``raw_noise`` is frozen).
    cvi : CVIConfig, optional
        Settings of the CVI iteration (non-Gaussian likelihoods only).
    noise_lower_bound : float, default :data:`gp.likelihoods.NOISE_LOWER_BOUND` (1e-6)
        Lower bound of the noise variance (0 allows any positive noise).

    Attributes
    ----------
    train_t, train_y : Tensor or None
        Data set by :meth:`set_data` (non-persistent buffers: moved and cast by ``.to()``,
        not part of ``state_dict``).
    sites : CVISites or None
        Non-Gaussian likelihoods: CVI site parameters of the training points (buffers, so
        they are saved in ``state_dict`` and warm-start the next CVI run).
    history_ : list of float
        ``-log p(y)`` (or ``-ELBO``) during the last :meth:`fit`.

    Notes
    -----
    Times may be unsorted and repeated; NaN in ``y`` marks missing observations. Computation
    happens in the dtype and on the device of the data (the hyperparameters are cast);
    :meth:`posterior` computes in the promoted dtype of the data and ``X`` and answers in
    ``X``'s. Float32 is supported for lengthscales far below and far above the time steps
    (balanced Matérn coordinates, cancellation-free process noise and block-wise matrix
    exponentials: see :func:`gp.statespace.discretise`); a posterior that is not finite
    raises a ``ValueError`` saying why (recommending float64 where it ran in float32).
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
        noise_lower_bound: float = NOISE_LOWER_BOUND,
    ) -> None:
        super().__init__()
        self.sde_options = {"periodic_order": periodic_order, "periodic_tol": periodic_tol}
        kernel_to_sde(kernel, **self.sde_options)  # a clear ValueError for unsupported kernels
        resolve_method(method)  # validates the name
        self.method = method
        self.kernel = kernel
        self._init_noise(noise, noise_lower_bound)
        likelihood = check_likelihood(likelihood)
        if isinstance(likelihood, GaussianLikelihood):  # exact path; its noise initialises noise
            self.noise, likelihood = likelihood.noise.detach().reshape(-1)[0], None
        self.likelihood = likelihood
        self.sites = None if likelihood is None else CVISites()  # CVI sites (buffers)
        self.cvi = CVIConfig() if cvi is None else cvi
        if likelihood is not None:
            self.raw_noise.requires_grad_(False)  # no Gaussian noise in a non-Gaussian model
        # the data (not state: non-persistent buffers, so they follow .to() and pickling)
        self.register_buffer("train_t", None, persistent=False)
        self.register_buffer("train_y", None, persistent=False)

    @property
    def num_outputs(self) -> int:
        """One output."""
        return 1

    @property
    def batch_shape(self) -> torch.Size:
        """Batch shape of the series set by :meth:`set_data` (empty for one series)."""
        if self.train_t is None:
            return torch.Size([])
        return torch.broadcast_shapes(self.train_t.shape[:-1], self.train_y.shape[:-1])

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
        of the Gaussian-VI optimum instead, also the full sum (``cvi_elbo(...,
        reduction="sum")``): CVI is first run to convergence on the stored sites (no
        graph), then the ELBO is differentiable in the hyperparameters (and its gradient is
        the optimal ELBO's).

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
        t, y = t.to(dtype), y.to(dtype)
        sde = self.sde(dtype=dtype, device=device)
        if self.likelihood is not None:  # non-Gaussian: the CVI lower bound (.cvi)
            return cvi_elbo(
                self.likelihood, sde, t, y, self.sites, self.cvi, method, reduction="sum"
            )
        grid = make_grid(t, y)
        noise = self.noise.to(dtype=dtype, device=device)
        if self._use_fast(requested, t, y, device):
            return fast_log_marginal_likelihood(sde, grid.dt, grid.y, noise)
        return filter_grid(sde, grid, noise, method)[1].log_likelihood

    def _query_times(self, X: Tensor) -> Tensor:
        """Prediction times (..., n_new) from ``X`` (..., n_new, 1) or (n_new,), checked."""
        t_new = check_inputs(X, d=1).squeeze(-1)
        try:
            torch.broadcast_shapes(self.batch_shape, t_new.shape[:-1])
        except RuntimeError as err:
            raise ValueError(
                f"X has batch shape {tuple(t_new.shape[:-1])}, which does not broadcast with "
                f"the batch_shape {tuple(self.batch_shape)} of the data; X must have shape "
                "(..., n, 1) or (n,)"
            ) from err
        return t_new

    def posterior(
        self,
        X: Tensor,
        *,
        observation_noise: bool = False,
        joint: bool = False,
        method: str | None = None,
    ) -> StateSpacePosterior:
        """Posterior at times ``X`` given the data from :meth:`set_data`.

        Exact RTS smoothing on the training times merged with the prediction times (as
        missing observations): covers interpolation, prediction at training times and
        forecasting before or after the data. With a non-Gaussian ``likelihood``: the CVI
        posterior ``q(f)`` (the smoother on CVI's Gaussian pseudo-observations, see
        :func:`gp.statespace.cvi_pseudo_data`); probabilities / rates of ``y`` follow from
        :func:`gp.statespace.predictive_moments`.

        The returned :class:`gp.statespace.StateSpacePosterior` holds the marginals; its
        ``rsample`` draws *joint* samples of ``f`` (correlated across times as the GP
        posterior) by forward-filtering backward-sampling in O(n)
        (:mod:`gp.statespace.ffbs`), and its ``covariance_matrix`` is the dense joint
        covariance, built on request. It is the same object for ``joint=True`` and
        ``joint=False``.

        Parameters
        ----------
        X : Tensor, shape (..., n_new, 1) or (n_new,)
            Finite prediction times, any order. The batch shape ``...`` broadcasts with the
            data's batch of series (:attr:`batch_shape`).
        observation_noise : bool, default False
            Add the noise variance (predictive of ``y``) instead of the latent ``f``
            (Gaussian likelihood only).
        joint : bool, default False
            Accepted for the model protocol; the posterior always has the joint law (FFBS
            draws, dense ``covariance_matrix`` on request).
        method : {"auto", "fast", "parallel", "sequential"}, optional
            Overrides the constructor's ``method`` for this call (``"auto"`` and ``"fast"``
            smooth with the parallel scan).

        Returns
        -------
        StateSpacePosterior
            In ``X``'s dtype: ``mean`` and marginal ``variance`` of shape (..., n_new, 1);
            differentiable in ``X`` and the hyperparameters.
        """
        if self.train_t is None:
            raise RuntimeError("no data: call set_data(t, y) before posterior(X)")
        t_new = self._query_times(X)
        dtype, device = _common(t=self.train_t, y=self.train_y, X=t_new)
        method = resolve_method(self.method if method is None else method, device)
        sde = self.sde(dtype=dtype, device=device)
        t, y = self.train_t.to(dtype), self.train_y.to(dtype)
        if self.likelihood is None:
            noise = self.noise.to(dtype=dtype, device=device)
        elif observation_noise:
            raise ValueError(
                "observation_noise=True needs a Gaussian likelihood; for "
                f"{type(self.likelihood).__name__} use gp.statespace.predictive_moments("
                "model.likelihood, post.mean, post.variance)"
            )
        else:  # non-Gaussian: q(f) from the CVI sites (.cvi)
            y, noise = cvi_pseudo_data(self.likelihood, sde, t, y, self.sites, self.cvi, method)
        post = smoothing_posterior(sde, t, y, noise, t_new.to(dtype), method)
        if observation_noise:
            post = post.add_observation_noise(self.noise.to(dtype=dtype, device=device))
        return cast_posterior(post, X.dtype)

    def extra_repr(self) -> str:
        return f"noise={self.noise.item():.4g}, method={self.method!r}"

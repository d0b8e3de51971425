""":class:`StateSpaceGPRegressor`: exact GP regression on one time input in O(n)
(:class:`gp.StateSpaceGP`) as a scikit-learn regressor."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from gpytorch.kernels import Kernel, MaternKernel, ScaleKernel
from sklearn.utils.validation import (
    check_array,
    check_consistent_length,
    check_is_fitted,
    column_or_1d,
    validate_data,
)
from torch import Tensor

from bdl.core.transforms import Standardize, column_scale
from bdl.core.validation import check_choice, check_int
from gp._regressor import MarginalLikelihoodRegressor
from gp.likelihoods import NOISE_LOWER_BOUND
from gp.statespace.kernels import rescale_time
from gp.statespace.model import StateSpaceGP
from gp.statespace.trend import TrendGP, trend_degree

__all__ = ["StateSpaceGPRegressor"]


class StateSpaceGPRegressor(MarginalLikelihoodRegressor):
    """Exact GP regression on one time input in O(n) (:class:`gp.StateSpaceGP`), as a
    scikit-learn regressor.

    ``X`` must have exactly one column (the time); times may be unsorted and repeated.
    Kernel hyperparameters — Matérn lengthscales, periodic and cosine periods — are given,
    and reported in ``kernel_``, in the time units of ``X`` (a yearly period on times in
    years is ``period_length = 1``). Internally the model computes in standardised time,
    as :class:`gp.GPRegressor` does, which keeps the optimisation equally well scaled
    whatever the units: the kernel is converted on the way in and ``kernel_`` on the way
    out (:func:`gp.statespace.kernels.rescale_time`, constraints' bounds included). The
    targets are standardised with the training statistics. NaN targets are missing values
    (skipped by the Kalman filter); ``X`` must be finite and at least one target observed.

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel, optional
        Prior covariance with a state-space form (Matérn 1/2, 3/2, 5/2, cosine, periodic,
        their scalings, sums and products) in the time units of ``X``; deep-copied in
        ``fit``. Default: ``ScaleKernel(MaternKernel(nu=1.5))`` starting at lengthscale
        ``log(2)`` standard deviations of the training times.
    noise : float, default 0.1
        Initial observation-noise variance in standardised target units (targets divided
        by their standard deviation — with a polynomial ``mean``, by that of the trend's
        residuals).
    method : {"auto", "fast", "parallel", "sequential"}, default "auto"
        Kalman filtering / smoothing algorithm (see :class:`gp.StateSpaceGP`).
    optimizer : {"lbfgs", "adam"}, default "lbfgs"
        Optimiser of the log marginal likelihood.
    max_iter : int, default 100
        Optimiser budget; 0 keeps the initial hyperparameters.
    random_state : int, RandomState or None
        Default seed of :meth:`sample_y` (fitting is deterministic).
    verbose : bool, default False
        Show a progress bar while fitting.
    device : str, torch.device or None, default None
        Torch device of the model and the data, as for :class:`gp.GPRegressor` (on CUDA the
        default ``method="auto"`` uses the parallel scan).
    noise_lower_bound : float, default :data:`gp.likelihoods.NOISE_LOWER_BOUND` (1e-6)
        Lower bound of the noise variance in standardised target units.
    mean : {"constant", "linear"} or int, default "constant"
        Prior mean. ``"constant"``: the training mean of the targets. ``"linear"`` (degree
        1) or an int degree ``p``: a polynomial trend of degree ``p`` in time whose
        coefficients have a flat prior and are integrated out exactly
        (:class:`gp.statespace.trend.TrendGP`, Rasmussen & Williams Sec. 2.7): the
        posterior mean follows the generalised least-squares trend and the variances and
        draws include the trend's uncertainty, which grows away from the data. The kernel
        hyperparameters are fitted to the residuals of the ordinary least-squares trend.
        ``0`` is ``"constant"``.
    periodic_order : int, optional
        Number of harmonics of every ``PeriodicKernel`` (see :class:`gp.StateSpaceGP`);
        default: chosen from the periodic lengthscale at every evaluation (which makes the
        objective piecewise smooth; a fixed order makes it smooth).

    Attributes
    ----------
    model_, kernel_, noise_, loss_curve_, n_iter_, log_marginal_likelihood_value_
        As for :class:`gp.GPRegressor` (``model_.model`` is the :class:`gp.StateSpaceGP`,
        or for a polynomial ``mean`` a :class:`gp.statespace.trend.TrendGP` around it,
        in standardised time and target units).
    input_transform_, outcome_transform_, device_
        As for :class:`gp.GPRegressor`.

    Notes
    -----
    :meth:`predict`, :meth:`posterior` and :meth:`sample_y` are O(n + n_new): marginals by
    RTS smoothing, joint draws by forward-filtering backward-sampling
    (:class:`gp.statespace.StateSpacePosterior`, kept through the standardisation), with no
    dense covariance. Only ``posterior(X).covariance_matrix`` (and ``joint_log_prob``)
    build the dense ``(n_new, n_new)`` joint, when asked for.
    """

    def __init__(
        self,
        kernel: Kernel | None = None,
        noise: float = 0.1,
        method: str = "auto",
        optimizer: str = "lbfgs",
        max_iter: int = 100,
        random_state: int | np.random.RandomState | None = None,
        verbose: bool = False,
        device: str | torch.device | None = None,
        noise_lower_bound: float = NOISE_LOWER_BOUND,
        mean: str | int = "constant",
        periodic_order: int | None = None,
    ) -> None:
        self.kernel = kernel
        self.noise = noise
        self.method = method
        self.optimizer = optimizer
        self.max_iter = max_iter
        self.random_state = random_state
        self.verbose = verbose
        self.device = device
        self.noise_lower_bound = noise_lower_bound
        self.mean = mean
        self.periodic_order = periodic_order

    def _check_params(self) -> None:
        super()._check_params()
        check_choice("method", self.method, ("auto", "fast", "parallel", "sequential"))
        trend_degree(self.mean)
        if self.periodic_order is not None:
            check_int("periodic_order", self.periodic_order, minimum=0)

    def _check_features(self, X: np.ndarray) -> None:
        if X.shape[1] != 1:
            raise ValueError(
                f"{type(self).__name__} needs X with exactly one column (the time input), "
                f"got X with {X.shape[1]} columns"
            )

    def _validate_fit_data(
        self, X: Any, y: Any, *, multi_output: bool = False, min_samples: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """Finite float64 ``X`` (n, 1) and targets (n, 1) in which NaN marks a missing value.

        ``y`` may hold NaN (not inf) and needs at least one finite value; sets ``_y_1d``.
        """
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None"
            )
        kind = np.asarray(y).dtype.kind
        if kind in "USaVb":
            raise ValueError(f"y must be numeric for regression, got dtype {np.asarray(y).dtype}")
        X = validate_data(self, X, dtype=np.float64)
        y = check_array(
            y, ensure_2d=False, dtype=np.float64, ensure_all_finite="allow-nan", input_name="y"
        )
        y = column_or_1d(y, warn=True)
        check_consistent_length(X, y)
        if X.shape[0] < min_samples:
            raise ValueError(f"{type(self).__name__} needs at least {min_samples} sample to fit")
        if bool(np.isinf(y).any()):
            raise ValueError("y contains inf; use NaN to mark a missing target")
        if not bool(np.isfinite(y).any()):
            raise ValueError("y has no finite value; at least one target must be observed")
        self._y_1d = True
        return X, y.reshape(-1, 1)

    def _fit_inputs(self, X: np.ndarray) -> Tensor:
        """Standardised times (as :class:`gp.GPRegressor`), kept for :meth:`_fit_targets`."""
        x = super()._fit_inputs(X)
        self._fit_times = x[:, 0].detach().to(device="cpu", dtype=torch.float64)
        return x

    def _fit_targets(self, y: np.ndarray) -> Tensor:
        """Standardise with the observed targets' mean and standard deviation — with a
        polynomial ``mean``, the standard deviation of the least-squares trend's residuals
        (what the GP models), so that ``noise`` and the kernel's scales keep their meaning."""
        y64 = torch.tensor(np.array(y, dtype=np.float64))
        t = self.__dict__.pop("_fit_times").numpy()
        observed = ~torch.isnan(y64[:, 0])
        transform = Standardize(1).fit(y64[observed])
        degree = trend_degree(self.mean)
        if degree is not None:
            n_obs = int(observed.sum())
            if n_obs <= degree:
                raise ValueError(
                    f"mean={self.mean!r} asks for a polynomial trend of degree {degree}, "
                    f"which needs at least {degree + 1} observed targets; got {n_obs}"
                )
            t_obs, y_obs = t[observed.numpy()], y64[observed, 0].numpy()
            fitted = np.polynomial.Polynomial.fit(t_obs, y_obs, degree)(t_obs)
            residual = torch.as_tensor(y_obs - fitted)[:, None]
            transform.scale = column_scale(residual, residual.mean(0))
        self.outcome_transform_ = transform.to(self.device_)
        return self._tensor(self.outcome_transform_(y64.to(self.device_)))

    @property
    def _time_scale(self) -> float:
        """Standard deviation of the training times (1 for constant times)."""
        return float(self.input_transform_.scale[0])

    def _default_kernel(self, n_features: int) -> Kernel:
        return ScaleKernel(MaternKernel(nu=1.5))  # lengthscale log(2) in standardised time

    def _build_model(self, kernel: Kernel) -> StateSpaceGP | TrendGP:
        if self.kernel is not None:  # the user's kernel is in the units of X
            rescale_time(kernel, 1.0 / self._time_scale)
        gp = StateSpaceGP(
            kernel,
            noise=float(self.noise),
            method=self.method,
            noise_lower_bound=self.noise_lower_bound,
            periodic_order=self.periodic_order,
        )
        degree = trend_degree(self.mean)
        return gp if degree is None else TrendGP(gp, degree)

    def fit(self, X: Any, y: Any) -> StateSpaceGPRegressor:
        """Fit as :meth:`gp.GPRegressor.fit`; NaN targets are missing values.

        ``kernel_`` is a copy of the fitted kernel in the time units of ``X`` (the model
        computes in standardised time: ``model_.model.kernel`` holds the same prior with
        every lengthscale and period divided by the standard deviation of the times).
        """
        super().fit(X, y)
        self.kernel_ = rescale_time(copy.deepcopy(self._inner.kernel), self._time_scale)
        return self

    def log_marginal_likelihood(self) -> float:
        """Log marginal likelihood of the observed training targets (original units).

        As for :class:`gp.GPRegressor`, over the observed (non-NaN) targets only. With a
        polynomial ``mean``: the restricted likelihood of :class:`gp.statespace.trend.TrendGP`
        (the trend's coefficients integrated out under a flat prior).
        """
        check_is_fitted(self)
        with torch.no_grad():
            lml = float(self._inner.log_marginal_likelihood())
        n = int((~torch.isnan(self._inner.train_y)).sum())  # observed targets
        if isinstance(self._inner, TrendGP):  # restricted: n - p - 1 contrasts of y
            n -= self._inner.degree + 1
        return lml - self.outcome_transform_.log_det_jacobian(n)

""":class:`StateSpaceGPRegressor`: exact GP regression on one time input in O(n)
(:class:`gp.StateSpaceGP`) as a scikit-learn regressor."""

from __future__ import annotations

import numpy as np
import torch
from gpytorch.kernels import Kernel, MaternKernel, ScaleKernel

from bdl.core.validation import check_choice
from gp._regressor import MarginalLikelihoodRegressor
from gp.likelihoods import NOISE_LOWER_BOUND
from gp.statespace.model import StateSpaceGP

__all__ = ["StateSpaceGPRegressor"]


class StateSpaceGPRegressor(MarginalLikelihoodRegressor):
    """Exact GP regression on one time input in O(n) (:class:`gp.StateSpaceGP`), as a
    scikit-learn regressor.

    ``X`` must have exactly one column (the time); times may be unsorted and repeated. The
    time and the targets are standardised with the training statistics, as in
    :class:`gp.GPRegressor`.

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel, optional
        Prior covariance with a state-space form (Matérn 1/2, 3/2, 5/2, cosine, periodic,
        their scalings, sums and products) on the *standardised* time; deep-copied in
        ``fit``. Default: ``ScaleKernel(MaternKernel(nu=1.5))``.
    noise : float, default 0.1
        Initial observation-noise variance in standardised target units.
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

    Attributes
    ----------
    model_, kernel_, noise_, loss_curve_, n_iter_, log_marginal_likelihood_value_
        As for :class:`gp.GPRegressor` (``model_.model`` is the :class:`gp.StateSpaceGP`).
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

    def _check_params(self) -> None:
        super()._check_params()
        check_choice("method", self.method, ("auto", "fast", "parallel", "sequential"))

    def _check_features(self, X: np.ndarray) -> None:
        if X.shape[1] != 1:
            raise ValueError(
                f"{type(self).__name__} needs X with exactly one column (the time input), "
                f"got X with {X.shape[1]} columns"
            )

    def _default_kernel(self, n_features: int) -> Kernel:
        return ScaleKernel(MaternKernel(nu=1.5))

    def _build_model(self, kernel: Kernel) -> StateSpaceGP:
        return StateSpaceGP(
            kernel,
            noise=float(self.noise),
            method=self.method,
            noise_lower_bound=self.noise_lower_bound,
        )

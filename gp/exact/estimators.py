""":class:`GPRegressor`: exact GP regression (:class:`gp.ExactGP`) as a scikit-learn regressor."""

from __future__ import annotations

import numpy as np
import torch
from gpytorch.constraints import GreaterThan
from gpytorch.kernels import Kernel, MaternKernel, ScaleKernel

from gp._regressor import MarginalLikelihoodRegressor
from gp.exact.model import ExactGP
from gp.likelihoods import LENGTHSCALE_LOWER_BOUND, NOISE_LOWER_BOUND

__all__ = ["GPRegressor"]


class GPRegressor(MarginalLikelihoodRegressor):
    """Exact GP regression (:class:`gp.ExactGP`) as a scikit-learn regressor.

    Inputs are standardised per column and targets standardised with the training
    statistics; the hyperparameters and the noise are fitted by maximising the log marginal
    likelihood of the standardised data; everything is computed in float64 and answered in
    the original units.

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel, optional
        Prior covariance on the *standardised* inputs (initial hyperparameters); deep-copied
        in ``fit``, never modified. Default: ``ScaleKernel(MaternKernel(nu=2.5,
        ard_num_dims=d))`` (one length scale per input column, each bounded below by
        ``gp.likelihoods.LENGTHSCALE_LOWER_BOUND``).
    noise : float, default 0.1
        Initial observation-noise variance in standardised target units.
    optimizer : {"lbfgs", "adam"}, default "lbfgs"
        Optimiser of the log marginal likelihood (:func:`gp.fit_hyperparameters`).
    max_iter : int, default 100
        Optimiser budget; 0 keeps the initial hyperparameters (a fixed kernel).
    random_state : int, RandomState or None
        Default seed of :meth:`sample_y` (fitting is deterministic).
    verbose : bool, default False
        Show a progress bar while fitting.
    device : str, torch.device or None, default None
        Torch device of the model and the data (float64 throughout): ``None`` is the CPU,
        ``"cuda"`` a GPU (a ``ValueError`` naming ``device`` if it is not available).
    noise_lower_bound : float, default :data:`gp.likelihoods.NOISE_LOWER_BOUND` (1e-6)
        Lower bound of the noise variance in standardised target units.

    Attributes
    ----------
    model_ : bdl.core.TransformedModel
        Fitted model in the user's units; ``model_.model`` is the :class:`gp.ExactGP` on
        the standardised data.
    kernel_ : gpytorch.kernels.Kernel
        Fitted kernel (on standardised inputs and targets).
    noise_ : float
        Fitted noise variance in original target units.
    loss_curve_ : list of float
        ``-log p(z)`` during fitting (standardised targets).
    n_iter_ : int
        Objective evaluations (L-BFGS) or steps (Adam).
    log_marginal_likelihood_value_ : float
        Log marginal likelihood of the training targets, original units.
    input_transform_, outcome_transform_ : bdl.core.Normalize, bdl.core.Standardize
        The fitted standardisations.
    device_ : torch.device
        Device of ``model_``; :meth:`posterior` returns tensors there.

    Notes
    -----
    :meth:`posterior` gives the marginal posterior by default and the joint covariance
    with ``joint=True``; :meth:`sample_y` draws jointly across the points (full posterior
    covariance of ``f`` plus independent observation noise).
    """

    def __init__(
        self,
        kernel: Kernel | None = None,
        noise: float = 0.1,
        optimizer: str = "lbfgs",
        max_iter: int = 100,
        random_state: int | np.random.RandomState | None = None,
        verbose: bool = False,
        device: str | torch.device | None = None,
        noise_lower_bound: float = NOISE_LOWER_BOUND,
    ) -> None:
        self.kernel = kernel
        self.noise = noise
        self.optimizer = optimizer
        self.max_iter = max_iter
        self.random_state = random_state
        self.verbose = verbose
        self.device = device
        self.noise_lower_bound = noise_lower_bound

    def _default_kernel(self, n_features: int) -> Kernel:
        # lengthscales bounded below (standardised inputs): an unbounded one can underflow to 0
        # in an L-BFGS line search and turn the kernel matrix into NaN
        return ScaleKernel(
            MaternKernel(
                nu=2.5,
                ard_num_dims=n_features,
                lengthscale_constraint=GreaterThan(LENGTHSCALE_LOWER_BOUND),
            )
        )

    def _build_model(self, kernel: Kernel) -> ExactGP:
        return ExactGP(
            kernel, noise=float(self.noise), mean="zero", noise_lower_bound=self.noise_lower_bound
        )

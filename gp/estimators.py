"""scikit-learn estimators over the GP models: :class:`GPRegressor` (exact, Cholesky) and
:class:`StateSpaceGPRegressor` (exact, Kalman filtering on one time input).

Both standardise the inputs (per column) and the targets with training statistics, fit the
kernel hyperparameters and the noise by maximising the log marginal likelihood of the
standardised data (:func:`gp.fit_hyperparameters`), compute in float64 on the chosen
``device`` and undo the standardisation on output. The GP prior mean is zero on the
standardised targets (the training mean in original units), as scikit-learn's
``normalize_y=True``.

Device handling (shared with :mod:`gp.sparse.estimators`): ``device=None`` computes on the
CPU, ``"cuda"`` (or any torch device) moves the model and the data there; ``predict`` and
``sample_y`` return numpy arrays, ``posterior`` returns tensors on that device. A pickled
estimator stores its torch state on the CPU; unpickling moves it back to the device it was
fitted on when that device is available and otherwise keeps it on the CPU with a warning.
"""

from __future__ import annotations

import copy
import math
import warnings
from abc import ABC, abstractmethod

import numpy as np
import torch
from gpytorch.kernels import Kernel, MaternKernel, ScaleKernel
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor, nn

from bdl.core.validation import check_choice, check_int, check_positive
from bdl.estimators import _Standardizer
from bdl.core.posterior import GaussianPosterior
from gp.exact import ExactGP
from gp.fitting import fit_hyperparameters
from gp.statespace import StateSpaceGP, StateSpacePosterior

__all__ = ["GPRegressor", "StateSpaceGPRegressor"]

_DTYPE = torch.float64


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device an estimator computes on: CPU for ``None``.

    Raises
    ------
    ValueError
        For a string that is no torch device, or a CUDA device when CUDA is not available.
    TypeError
        For anything but ``None``, a string or a ``torch.device``.
    """
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(
            f"device must be None, a string such as 'cpu' or 'cuda', or a torch.device, got "
            f"{type(device).__name__}"
        )
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(
            f"device must be None, 'cpu', 'cuda', 'cuda:<index>' or a torch.device, got {device!r}"
        ) from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asks for CUDA, but CUDA is not available here")
    return resolved


class _DevicePickleMixin:
    """Pickle the fitted torch state (attributes that are modules or tensors) on the CPU.

    ``__getstate__`` stores CPU copies (the estimator itself is untouched); ``__setstate__``
    moves them back to ``device_`` when that device is available, else keeps them on the CPU
    (with a warning) and sets ``device_`` to the CPU.
    """

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        device = state.get("device_")
        if device is not None and torch.device(device).type != "cpu":
            torch_items = {
                k: v for k, v in state.items() if isinstance(v, (nn.Module, torch.Tensor))
            }
            copied = copy.deepcopy(torch_items)  # one memo: shared submodules stay shared
            state.update({k: v.cpu() for k, v in copied.items()})
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        device = getattr(self, "device_", None)
        if device is None or torch.device(device).type == "cpu":
            return
        try:
            device = resolve_device(device)
        except ValueError:
            warnings.warn(
                f"this estimator was fitted on {device}, which is not available here; its "
                "model stays on the CPU",
                UserWarning,
                stacklevel=2,
            )
            self.device_ = torch.device("cpu")
            return
        for key, value in list(self.__dict__.items()):
            if isinstance(value, nn.Module):
                value.to(device)
            elif isinstance(value, torch.Tensor):
                setattr(self, key, value.to(device))


class _GPRegressorBase(_DevicePickleMixin, RegressorMixin, BaseEstimator, ABC):
    """Shared fit / predict / sample machinery (not public).

    Subclasses define ``_build_model(kernel)``, ``_default_kernel(n_features)`` and
    ``_joint_posterior(x)``, and may restrict the inputs in ``_check_features``.
    """

    def _check_params(self) -> None:
        if self.kernel is not None and not isinstance(self.kernel, Kernel):
            raise ValueError(
                f"kernel must be a gpytorch Kernel or None, got {type(self.kernel).__name__}"
            )
        check_positive("noise", self.noise)
        check_choice("optimizer", self.optimizer, ("lbfgs", "adam"))
        check_int("max_iter", self.max_iter, minimum=0)
        resolve_device(self.device)

    def _check_features(self, X: np.ndarray) -> None:
        """Hook: raise ValueError for inputs the model cannot take."""

    @abstractmethod
    def _default_kernel(self, n_features: int) -> Kernel:
        """Kernel used when ``kernel=None``."""

    @abstractmethod
    def _build_model(self, kernel: Kernel) -> nn.Module:
        """The torch GP model around ``kernel``."""

    @abstractmethod
    def _joint_posterior(self, x: Tensor) -> GaussianPosterior:
        """Joint latent posterior at standardised inputs ``x`` (n, d), standardised units."""

    def _inputs(self, X) -> Tensor:
        """Validated, standardised float64 tensor (n, d) of new inputs on ``device_``."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        self._check_features(X)
        return torch.as_tensor(self.x_scaler_(X), dtype=_DTYPE, device=self.device_)

    def fit(self, X, y) -> _GPRegressorBase:
        """Fit the GP hyperparameters to ``X`` (n, d) and targets ``y`` (n,); returns self.

        Sets ``model_`` (the fitted torch model, on standardised data), ``kernel_`` (its
        kernel), ``noise_`` (noise variance in original target units), ``loss_curve_``
        (``-log p(y)`` of the standardised data, see :func:`gp.fit_hyperparameters`),
        ``n_iter_`` (objective evaluations of L-BFGS, or Adam steps),
        ``log_marginal_likelihood_value_`` (original units), ``x_scaler_``, ``y_scaler_``,
        ``device_`` (the torch device of the model).
        """
        self._check_params()
        device = resolve_device(self.device)
        y_array = np.asarray(y)
        if y_array.dtype.kind in "USaV":
            raise ValueError(f"y must be numeric for regression, got dtype {y_array.dtype}")
        X, y = validate_data(self, X, y, y_numeric=True, dtype=np.float64)
        self._check_features(X)
        self.x_scaler_ = _Standardizer(X)
        self.y_scaler_ = _Standardizer(y)
        x = torch.as_tensor(self.x_scaler_(X), dtype=_DTYPE, device=device)
        z = torch.as_tensor(self.y_scaler_(y), dtype=_DTYPE, device=device)
        if self.kernel is None:
            kernel = self._default_kernel(X.shape[1])
        else:
            kernel = copy.deepcopy(self.kernel)  # never mutate the parameter
        model = self._build_model(kernel).to(dtype=_DTYPE, device=device)
        model.noise = float(self.noise)  # set again in float64 (the models build in float32)
        model.set_data(x, z)
        self.loss_curve_ = fit_hyperparameters(
            model, optimizer=self.optimizer, max_iter=self.max_iter, verbose=self.verbose
        )
        self.n_iter_ = len(self.loss_curve_) - 1  # objective evaluations (Adam: steps)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model_ = model
        self.device_ = device
        self.kernel_ = model.kernel
        self.noise_ = float(model.noise.detach()) * float(self.y_scaler_.scale) ** 2
        self.log_marginal_likelihood_value_ = self.log_marginal_likelihood()
        return self

    def log_marginal_likelihood(self) -> float:
        """Log marginal likelihood of the training targets at the fitted hyperparameters.

        In original target units: the model sees ``z = (y - m) / s``, and the change of
        variables ``y = s z + m`` (Jacobian ``s`` per point) gives
        ``log p(y) = log p(z) - n log s``. (Standardising the inputs does not change it:
        it is a density of the targets only.)
        """
        check_is_fitted(self)
        with torch.no_grad():
            lml = float(self.model_.log_marginal_likelihood())
        n = int(self.model_.train_y.shape[0])
        return lml - n * math.log(float(self.y_scaler_.scale))

    def _unstandardise(self, post: GaussianPosterior) -> GaussianPosterior:
        scale, shift = float(self.y_scaler_.scale), float(self.y_scaler_.mean)
        mean = post.mean * scale + shift
        if post.is_joint:
            return GaussianPosterior(mean, covariance=post.covariance_matrix * scale**2)
        return GaussianPosterior(mean, variance=post.variance * scale**2)

    @abstractmethod
    def _posterior(self, x: Tensor, observation_noise: bool) -> GaussianPosterior:
        """Marginal (or the model's default) posterior at standardised ``x``."""

    def posterior(self, X, observation_noise: bool = False) -> GaussianPosterior:
        """Posterior at ``X`` (n, d) in the original target units; mean shape (n, 1).

        Latent function ``f`` unless ``observation_noise=True`` (then ``y = f + eps``),
        following BoTorch.
        """
        with torch.no_grad():
            post = self._posterior(self._inputs(X), observation_noise)
        return self._unstandardise(post)

    def predict(self, X, return_std: bool = False):
        """Predictive mean (n,); with ``return_std`` also the predictive standard deviation
        of ``y`` (observation noise included)."""
        x = self._inputs(X)
        with torch.no_grad():
            post = self._unstandardise(self._marginal_posterior(x, observation_noise=True))
        mean = post.mean[:, 0].cpu().numpy()
        return (mean, post.stddev[:, 0].cpu().numpy()) if return_std else mean

    def _marginal_posterior(self, x: Tensor, observation_noise: bool) -> GaussianPosterior:
        return self._posterior(x, observation_noise)

    def sample_y(self, X, n_samples: int = 1, random_state=None) -> np.ndarray:
        """Joint draws of ``y = f + eps`` at the rows of ``X`` from the fitted posterior.

        The points are drawn jointly (full posterior covariance of ``f`` plus independent
        observation noise), not independently per point.

        Parameters
        ----------
        X : array-like, shape (n, d)
        n_samples : int, default 1
        random_state : int, RandomState or None
            Seed of the draws; None uses the estimator's ``random_state`` where it has one,
            else numpy's global generator.

        Returns
        -------
        ndarray, shape (n, n_samples)
        """
        check_int("n_samples", n_samples)
        if random_state is None:
            random_state = getattr(self, "random_state", None)
        rng = check_random_state(random_state)
        x = self._inputs(X)
        with torch.no_grad():
            post = self._unstandardise(self._joint_posterior(x))
            noise = float(self.model_.noise) * float(self.y_scaler_.scale) ** 2
            post = post.add_observation_noise(noise)
            shape = (n_samples, *post.base_sample_shape)
            base = torch.as_tensor(rng.standard_normal(shape), dtype=_DTYPE, device=x.device)
            draws = post.rsample_from_base_samples(torch.Size([n_samples]), base)
        return draws[..., 0].T.cpu().numpy()


class GPRegressor(_GPRegressorBase):
    """Exact GP regression (:class:`gp.ExactGP`) as a scikit-learn regressor.

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel, optional
        Prior covariance on the *standardised* inputs (initial hyperparameters); deep-copied
        in ``fit``, never modified. Default: ``ScaleKernel(MaternKernel(nu=2.5,
        ard_num_dims=d))`` (one length scale per input column).
    noise : float, default 0.1
        Initial observation-noise variance in standardised target units.
    optimizer : {"lbfgs", "adam"}, default "lbfgs"
        Optimiser of the log marginal likelihood (:func:`gp.fit_hyperparameters`).
    max_iter : int, default 100
        Optimiser iterations; 0 keeps the initial hyperparameters (a fixed kernel).
    random_state : int, RandomState or None
        Default seed of :meth:`sample_y` (fitting is deterministic).
    verbose : bool, default False
        Show a progress bar while fitting.
    device : str, torch.device or None, default None
        Torch device of the model and the data (float64 throughout): ``None`` is the CPU,
        ``"cuda"`` a GPU (a ``ValueError`` if CUDA is not available).

    Attributes
    ----------
    model_ : gp.ExactGP
        Fitted model on the standardised data.
    kernel_ : gpytorch.kernels.Kernel
        Fitted kernel (on standardised inputs and targets).
    noise_ : float
        Fitted noise variance in original target units.
    loss_curve_ : list of float
        ``-log p(z)`` during fitting (standardised targets).
    log_marginal_likelihood_value_ : float
        Log marginal likelihood of the training targets, original units.
    device_ : torch.device
        Device of ``model_``; :meth:`posterior` returns tensors there.
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
    ) -> None:
        self.kernel = kernel
        self.noise = noise
        self.optimizer = optimizer
        self.max_iter = max_iter
        self.random_state = random_state
        self.verbose = verbose
        self.device = device

    def _default_kernel(self, n_features: int) -> Kernel:
        return ScaleKernel(MaternKernel(nu=2.5, ard_num_dims=n_features))

    def _build_model(self, kernel: Kernel) -> ExactGP:
        return ExactGP(kernel, noise=float(self.noise), mean="zero")

    def _posterior(self, x: Tensor, observation_noise: bool) -> GaussianPosterior:
        return self.model_.posterior(x, observation_noise=observation_noise, joint=True)

    def _marginal_posterior(self, x: Tensor, observation_noise: bool) -> GaussianPosterior:
        return self.model_.posterior(x, observation_noise=observation_noise, joint=False)

    def _joint_posterior(self, x: Tensor) -> GaussianPosterior:
        return self.model_.posterior(x, joint=True)

    def posterior(self, X, observation_noise: bool = False) -> GaussianPosterior:
        """Joint posterior at ``X`` (n, d) in original target units: mean (n, 1), covariance
        (n, n). Latent ``f`` unless ``observation_noise=True``."""
        return super().posterior(X, observation_noise)


class StateSpaceGPRegressor(_GPRegressorBase):
    """Exact GP regression on one time input in O(n) (:class:`gp.StateSpaceGP`), as a
    scikit-learn regressor.

    ``X`` must have exactly one column (the time); times may be unsorted and repeated.

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
        Optimiser iterations; 0 keeps the initial hyperparameters.
    random_state : int, RandomState or None
        Default seed of :meth:`sample_y` (fitting is deterministic).
    verbose : bool, default False
        Show a progress bar while fitting.
    device : str, torch.device or None, default None
        Torch device of the model and the data, as for :class:`GPRegressor` (on CUDA the
        default ``method="auto"`` uses the parallel scan).

    Attributes
    ----------
    model_, kernel_, noise_, loss_curve_, log_marginal_likelihood_value_, device_
        As for :class:`GPRegressor`.

    Notes
    -----
    :meth:`predict`, :meth:`posterior` and :meth:`sample_y` are O(n + n_new): marginals by
    RTS smoothing, joint draws by forward-filtering backward-sampling
    (:class:`gp.statespace.StateSpacePosterior`), with no dense covariance. Only
    ``posterior(X).covariance_matrix`` (and ``joint_log_prob``) build the dense
    ``(n_new, n_new)`` joint, when asked for.
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
    ) -> None:
        self.kernel = kernel
        self.noise = noise
        self.method = method
        self.optimizer = optimizer
        self.max_iter = max_iter
        self.random_state = random_state
        self.verbose = verbose
        self.device = device

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
        return StateSpaceGP(kernel, noise=float(self.noise), method=self.method)

    def _posterior(self, x: Tensor, observation_noise: bool) -> GaussianPosterior:
        return self.model_.posterior(x[:, 0], observation_noise=observation_noise)

    def _joint_posterior(self, x: Tensor) -> StateSpacePosterior:
        return self.model_.posterior(x[:, 0])  # joint draws by FFBS, O(n + n_new)

    def _unstandardise(self, post: GaussianPosterior) -> GaussianPosterior:
        if isinstance(post, StateSpacePosterior):  # keep FFBS sampling: an affine map of f
            return post.affine(float(self.y_scaler_.scale), float(self.y_scaler_.mean))
        return super()._unstandardise(post)

    def sample_y(self, X, n_samples: int = 1, random_state=None) -> np.ndarray:
        """Joint draws of ``y = f + eps`` at the rows of ``X`` from the fitted posterior.

        Forward-filtering backward-sampling over the training and requested times: the
        draws are jointly distributed as under the full GP posterior covariance of ``f``
        (plus independent observation noise), at O(n + n_new) cost.

        Parameters
        ----------
        X : array-like, shape (n_new, 1)
        n_samples : int, default 1
        random_state : int, RandomState or None
            Seed of the draws; None uses the estimator's ``random_state``.

        Returns
        -------
        ndarray, shape (n_new, n_samples)
        """
        return super().sample_y(X, n_samples, random_state)

    def posterior(self, X, observation_noise: bool = False) -> GaussianPosterior:
        """Posterior at ``X`` (n, 1) in original target units: a
        :class:`gp.statespace.StateSpacePosterior` with marginal mean and variance of shape
        (n, 1) and joint FFBS draws. Latent ``f`` unless ``observation_noise=True``."""
        return super().posterior(X, observation_noise)

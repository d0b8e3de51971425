"""scikit-learn estimators over the sparse GP models: :class:`SparseGPRegressor` and
:class:`SparseGPClassifier`.

Both standardise the inputs per column with training statistics (the regressor also the
targets), build the model from the data (``num_inducing`` inducing inputs chosen among the
training inputs, clamped to the training-set size; a data-scaled initial kernel and noise),
train it by minibatch stochastic optimisation of the ELBO and undo the standardisation on
output.

``method="svgp"`` uses :class:`gp.SVGP` (whitened ``q(u)``, natural gradients for ``q(u)`` and
Adam for the rest; every likelihood); ``method="swsgp"`` uses :class:`gp.sparse.swsgp.SWSGP`
(each input attends to its ``num_neighbors`` nearest inducing points, so ``num_inducing`` can
be tens of thousands; Gaussian and Bernoulli likelihoods, marginal predictions only).

Device and dtype: ``device=None`` computes on the CPU, ``"cuda"`` on a GPU; ``dtype`` is
``"float32"`` (default) or ``"float64"``. ``predict`` / ``predict_proba`` / ``sample_y``
return numpy arrays, ``posterior`` tensors on the model's device. Pickling stores the model
on the CPU (see :mod:`gp.estimators`).
"""

from __future__ import annotations

import copy
import math
import numbers
import time

import numpy as np
import torch
from gpytorch.distributions import MultivariateNormal
from gpytorch.kernels import Kernel, RBFKernel, ScaleKernel
from linear_operator.operators import DiagLinearOperator
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor, nn

from bdl.core.validation import check_choice, check_int, check_positive
from bdl.estimators import _Standardizer
from bdl.core.posterior import CategoricalPosterior, GaussianPosterior
from gp.estimators import _DevicePickleMixin, resolve_device
from gp.sparse.initialisation import select_inducing_points
from gp.sparse.svgp import SVGP
from gp.sparse.swsgp import SWSGP

__all__ = ["SparseGPClassifier", "SparseGPRegressor"]

METHODS = ("svgp", "swsgp")
#: with ``epochs=None`` training runs at least 2 epochs and at least this many steps
MIN_STEPS = 200
#: Adam learning rate of each method when ``lr=None`` (the models' own defaults)
DEFAULT_LR = {"svgp": 0.03, "swsgp": 0.05}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: initial noise variance of SWSGP as a fraction of the (standardised) target variance
SWSGP_NOISE_FRACTION = 0.5
#: Monte Carlo draws of the latent GPs behind the softmax class probabilities
NUM_PROBA_SAMPLES = 256
#: ``init="auto"`` seeds up to this many inducing points by k-means++ and picks a random
#: subset beyond (k-means++ seeding costs O(n M) distance updates: 30 s at M = 4,096 here)
KMEANS_MAX_INDUCING = 1024
INITS = ("auto", "kmeans++", "random")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"float64"`` (or the torch dtypes) as a torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")


def _bernoulli_probability(likelihood: nn.Module, mean: Tensor, var: Tensor) -> Tensor:
    """``P(y = 1)`` under the likelihood's marginal (probit: ``Phi(m / sqrt(1 + v))``)."""
    return likelihood.marginal(MultivariateNormal(mean, DiagLinearOperator(var))).probs


class _SparseGPBase(_DevicePickleMixin, BaseEstimator):
    """Shared parameters, model construction and training (not public)."""

    def _check_params(self) -> None:
        check_choice("method", self.method, METHODS)
        check_int("num_inducing", self.num_inducing)
        check_int("num_neighbors", self.num_neighbors)
        check_choice("init", self.init, INITS)
        if self.epochs is not None:
            check_int("epochs", self.epochs)
        check_int("batch_size", self.batch_size)
        if self.lr is not None:
            check_positive("lr", self.lr)
        if self.kernel is not None and not isinstance(self.kernel, Kernel):
            raise ValueError(
                f"kernel must be a gpytorch Kernel or None, got {type(self.kernel).__name__}"
            )
        resolve_device(self.device)
        resolve_dtype(self.dtype)

    def _seed(self) -> int:
        if isinstance(self.random_state, numbers.Integral):
            return int(self.random_state)
        return int(check_random_state(self.random_state).randint(0, 2**31 - 1))

    def _epochs(self, n: int) -> int:
        if self.epochs is not None:
            return int(self.epochs)
        steps_per_epoch = math.ceil(n / min(self.batch_size, n))
        return max(2, math.ceil(MIN_STEPS / steps_per_epoch))

    def _tensor(self, values: np.ndarray) -> Tensor:
        return torch.as_tensor(values, dtype=self.dtype_, device=self.device_)

    def _inputs(self, X) -> Tensor:
        """Validated, standardised inputs (n, d) in the model's dtype and device."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return self._tensor(self.x_scaler_(X))

    def _fit_model(self, x: Tensor, t: Tensor, likelihood: str, num_classes: int | None) -> None:
        """Build ``model_`` on standardised inputs ``x`` (n, d) and targets ``t`` (n,), train
        it and set the fitted attributes shared by both estimators."""
        n, d = x.shape
        seed = self._seed()
        self.num_inducing_ = min(int(self.num_inducing), n)
        kernel = None if self.kernel is None else copy.deepcopy(self.kernel)
        lr = DEFAULT_LR[self.method] if self.lr is None else float(self.lr)
        epochs = self._epochs(n)
        init = self.init
        if init == "auto":
            init = "kmeans++" if self.num_inducing_ <= KMEANS_MAX_INDUCING else "random"
        if self.method == "svgp":
            model = SVGP.from_data(
                x, t, self.num_inducing_, kernel=kernel, likelihood=likelihood,
                num_classes=num_classes, init=init, seed=seed,
            )  # fmt: skip
            start = time.perf_counter()
            losses = model.fit(
                x, t, epochs=epochs, batch_size=self.batch_size, lr=lr, seed=seed,
                progress=bool(self.verbose),
            )  # fmt: skip
        else:
            model, losses, start = self._fit_swsgp(x, t, likelihood, kernel, init, lr, epochs, seed)
        self.train_time_ = time.perf_counter() - start
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model_ = model
        self.loss_curve_ = losses
        self.n_iter_ = len(losses)

    def _fit_swsgp(
        self,
        x: Tensor,
        t: Tensor,
        likelihood: str,
        kernel: Kernel | None,
        init: str,
        lr: float,
        epochs: int,
        seed: int,
    ) -> tuple[SWSGP, list[float], float]:
        """An :class:`SWSGP` initialised like :meth:`gp.SVGP.from_data` on standardised data
        (unit lengthscales and output scale), then trained;
        also returns the ``time.perf_counter()`` at the start of training."""
        Z = select_inducing_points(x, self.num_inducing_, init, seed)
        if kernel is None:
            kernel = ScaleKernel(RBFKernel(ard_num_dims=x.shape[1]))
            kernel.base_kernel.lengthscale = 1.0  # the standardised inputs' scale
            kernel.outputscale = 1.0  # Var of the standardised targets / of a probit latent
        H = min(int(self.num_neighbors), self.num_inducing_)
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed)  # W's random start and the KL subsample in each step
            model = SWSGP(kernel, Z, num_neighbors=H, likelihood=likelihood)
            if likelihood == "gaussian":
                # A high start: with the unwhitened q(u) trained by Adam, the nearest-neighbour
                # estimate that SVGP starts from (close to the truth) let the early steps fit
                # noise; on the 100,000-point benchmark (two epochs) the test NLL was
                # -0.63 from it and -0.75 from 0.5 (noise sd 0.17 and 0.11, truth 0.1).
                model.likelihood.noise = torch.tensor(SWSGP_NOISE_FRACTION, dtype=x.dtype)
            generator = torch.Generator().manual_seed(seed)
            start = time.perf_counter()
            losses = model.fit(
                x, t, epochs=epochs, batch_size=self.batch_size, lr=lr, generator=generator,
                verbose=bool(self.verbose),
            )  # fmt: skip
        return model, losses, start

    def _prepare(self, X, y, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        """Validate parameters and data; set ``device_``, ``dtype_`` and ``x_scaler_``."""
        self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float64, **kwargs)
        if X.shape[0] < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 samples, got 1 sample")
        self.device_ = resolve_device(self.device)
        self.dtype_ = resolve_dtype(self.dtype)
        self.x_scaler_ = _Standardizer(X)
        return X, y

    def _latent(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Latent marginal means and variances at standardised ``x``, each (n, L)."""
        with torch.no_grad():
            post = self.model_.posterior(x)
        return post.mean, post.variance


class SparseGPRegressor(RegressorMixin, _SparseGPBase):
    """Sparse variational GP regression (SVGP or SWSGP) as a scikit-learn regressor.

    For data sets too large for :class:`gp.GPRegressor`: training costs O(B M^2 + M^3) per
    step for SVGP and O(B H^3) plus the neighbour search for SWSGP (``B`` the batch size,
    ``M`` the inducing points, ``H`` the neighbours), independent of ``n``.

    Parameters
    ----------
    method : {"svgp", "swsgp"}, default "svgp"
        :class:`gp.SVGP` or :class:`gp.sparse.swsgp.SWSGP`.
    num_inducing : int, default 256
        Inducing points ``M`` (chosen among the standardised inputs, see ``init``), clamped to
        the training-set size. SWSGP affords many more (thousands to tens of thousands).
    num_neighbors : int, default 32
        ``H``, nearest inducing points each input uses (``"swsgp"`` only; clamped to ``M``).
    init : {"auto", "kmeans++", "random"}, default "auto"
        Initial inducing inputs: k-means++ seeding (spread over the data) or a uniformly
        random subset (:func:`gp.select_inducing_points`); ``"auto"`` uses k-means++ up to
        :data:`KMEANS_MAX_INDUCING` points and a random subset beyond.
    kernel : gpytorch.kernels.Kernel, optional
        Prior covariance on the *standardised* inputs (initial hyperparameters); deep-copied
        in ``fit``. Default ``ScaleKernel(RBFKernel(ard_num_dims=d))`` with unit lengthscales
        and output scale.
    epochs : int, optional
        Passes over the data; default: at least 2 epochs and at least :data:`MIN_STEPS`
        optimisation steps.
    batch_size : int, default 1024
        Minibatch size (clamped to the training-set size).
    lr : float, optional
        Adam learning rate of the hyperparameters (and of ``q(u)`` for SWSGP); default 0.03
        for SVGP (whose ``q(u)`` takes natural-gradient steps of size 0.1) and 0.05 for SWSGP.
    device : str, torch.device or None, default None
        Where the model and the data live: ``None`` is the CPU, ``"cuda"`` a GPU.
    dtype : {"float32", "float64"}, default "float32"
        Floating-point type of the model and the data.
    random_state : int, RandomState or None
        Seed of the inducing-point selection, the minibatch order and :meth:`sample_y`.
    verbose : bool, default False
        Show a progress bar while training.

    Attributes
    ----------
    model_ : gp.SVGP or gp.sparse.swsgp.SWSGP
        Fitted model on the standardised data.
    num_inducing_ : int
        Inducing points used (``num_inducing`` clamped to ``n``).
    noise_ : float
        Fitted noise variance in original target units.
    loss_curve_ : list of float
        Training loss per step (``-ELBO / n`` of the standardised data).
    n_iter_ : int
        Optimisation steps.
    train_time_ : float
        Wall-clock seconds of the optimisation loop (initialisation excluded), so
        ``train_time_ / n_iter_`` is the time per iteration.
    device_, dtype_ : torch.device, torch.dtype
        Where and in which precision the model computes.

    Notes
    -----
    Initial values on the standardised data: for SVGP those of :meth:`gp.SVGP.from_data`
    (constant mean 0, noise variance from nearest-neighbour differences); for SWSGP a zero
    mean, the same kernel and the noise variance :data:`SWSGP_NOISE_FRACTION` (its
    unwhitened ``q(u)`` trained by Adam fits noise early from a low start).
    """

    def __init__(
        self,
        method: str = "svgp",
        num_inducing: int = 256,
        num_neighbors: int = 32,
        init: str = "auto",
        kernel: Kernel | None = None,
        epochs: int | None = None,
        batch_size: int = 1024,
        lr: float | None = None,
        device: str | torch.device | None = None,
        dtype: str = "float32",
        random_state: int | np.random.RandomState | None = None,
        verbose: bool = False,
    ) -> None:
        self.method = method
        self.num_inducing = num_inducing
        self.num_neighbors = num_neighbors
        self.init = init
        self.kernel = kernel
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.device = device
        self.dtype = dtype
        self.random_state = random_state
        self.verbose = verbose

    def fit(self, X, y) -> SparseGPRegressor:
        """Fit to inputs ``X`` (n, d) and targets ``y`` (n,); returns self."""
        y_array = np.asarray(y)
        if y_array.dtype.kind in "USaV":
            raise ValueError(f"y must be numeric for regression, got dtype {y_array.dtype}")
        X, y = self._prepare(X, y, y_numeric=True)
        self.y_scaler_ = _Standardizer(y)
        x, t = self._tensor(self.x_scaler_(X)), self._tensor(self.y_scaler_(y))
        self._fit_model(x, t, "gaussian", None)
        noise = self.model_.likelihood.noise.detach().reshape(())
        self.noise_ = float(noise) * float(self.y_scaler_.scale) ** 2
        return self

    def _unstandardise(self, post: GaussianPosterior) -> GaussianPosterior:
        scale, shift = float(self.y_scaler_.scale), float(self.y_scaler_.mean)
        mean = post.mean * scale + shift
        if post.is_joint:
            return GaussianPosterior(mean, covariance=post.covariance_matrix * scale**2)
        return GaussianPosterior(mean, variance=post.variance * scale**2)

    def posterior(self, X, observation_noise: bool = False) -> GaussianPosterior:
        """Marginal posterior at ``X`` (n, d) in original target units: mean and variance of
        shape (n, 1), on ``device_``. Latent ``f`` unless ``observation_noise=True``."""
        x = self._inputs(X)
        with torch.no_grad():
            post = self.model_.posterior(x, observation_noise=observation_noise)
        return self._unstandardise(post)

    def predict(self, X, return_std: bool = False):
        """Predictive mean (n,); with ``return_std`` also the predictive standard deviation
        of ``y`` (observation noise included)."""
        post = self.posterior(X, observation_noise=True)
        mean = post.mean[:, 0].cpu().double().numpy()
        return (mean, post.stddev[:, 0].cpu().double().numpy()) if return_std else mean

    def sample_y(self, X, n_samples: int = 1, random_state=None) -> np.ndarray:
        """Joint draws of ``y = f + eps`` at the rows of ``X``.

        Uses the joint ``q(f)`` covariance over the ``n`` points plus independent noise:
        O(n^2 M) time for SVGP; for SWSGP the joint of ``f(X)`` given ``q`` on the union ``U``
        of the rows' neighbour sets (``O(|U|^3 + n^2 |U|)``, see
        :meth:`gp.sparse.swsgp.SWSGP.posterior`), whose mean and variances differ from the
        per-point marginals of :meth:`predict` in either direction (each point is
        conditioned on the union, not on its own H neighbours). O(n^2) memory: meant for
        moderate ``n``.

        Parameters
        ----------
        X : array-like, shape (n, d)
        n_samples : int, default 1
        random_state : int, RandomState or None
            Seed of the draws; None uses the estimator's ``random_state``.

        Returns
        -------
        ndarray, shape (n, n_samples)
        """
        check_int("n_samples", n_samples)
        check_is_fitted(self)
        rng = check_random_state(self.random_state if random_state is None else random_state)
        x = self._inputs(X)
        with torch.no_grad():
            post = self._unstandardise(self.model_.posterior(x, joint=True, observation_noise=True))
            base = torch.as_tensor(
                rng.standard_normal((n_samples, x.shape[0], 1)), dtype=x.dtype, device=x.device
            )
            draws = post.rsample_from_base_samples(torch.Size([n_samples]), base)
        return draws[..., 0].T.cpu().double().numpy()


class SparseGPClassifier(ClassifierMixin, _SparseGPBase):
    """Sparse variational GP classification as a scikit-learn classifier.

    Two classes use a Bernoulli likelihood with the probit link (``P(y = 1) =
    Phi(m / sqrt(1 + v))`` exactly); more classes one latent GP per class with a softmax
    likelihood (``method="svgp"`` only; Monte Carlo predictive probabilities). Labels may be
    of any type scikit-learn accepts (``classes_`` holds them sorted).

    Parameters
    ----------
    method : {"svgp", "swsgp"}, default "svgp"
        ``"swsgp"`` supports two classes only.
    num_inducing, num_neighbors, init, kernel, epochs, batch_size, lr, device, dtype, random_state
        As for :class:`SparseGPRegressor` (the default output scale is 1).
    verbose : bool, default False
        Show a progress bar while training.

    Attributes
    ----------
    classes_ : ndarray, shape (C,)
        Class labels.
    model_, num_inducing_, loss_curve_, n_iter_, train_time_, device_, dtype_
        As for :class:`SparseGPRegressor`.
    """

    def __init__(
        self,
        method: str = "svgp",
        num_inducing: int = 256,
        num_neighbors: int = 32,
        init: str = "auto",
        kernel: Kernel | None = None,
        epochs: int | None = None,
        batch_size: int = 1024,
        lr: float | None = None,
        device: str | torch.device | None = None,
        dtype: str = "float32",
        random_state: int | np.random.RandomState | None = None,
        verbose: bool = False,
    ) -> None:
        self.method = method
        self.num_inducing = num_inducing
        self.num_neighbors = num_neighbors
        self.init = init
        self.kernel = kernel
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.device = device
        self.dtype = dtype
        self.random_state = random_state
        self.verbose = verbose

    def fit(self, X, y) -> SparseGPClassifier:
        """Fit to inputs ``X`` (n, d) and class labels ``y`` (n,); returns self."""
        self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        C = len(self.classes_)
        if C < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 classes in y, got 1 class "
                f"({self.classes_[0]!r})"
            )
        if C > 2 and self.method == "swsgp":
            raise ValueError(
                f"method='swsgp' supports 2 classes (Bernoulli likelihood), y has {C} classes; "
                "use method='svgp' (softmax likelihood)"
            )
        X, _ = self._prepare(X, y_idx)
        x, t = self._tensor(self.x_scaler_(X)), self._tensor(y_idx.astype(np.float64))
        if C == 2:
            self._fit_model(x, t, "bernoulli", None)
        else:
            self._fit_model(x, t, "softmax", C)
        return self

    def _proba(self, x: Tensor) -> Tensor:
        """Predictive class probabilities at standardised ``x``, shape (n, C).

        Two classes: ``Phi(m / sqrt(1 + v))`` exactly. More: the Monte Carlo average of
        ``softmax(m + sqrt(v) * eps)`` over :data:`NUM_PROBA_SAMPLES` seeded draws ``eps`` of
        shape (S, 1, C) shared by all rows, so that each row's result depends on that row
        alone (invariant to the order and the subset of rows asked for).
        """
        mean, var = self._latent(x)
        if len(self.classes_) == 2:
            with torch.no_grad():
                p = _bernoulli_probability(self.model_.likelihood, mean[:, 0], var[:, 0])
            return torch.stack([1 - p, p], -1)
        gen = torch.Generator(device=mean.device).manual_seed(0)
        shape = (NUM_PROBA_SAMPLES, 1, mean.shape[-1])
        eps = torch.randn(shape, generator=gen, dtype=mean.dtype, device=mean.device)
        return torch.softmax(mean + var.clamp_min(0).sqrt() * eps, -1).mean(0)

    def posterior(self, X) -> CategoricalPosterior:
        """Predictive class probabilities at ``X`` (n, d) as a
        :class:`~bdl.posterior.CategoricalPosterior` with ``probs`` of shape (n, C)."""
        return CategoricalPosterior(self._proba(self._inputs(X)))

    def predict_proba(self, X) -> np.ndarray:
        """Predictive class probabilities, shape (n, C), columns in the order of
        ``classes_``."""
        p = self._proba(self._inputs(X)).cpu().double().numpy()
        return p / p.sum(1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        """Most probable class label per row of ``X``, shape (n,)."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

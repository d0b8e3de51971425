"""scikit-learn estimators over the sparse GP models: :class:`SparseGPRegressor` and
:class:`SparseGPClassifier`, thin shells over :class:`bdl.core.estimator.BayesianEstimator`.

Both standardise the inputs per column with training statistics (the regressor also the
targets), build the model from the data (``num_inducing`` inducing inputs chosen among the
training inputs, clamped to the training-set size; a data-scaled initial kernel and noise),
train it by minibatch stochastic optimisation of the ELBO and expose it in the user's units
as ``model_``.

``method="svgp"`` uses :class:`gp.SVGP` (whitened ``q(u)``, natural gradients for ``q(u)`` and
Adam for the rest; every likelihood); ``method="swsgp"`` uses :class:`gp.sparse.swsgp.SWSGP`
(each input attends to its ``num_neighbors`` nearest inducing points, so ``num_inducing`` can
be tens of thousands; Gaussian and Bernoulli likelihoods).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import torch
from gpytorch.kernels import Kernel, RBFKernel, ScaleKernel
from sklearn.base import ClassifierMixin, RegressorMixin
from torch import Tensor, nn

from bdl.core.estimator import (
    BayesianClassifierMixin,
    BayesianEstimator,
    BayesianRegressorMixin,
)
from bdl.core.training import seeded
from bdl.core.validation import check_choice, check_int, check_positive
from gp.sparse.classification import ClassProbabilities
from gp.sparse.initialisation import select_inducing_points
from gp.sparse.svgp import SVGP
from gp.sparse.swsgp import SWSGP

__all__ = ["SparseGPClassifier", "SparseGPRegressor"]

METHODS = ("svgp", "swsgp")
#: with ``epochs=None`` training runs at least 2 epochs and at least this many steps
MIN_STEPS = 200
#: Adam learning rate of each method when ``lr=None`` (the models' own defaults)
DEFAULT_LR = {"svgp": 0.03, "swsgp": 0.05}
#: initial noise variance of SWSGP as a fraction of the (standardised) target variance
SWSGP_NOISE_FRACTION = 0.5
#: Monte Carlo draws of the latent GPs behind the softmax class probabilities
NUM_PROBA_SAMPLES = 256
#: ``init="auto"`` seeds up to this many inducing points by k-means++ and picks a random
#: subset beyond (k-means++ seeding costs O(n M) distance updates)
KMEANS_MAX_INDUCING = 1024
INITS = ("auto", "kmeans++", "random")


class _SparseGPBase(BayesianEstimator):
    """Shared parameters, model construction and training (not public)."""

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
        self._start_fit()  # device_ and dtype_ (ValueErrors naming them)

    def _epochs(self, n: int) -> int:
        if self.epochs is not None:
            return int(self.epochs)
        steps_per_epoch = math.ceil(n / min(self.batch_size, n))
        return max(2, math.ceil(MIN_STEPS / steps_per_epoch))

    def _fit_model(
        self, x: Tensor, t: Tensor, likelihood: str, num_classes: int | None
    ) -> nn.Module:
        """The model built on standardised inputs ``x`` (n, d) and targets ``t`` (n,) and
        trained; sets the fitted attributes shared by both estimators."""
        n = x.shape[0]
        seed = self._seed()
        self.num_inducing_ = min(int(self.num_inducing), n)
        kernel = None if self.kernel is None else copy.deepcopy(self.kernel)
        init = self.init
        if init == "auto":
            init = "kmeans++" if self.num_inducing_ <= KMEANS_MAX_INDUCING else "random"
        train = {
            "epochs": self._epochs(n),
            "lr": DEFAULT_LR[self.method] if self.lr is None else float(self.lr),
            "batch_size": self.batch_size,
            "seed": seed,
            "verbose": bool(self.verbose),
        }
        if self.method == "svgp":
            model = SVGP.from_data(
                x, t, self.num_inducing_, kernel=kernel, likelihood=likelihood,
                num_classes=num_classes, init=init, seed=seed,
            )  # fmt: skip
            start = time.perf_counter()
            model.fit((x, t), **train)
            self.train_time_ = time.perf_counter() - start
        else:
            model = self._fit_swsgp(x, t, likelihood, kernel, init, train)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.loss_curve_ = model.step_losses_
        self.n_iter_ = len(self.loss_curve_)
        return model

    def _fit_swsgp(
        self,
        x: Tensor,
        t: Tensor,
        likelihood: str,
        kernel: Kernel | None,
        init: str,
        train: dict[str, Any],
    ) -> SWSGP:
        """An :class:`SWSGP` initialised like :meth:`gp.SVGP.from_data` on standardised data
        (unit lengthscales and output scale), then trained; sets ``train_time_``."""
        seed = train["seed"]
        Z = select_inducing_points(x, self.num_inducing_, init, seed)
        if kernel is None:
            kernel = ScaleKernel(RBFKernel(ard_num_dims=x.shape[1]))
            kernel.base_kernel.lengthscale = 1.0  # the standardised inputs' scale
            kernel.outputscale = 1.0  # Var of the standardised targets / of a probit latent
        H = min(int(self.num_neighbors), self.num_inducing_)
        with seeded(seed, x.device):  # W's random start and the KL subsample in each step
            model = SWSGP(kernel, Z, num_neighbors=H, likelihood=likelihood)
            if likelihood == "gaussian":
                # A high start: with the unwhitened q(u) trained by Adam, a start close to the
                # truth (SVGP's nearest-neighbour estimate) lets the early steps fit noise.
                model.likelihood.noise = torch.tensor(SWSGP_NOISE_FRACTION, dtype=x.dtype)
            start = time.perf_counter()
            model.fit((x, t), **train)
            self.train_time_ = time.perf_counter() - start
        return model


class SparseGPRegressor(BayesianRegressorMixin, RegressorMixin, _SparseGPBase):
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
    model_ : bdl.core.TransformedModel
        The fitted model in the user's units; ``model_.model`` is the :class:`gp.SVGP` or
        :class:`gp.sparse.swsgp.SWSGP` on the standardised data.
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

    :meth:`sample_y` draws from the joint ``q(f)`` over the ``n`` points plus independent
    noise: O(n^2 M) time for SVGP; for SWSGP the joint of ``f(X)`` given ``q`` on the union
    ``U`` of the rows' neighbour sets (``O(|U|^3 + n^2 |U|)``, see
    :meth:`gp.sparse.swsgp.SWSGP.posterior`), whose mean and variances differ from the
    per-point marginals of :meth:`predict` in either direction (each point is conditioned on
    the union, not on its own H neighbours). O(n^2) memory: meant for moderate ``n``.
    """

    def fit(self, X: Any, y: Any) -> SparseGPRegressor:
        """Fit to inputs ``X`` (n, d) and targets ``y`` (n,); returns self."""
        self._check_params()
        X, y2 = self._validate_fit_data(X, y, multi_output=False)
        x, t = self._fit_inputs(X), self._fit_targets(y2)[:, 0]
        model = self._fit_model(x, t, "gaussian", None)
        noise = float(model.likelihood.noise.detach().reshape(()))
        self.noise_ = noise * float(self.outcome_transform_.scale[0]) ** 2
        self._set_model(model)
        return self


class SparseGPClassifier(BayesianClassifierMixin, ClassifierMixin, _SparseGPBase):
    """Sparse variational GP classification as a scikit-learn classifier.

    Two classes use a Bernoulli likelihood with the probit link (``P(y = 1) =
    Phi(m / sqrt(1 + v))`` exactly); more classes one latent GP per class with a softmax
    likelihood (``method="svgp"`` only; Monte Carlo predictive probabilities from
    :data:`NUM_PROBA_SAMPLES` seeded draws shared by all rows). Labels may be of any type
    scikit-learn accepts (``classes_`` holds them sorted).

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
    model_ : bdl.core.TransformedModel
        The fitted model; ``model_.model`` is a :class:`gp.sparse.ClassProbabilities` whose
        posterior is the :class:`~bdl.core.posterior.CategoricalPosterior` of the labels,
        around the latent GP (``model_.model.gp``).
    num_inducing_, loss_curve_, n_iter_, train_time_, device_, dtype_
        As for :class:`SparseGPRegressor`.
    """

    def fit(self, X: Any, y: Any) -> SparseGPClassifier:
        """Fit to inputs ``X`` (n, d) and class labels ``y`` (n,); returns self."""
        self._check_params()
        X, y_idx = self._validate_fit_data(X, y)
        C = len(self.classes_)
        if C > 2 and self.method == "swsgp":
            raise ValueError(
                f"method='swsgp' supports 2 classes (Bernoulli likelihood), y has {C} classes; "
                "use method='svgp' (softmax likelihood)"
            )
        x, t = self._fit_inputs(X), self._tensor(y_idx.astype(np.float64))
        if C == 2:
            model = self._fit_model(x, t, "bernoulli", None)
        else:
            model = self._fit_model(x, t, "softmax", C)
        self._set_model(ClassProbabilities(model, num_samples=NUM_PROBA_SAMPLES, seed=0))
        return self

"""scikit-learn estimators over the sparse GP models: :class:`SparseGPRegressor` and
:class:`SparseGPClassifier`, thin shells over :class:`bdl.core.estimator.BayesianEstimator`.

Both standardise the inputs per column with training statistics (the regressor also the
targets), build the model from the data (``num_inducing`` inducing inputs chosen among the
training inputs, clamped to the training-set size; a data-scaled initial kernel and noise),
train it by minibatch stochastic optimisation of the ELBO and expose it in the user's units
as ``model_``. The classifier's defaults scale with the data: ``num_inducing=None`` takes
about ``n / 16`` inducing points (:func:`auto_num_inducing`), training runs at least
:data:`CLASSIFIER_MIN_STEPS` steps at learning rate :data:`CLASSIFIER_LR`, and the default
kernel starts at lengthscale ``sqrt(d)`` and an output scale set by the nearest-neighbour
error rate of the labels (:func:`classification_kernel`).

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
from gpytorch.constraints import Positive
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

__all__ = [
    "SparseGPClassifier",
    "SparseGPRegressor",
    "auto_num_inducing",
    "classification_kernel",
    "nearest_neighbour_error_rate",
]

METHODS = ("svgp", "swsgp")
#: with ``epochs=None`` the regressor trains at least 2 epochs and at least this many steps
MIN_STEPS = 200
#: the regressor's Adam learning rate of each method when ``lr=None`` (the models' own
#: defaults), except SVGP on data that fit in one batch (:data:`FULL_BATCH_LR`)
DEFAULT_LR = {"svgp": 0.03, "swsgp": 0.05}
#: the SVGP regressor's learning rate when ``lr=None`` and ``n <= batch_size``: exact
#: gradients take larger steps than minibatch estimates (whose noise grows with ``lr``)
FULL_BATCH_LR = 0.1
#: the regressor's inducing points when ``num_inducing=None`` (clamped to ``n``)
REGRESSOR_NUM_INDUCING = 256
#: the classifier's ``num_inducing=None``: ``n // INDUCING_DIVISOR`` clamped to
#: ``INDUCING_RANGE`` (and to ``n``)
INDUCING_DIVISOR = 16
INDUCING_RANGE = (32, 256)
#: with ``epochs=None`` the classifier trains at least 2 epochs and at least this many steps
#: (a fit of a few hundred rows is then within 10x scikit-learn's Laplace GPC)
CLASSIFIER_MIN_STEPS = 40
#: the classifier's Adam learning rate when ``lr=None`` (both methods)
CLASSIFIER_LR = 0.1
#: the classifier's default kernel starts its output scale at no less than this (labels no
#: more predictable from the nearest neighbour than chance: a nearly flat latent function)
MIN_CLASSIFIER_OUTPUTSCALE = 0.01
#: the nearest-neighbour error rate uses at most this many query points ...
NN_QUERIES = 2_000
#: ... searched among at most this many points
NN_MAX_POINTS = 50_000
#: initial noise variance of SWSGP as a fraction of the (standardised) target variance
SWSGP_NOISE_FRACTION = 0.5
#: Monte Carlo draws of the latent GPs behind the softmax class probabilities
NUM_PROBA_SAMPLES = 256
#: ``init="auto"`` seeds up to this many inducing points by k-means++ and picks a random
#: subset beyond (k-means++ seeding costs O(n M) distance updates)
KMEANS_MAX_INDUCING = 1024
INITS = ("auto", "kmeans++", "random")


def auto_num_inducing(n: int) -> int:
    """The classifier's inducing points for ``n`` training rows when ``num_inducing=None``.

    ``n // 16`` clamped to ``[32, 256]`` and to ``n``: a small problem trains in a fraction of
    a second (the per-step cost is then mostly fixed overhead), a large one keeps 256.

    Parameters
    ----------
    n : int
        Training-set size.

    Returns
    -------
    int
    """
    low, high = INDUCING_RANGE
    return min(n, max(low, min(high, n // INDUCING_DIVISOR)))


def nearest_neighbour_error_rate(x: Tensor, labels: Tensor, seed: int = 0) -> float:
    """Leave-one-out error rate of the 1-nearest-neighbour classifier, smoothed.

    For up to :data:`NN_QUERIES` rows (searched among up to :data:`NN_MAX_POINTS`), the label
    of the nearest other row predicts the row's label; with ``k`` mistakes in ``q`` queries
    the rate is ``(k + 1) / (q + 2)`` (Laplace's rule of succession, never 0 or 1). The
    1-NN error lies between the Bayes error and twice it, asymptotically (Cover and Hart
    1967), so it measures how predictable the labels are from nearby inputs.

    Parameters
    ----------
    x : Tensor, shape (n, d)
        Standardised inputs, ``n >= 2``.
    labels : Tensor, shape (n,)
        Class indices.
    seed : int, default 0
        Seed of the subsampling.

    Returns
    -------
    float
        In ``(0, 1)``.
    """
    from sklearn.neighbors import NearestNeighbors  # scikit-learn is loaded on first use

    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randperm(n, generator=gen)[:NN_MAX_POINTS]
    queries = pool[:NN_QUERIES]
    points = x.detach().cpu().to(torch.float64)
    y = labels.detach().cpu()
    index = NearestNeighbors(n_neighbors=2).fit(points[pool].numpy())
    _, nn = index.kneighbors(points[queries].numpy())
    # column 0 is the query itself, unless it has an exact duplicate: either is a nearest
    # other row at distance 0
    first = pool[torch.as_tensor(nn[:, 0])]
    neighbour = torch.where(first == queries, pool[torch.as_tensor(nn[:, 1])], first)
    mistakes = int((y[neighbour] != y[queries]).sum())
    return (mistakes + 1) / (len(queries) + 2)


def classification_kernel(
    x: Tensor, labels: Tensor, num_classes: int, seed: int = 0
) -> ScaleKernel:
    """The classifier's default kernel: an ARD RBF on standardised inputs, scaled by the data.

    - lengthscales ``sqrt(d)``: the squared distance of two standardised points is about
      ``2 d`` on average, so the initial correlation of typical pairs is about ``exp(-1)``
      whatever ``d``;
    - output scale ``s^2`` with ``s = cot(pi e)``, ``e`` the nearest-neighbour error rate
      (:func:`nearest_neighbour_error_rate`): for a latent ``f ~ N(0, s^2)`` under the probit
      link, ``E[Phi(-|f|)] = 1/2 - arctan(s) / pi = e``, so the prior's average
      probability of the less likely class matches how often a neighbour's label is wrong
      (the binary relation, used for the softmax likelihood too); at least
      :data:`MIN_CLASSIFIER_OUTPUTSCALE`;
    - both positive through ``exp`` (the optimiser steps their logarithms, so Adam's
      step of about ``lr`` per step is a relative change at any scale).

    Parameters
    ----------
    x : Tensor, shape (n, d)
        Standardised training inputs.
    labels : Tensor, shape (n,)
        Class indices.
    num_classes : int
        ``C``; more than 2 gives one kernel per class (batch shape ``(C,)``).
    seed : int, default 0
        Seed of the nearest-neighbour subsampling.

    Returns
    -------
    ScaleKernel
        In the default dtype (the model casts it).
    """
    d = x.shape[-1]
    latent = torch.Size([num_classes]) if num_classes > 2 else torch.Size()
    base = RBFKernel(ard_num_dims=d, batch_shape=latent, lengthscale_constraint=_log_positive())
    kernel = ScaleKernel(base, batch_shape=latent, outputscale_constraint=_log_positive())
    base.lengthscale = math.sqrt(d)
    if x.shape[0] > 1:
        error = nearest_neighbour_error_rate(x, labels, seed)
        outputscale = math.tan(math.pi * (0.5 - min(error, 0.5))) ** 2
    else:
        outputscale = 1.0
    kernel.outputscale = max(outputscale, MIN_CLASSIFIER_OUTPUTSCALE)
    return kernel


def _log_positive() -> Positive:
    """A positivity constraint through ``exp`` (the raw parameter is the logarithm)."""
    return Positive(transform=torch.exp, inv_transform=torch.log)


class _SparseGPBase(BayesianEstimator):
    """Shared parameters, model construction and training (not public)."""

    #: ``epochs=None`` trains at least this many steps (and at least 2 epochs)
    _min_steps = MIN_STEPS

    def __init__(
        self,
        method: str = "svgp",
        num_inducing: int | None = None,
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
        if self.num_inducing is not None:
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
        return max(2, math.ceil(self._min_steps / steps_per_epoch))

    def _default_num_inducing(self, n: int) -> int:
        """Inducing points for ``n`` rows when ``num_inducing=None``."""
        return min(REGRESSOR_NUM_INDUCING, n)

    def _default_lr(self, n: int) -> float:
        """Adam's learning rate for ``n`` rows when ``lr=None``."""
        if self.method == "svgp" and n <= self.batch_size:
            return FULL_BATCH_LR
        return DEFAULT_LR[self.method]

    def _default_kernel(self, x: Tensor, t: Tensor, seed: int) -> Kernel | None:
        """The kernel when ``kernel=None`` (None: the model's data-scaled default)."""
        return None

    def _fit_model(
        self, x: Tensor, t: Tensor, likelihood: str, num_classes: int | None
    ) -> nn.Module:
        """The model built on standardised inputs ``x`` (n, d) and targets ``t`` (n,) and
        trained; sets the fitted attributes shared by both estimators."""
        n = x.shape[0]
        seed = self._seed()
        if self.num_inducing is None:
            self.num_inducing_ = self._default_num_inducing(n)
        else:
            self.num_inducing_ = min(int(self.num_inducing), n)
        if self.kernel is None:
            kernel = self._default_kernel(x, t, seed)
        else:
            kernel = copy.deepcopy(self.kernel)
        init = self.init
        if init == "auto":
            init = "kmeans++" if self.num_inducing_ <= KMEANS_MAX_INDUCING else "random"
        self.lr_ = self._default_lr(n) if self.lr is None else float(self.lr)
        train = {
            "epochs": self._epochs(n),
            "lr": self.lr_,
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
    num_inducing : int or None, default None
        Inducing points ``M`` (chosen among the standardised inputs, see ``init``), clamped to
        the training-set size; None: :data:`REGRESSOR_NUM_INDUCING` (256). SWSGP affords many
        more (thousands to tens of thousands).
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
        Passes over the data; default: at least 2 epochs and at least :data:`MIN_STEPS` (200)
        optimisation steps.
    batch_size : int, default 1024
        Minibatch size (clamped to the training-set size).
    lr : float, optional
        Adam learning rate of the hyperparameters (and of ``q(u)`` for SWSGP); default for
        SVGP (whose ``q(u)`` takes natural-gradient steps of size 0.1) :data:`FULL_BATCH_LR`
        (0.1) when the data fit in one batch (``n <= batch_size``, exact gradients) and 0.03
        with minibatches; 0.05 for SWSGP.
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
        Inducing points used (``num_inducing``, or its default, clamped to ``n``).
    noise_ : float
        Fitted noise variance in original target units.
    lr_ : float
        Adam learning rate used.
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

    The defaults scale with the data, so that a few hundred rows train in a fraction of a
    second and large data sets keep enough inducing points (see Notes).

    Parameters
    ----------
    method : {"svgp", "swsgp"}, default "svgp"
        ``"swsgp"`` supports two classes only.
    num_inducing : int or None, default None
        Inducing points ``M``, clamped to the training-set size; None:
        :func:`auto_num_inducing`, ``n // 16`` within ``[32, 256]``.
    kernel : gpytorch.kernels.Kernel, optional
        Prior covariance of each latent GP on the *standardised* inputs (initial
        hyperparameters; for more than two classes give it ``batch_shape=(C,)`` for one
        kernel per class); deep-copied in ``fit``. Default :func:`classification_kernel`.
    epochs : int, optional
        Passes over the data; default: at least 2 epochs and at least
        :data:`CLASSIFIER_MIN_STEPS` (40) optimisation steps.
    lr : float, optional
        Adam learning rate of the hyperparameters (and of ``q(u)`` for SWSGP); default
        :data:`CLASSIFIER_LR` (0.1) for both methods.
    num_neighbors, init, batch_size, device, dtype, random_state
        As for :class:`SparseGPRegressor`.
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
    num_inducing_, lr_, loss_curve_, n_iter_, train_time_, device_, dtype_
        As for :class:`SparseGPRegressor`.

    Notes
    -----
    Default kernel (:func:`classification_kernel`): an ARD RBF kernel with lengthscales
    ``sqrt(d)`` on the standardised inputs and the output scale ``cot(pi e)^2``, ``e`` the
    smoothed leave-one-out error rate of the 1-nearest-neighbour classifier
    (:func:`nearest_neighbour_error_rate`): a latent scale under which the probit prior is
    about as often unsure as a neighbour's label is wrong (``e = 0.02`` gives about 250,
    ``e = 0.05`` about 40, ``e = 0.35`` about 0.26). Lengthscales and output scale are
    optimised in log space.
    """

    _min_steps = CLASSIFIER_MIN_STEPS

    def _default_num_inducing(self, n: int) -> int:
        return auto_num_inducing(n)

    def _default_lr(self, n: int) -> float:
        return CLASSIFIER_LR

    def _default_kernel(self, x: Tensor, t: Tensor, seed: int) -> Kernel:
        return classification_kernel(x, t, len(self.classes_), seed)

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

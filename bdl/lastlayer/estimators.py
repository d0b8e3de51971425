"""scikit-learn estimators over the VBLL heads: an MLP feature extractor plus a Bayesian head.

Both estimators standardise inputs (and regression targets) with training statistics, train
the network and the head jointly on the per-datum ELBO, then refine the head on the frozen
features (closed form for regression, a covariance fixed point for classification). The
fitted model ``model_`` is a :class:`~bdl.lastlayer.network.VBLLNetwork` behind the
transforms, in the user's units.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
from sklearn.base import ClassifierMixin, RegressorMixin
from torch import Tensor, nn

from bdl.core.estimator import BayesianClassifierMixin, BayesianEstimator, BayesianRegressorMixin
from bdl.core.model import Model
from bdl.core.training import minimize_lbfgs, seeded, seeded_generator
from bdl.core.validation import check_choice, check_int, check_positive, check_sizes
from bdl.lastlayer._fit import train_head
from bdl.lastlayer.classification import VBLLClassification
from bdl.lastlayer.generative import GenerativeVBLLClassification
from bdl.lastlayer.heteroscedastic import HeteroscedasticVBLLRegression
from bdl.lastlayer.network import VBLLNetwork, heldout_noise_variance, train_network
from bdl.lastlayer.regression import VBLLRegression
from bdl.nets import make_mlp

__all__ = ["VBLLClassifier", "VBLLRegressor", "heldout_noise_variance"]

COVARIANCES = ("dense", "diagonal", "lowrank")


def validation_split(
    n: int, fraction: float, labels: np.ndarray | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train / validation indices (stratified when labels are given; none if too small)."""
    n_val = int(round(fraction * n))
    if labels is not None and n_val < len(np.unique(labels)):
        n_val = 0
    if n_val < 2 or n - n_val < 2:
        return np.arange(n), np.arange(0)
    rng = np.random.RandomState(seed)
    if labels is None:
        perm = rng.permutation(n)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    from sklearn.model_selection import train_test_split

    try:
        tr, va = train_test_split(np.arange(n), test_size=n_val, random_state=rng, stratify=labels)
    except ValueError:  # a class too small to stratify
        tr, va = train_test_split(np.arange(n), test_size=n_val, random_state=rng)
    return np.sort(tr), np.sort(va)


class _VBLLEstimator(BayesianEstimator):
    """Parameter checks, network construction and joint training shared by both estimators."""

    def _check_common_params(self) -> None:
        self.hidden_sizes_ = check_sizes("hidden_sizes", self.hidden_sizes)
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size)
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("prior_scale", self.prior_scale)
        check_int("n_iter_no_change", self.n_iter_no_change)
        check_choice("covariance", self.covariance, COVARIANCES)
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must lie in [0, 1), got {self.validation_fraction}"
            )

    def _network(self, d: int, make_head: Callable[[int], nn.Module], seed: int) -> VBLLNetwork:
        """The MLP body and head, initialised from ``seed`` (the global RNG is left alone)."""
        with seeded(seed):
            body = make_mlp(d, self.hidden_sizes_)
            head = make_head(self.hidden_sizes_[-1] if self.hidden_sizes_ else d)
            return VBLLNetwork(body, head).to(device=self.device_, dtype=self.dtype_)

    def _train(
        self,
        net: VBLLNetwork,
        x: Tensor,
        y: Tensor,
        split: tuple[np.ndarray, np.ndarray],
        generator: torch.Generator,
        score: Callable[[VBLLNetwork, Tensor, Tensor, Tensor, Tensor], float],
    ) -> None:
        """Joint training on the training split; early stopping on the validation split."""
        tr, va = split
        x_tr, y_tr, x_va, y_va = x[tr], y[tr], x[va], y[va]
        validation = None if len(va) == 0 else (lambda m: score(m, x_tr, y_tr, x_va, y_va))
        self.loss_curve_, stopper = train_network(
            net, x_tr, y_tr, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
            weight_decay=self.weight_decay, generator=generator, validation=validation,
            patience=self.n_iter_no_change, verbose=self.verbose,
        )  # fmt: skip
        self.validation_scores_ = [] if stopper is None else stopper.scores
        self.n_epochs_ = len(self.loss_curve_)

    def _set_model(self, model: Model, **kwargs) -> None:
        super()._set_model(model, **kwargs)
        self.model_.eval()


class VBLLRegressor(BayesianRegressorMixin, RegressorMixin, _VBLLEstimator):
    """MLP with a variational Bayesian last layer, as a scikit-learn regressor.

    Parameters
    ----------
    hidden_sizes : sequence of int
        Hidden widths of the ReLU feature extractor (empty: Bayesian linear regression on the
        standardised inputs).
    covariance : {"dense", "diagonal", "lowrank"}
        Posterior covariance family of the last layer.
    rank : int
        Rank for ``covariance="lowrank"``.
    heteroscedastic : bool
        Learn input-dependent noise with a second Bayesian layer.
    prior_scale : float
        Last-layer prior variance times the feature width.
    epochs, batch_size, lr, weight_decay
        Joint training: Adam on the per-datum ELBO, weight decay on the extractor only.
    head_epochs : int
        Unused for the homoscedastic head, whose final fit on the frozen features is closed
        form (Bayesian linear regression with evidence-optimal noise and prior); epochs of
        head-only training for ``heteroscedastic=True``.
    head_lr : float
        Learning rate of that head-only phase.
    early_stopping : bool
        Hold out ``validation_fraction`` of the training data, keep the epoch with the best
        validation NLL and stop after ``n_iter_no_change`` epochs without improvement. The
        head is then refitted on all the data. Skipped when the split would be too small.
    validation_fraction : float
        Share of the training data held out for early stopping.
    n_iter_no_change : int
        Patience of early stopping, in epochs.
    device : str, torch.device or None, default None
        Torch device to train on (None: the CPU; an unavailable one is a ValueError).
    random_state : int, RandomState or None
        Seed of the initialisation and minibatch order.
    verbose : bool
        Show a progress bar.
    """

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (128, 128),
        covariance: str = "dense",
        rank: int = 4,
        heteroscedastic: bool = False,
        prior_scale: float = 1.0,
        epochs: int = 30,
        batch_size: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        head_epochs: int = 50,
        head_lr: float = 1e-2,
        early_stopping: bool = True,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        device: str | torch.device | None = None,
        random_state: int | np.random.RandomState | None = None,
        verbose: bool = False,
    ) -> None:
        self.hidden_sizes = hidden_sizes
        self.covariance = covariance
        self.rank = rank
        self.heteroscedastic = heteroscedastic
        self.prior_scale = prior_scale
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.head_epochs = head_epochs
        self.head_lr = head_lr
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def fit(self, X, y) -> VBLLRegressor:
        """Fit on ``X`` (n, d) and targets ``y`` (n,) or (n, m); returns self."""
        self._check_common_params()
        check_int("head_epochs", self.head_epochs, minimum=0)
        check_positive("head_lr", self.head_lr)
        self._start_fit()
        X, y2 = self._validate_fit_data(X, y)
        x, y_t = self._fit_inputs(X), self._fit_targets(y2)
        n, m = y_t.shape
        seed = self._seed()
        head_cls = HeteroscedasticVBLLRegression if self.heteroscedastic else VBLLRegression
        net = self._network(
            X.shape[1],
            lambda width: head_cls(
                width,
                m,
                num_data=n,
                covariance=self.covariance,
                rank=self.rank,
                prior_scale=self.prior_scale,
            ),  # fmt: skip
            seed,
        )
        head = net.head
        generator = seeded_generator(seed)
        tr, va = np.arange(n), np.arange(0)
        self.loss_curve_, self.validation_scores_, self.n_epochs_ = [], [], 0
        if self.hidden_sizes_:
            if self.early_stopping:
                tr, va = validation_split(n, self.validation_fraction, None, seed)
            self._train(net, x, y_t, (tr, va), generator, self._validation_nll)
        with torch.no_grad():
            phi = net.body(x)
        if self.heteroscedastic:
            if self.head_epochs > 0:
                train_head(
                    head, phi, y_t, epochs=self.head_epochs, lr=self.head_lr,
                    batch_size=self.batch_size, generator=generator, verbose=self.verbose,
                    desc="head",
                )  # fmt: skip
        elif len(va) > 0:
            # Training residuals of learned features understate the noise (the features were
            # fitted to those very points): estimate the noise on the held-out split, then
            # refit the Bayesian head on all the data at that noise.
            head.fit_closed_form(phi[tr], y_t[tr], learn_noise=True, learn_prior=True)
            latent = head.posterior(phi[va])
            noise = heldout_noise_variance(latent.mean, latent.variance, y_t[va])
            with torch.no_grad():
                head.log_noise_std.copy_(0.5 * noise.log())
            head.fit_closed_form(phi, y_t, learn_noise=False, learn_prior=True)
        else:
            head.fit_closed_form(phi, y_t, learn_noise=True, learn_prior=True)
        self._set_model(net)
        return self

    @staticmethod
    @torch.no_grad()
    def _validation_nll(
        net: VBLLNetwork, x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor
    ) -> float:
        """Validation NLL of the head refitted in closed form on the current training features."""
        head = copy.deepcopy(net.head)
        if isinstance(head, VBLLRegression):
            head.fit_closed_form(net.body(x), y, learn_noise=True, learn_prior=True)
        post = head.posterior(net.body(x_val), observation_noise=True)
        return float(-post.log_prob(y_val).mean())

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags


class VBLLClassifier(BayesianClassifierMixin, ClassifierMixin, _VBLLEstimator):
    """MLP with a variational Bayesian last layer, as a scikit-learn classifier.

    Parameters
    ----------
    hidden_sizes : sequence of int
        Hidden widths of the ReLU feature extractor (empty: Bayesian multinomial regression
        on the standardised inputs, fitted by full-batch L-BFGS).
    head : {"discriminative", "generative"}
        D-VBLL (Gaussian logits, Jensen bound) or G-VBLL (Gaussian class conditionals).
    covariance : {"dense", "diagonal", "lowrank"}
        Covariance family of the discriminative head (the generative head is diagonal).
    rank : int
        Rank for ``covariance="lowrank"``.
    prior_scale : float
        Last-layer prior variance times the feature width.
    epochs, batch_size, lr, weight_decay
        Joint training: Adam on the per-datum ELBO, weight decay on the extractor only.
    learn_prior : bool
        Learn the discriminative head's prior variance (empirical Bayes).
    early_stopping : bool
        Hold out ``validation_fraction`` of the training data, keep the epoch with the best
        validation NLL and stop after ``n_iter_no_change`` epochs without improvement. The
        head is then refitted on all the data. Skipped when the split would be too small.
    validation_fraction : float
        Share of the training data held out for early stopping.
    n_iter_no_change : int
        Patience of early stopping, in epochs.
    device : str, torch.device or None, default None
        Torch device to train on (None: the CPU; an unavailable one is a ValueError).
    random_state : int, RandomState or None
        Seed of the initialisation and minibatch order.
    verbose : bool
        Show a progress bar.
    """

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (128, 128),
        head: str = "discriminative",
        covariance: str = "dense",
        rank: int = 4,
        prior_scale: float = 30.0,
        epochs: int = 40,
        batch_size: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        learn_prior: bool = False,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        device: str | torch.device | None = None,
        random_state: int | np.random.RandomState | None = None,
        verbose: bool = False,
    ) -> None:
        self.hidden_sizes = hidden_sizes
        self.head = head
        self.covariance = covariance
        self.rank = rank
        self.prior_scale = prior_scale
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.learn_prior = learn_prior
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def _make_head(self, width: int, n: int, y: Tensor, num_classes: int) -> nn.Module:
        if self.head == "generative":
            head = GenerativeVBLLClassification(
                width, num_classes, num_data=n, prior_scale=self.prior_scale
            )
            head.set_class_prior(torch.bincount(y, minlength=num_classes).float())
            return head
        return VBLLClassification(
            width, num_classes, num_data=n, covariance=self.covariance, rank=self.rank,
            prior_scale=self.prior_scale, learn_prior=self.learn_prior,
        )  # fmt: skip

    def fit(self, X, y) -> VBLLClassifier:
        """Fit on ``X`` (n, d) and class labels ``y`` (n,) of any hashable type; returns self."""
        self._check_common_params()
        check_choice("head", self.head, ("discriminative", "generative"))
        self._start_fit()
        X, y_idx = self._validate_fit_data(X, y)
        x = self._fit_inputs(X)
        y_t = torch.as_tensor(y_idx, dtype=torch.long, device=self.device_)
        n, num_classes = len(y_idx), len(self.classes_)
        seed = self._seed()
        net = self._network(
            X.shape[1], lambda width: self._make_head(width, n, y_t, num_classes), seed
        )
        head = net.head
        if self.hidden_sizes_:
            split = (np.arange(n), np.arange(0))
            if self.early_stopping:
                split = validation_split(n, self.validation_fraction, y_idx, seed)
            self._train(net, x, y_t, split, seeded_generator(seed), self._validation_nll)
        else:
            # Bayesian multinomial regression on the standardised inputs: a smooth, small
            # problem, solved to convergence by full-batch L-BFGS from zero means
            self.loss_curve_, self.validation_scores_, self.n_epochs_ = [], [], 0
            means = head.class_means.mean if self.head == "generative" else head.weights.mean
            with torch.no_grad():
                means.zero_()
            with torch.enable_grad():
                minimize_lbfgs(
                    lambda: head.loss(x, y_t), list(head.parameters()), max_iter=500,
                    tolerance_grad=1e-9, tolerance_change=1e-9,
                )  # fmt: skip
        if isinstance(head, VBLLClassification):
            # the covariance's exact optimum given the trained means (a fixed point; cheap)
            with torch.no_grad():
                head.fit_covariance(net.body(x))
        self._set_model(net)
        return self

    @staticmethod
    @torch.no_grad()
    def _validation_nll(
        net: VBLLNetwork, x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor
    ) -> float:
        """Validation NLL of the current predictive."""
        return float(-net.head.posterior(net.body(x_val)).log_prob(y_val).mean())

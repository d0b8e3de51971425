"""scikit-learn estimators over the VBLL heads: an MLP feature extractor plus a Bayesian head.

Both estimators standardise inputs (and regression targets) with training statistics, train
the network and the head jointly on the per-datum ELBO, then refine the head on the frozen
features (closed form for regression, a short head-only optimisation for classification),
and undo the standardisation on output.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor, nn

from bdl.core.training import shuffled_batches, train_epochs
from bdl.core.validation import check_choice, check_int, check_positive
from bdl.lastlayer import (
    GenerativeVBLLClassification,
    HeteroscedasticVBLLRegression,
    VBLLClassification,
    VBLLRegression,
)
from bdl.nets import make_mlp
from bdl.core.posterior import CategoricalPosterior, GaussianPosterior

__all__ = ["VBLLRegressor", "VBLLClassifier"]


class _Standardizer:
    """Column means and scales from training data (constant columns keep scale 1)."""

    def __init__(self, values: np.ndarray) -> None:
        self.mean = values.mean(0)
        scale = values.std(0)
        self.scale = np.where(scale > 1e-12 * np.maximum(1.0, np.abs(self.mean)), scale, 1.0)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / self.scale


@torch.no_grad()
def heldout_noise_variance(mean: Tensor, latent_variance: Tensor, y: Tensor) -> Tensor:
    """Noise variance maximising the held-out Gaussian log-likelihood, per output.

    Maximises ``sum_i log N(y_i | mean_i, latent_variance_i + s)`` over ``s`` by a log-spaced
    grid search refined by golden-section steps (the objective is one-dimensional and smooth).

    Parameters
    ----------
    mean, latent_variance, y : Tensor, shape (n, m)

    Returns
    -------
    Tensor, shape (m,)
    """
    mean, latent_variance, y = mean.double(), latent_variance.double(), y.double()
    sq = (y - mean).pow(2)

    def objective(log_s: Tensor) -> Tensor:  # log_s (g, m) -> (g, m) mean log-lik
        var = latent_variance.unsqueeze(0) + log_s.exp().unsqueeze(1)
        return -(var.log() + sq.unsqueeze(0) / var).mean(1)

    scale = sq.mean(0).clamp_min(1e-12).log()
    grid = scale + torch.linspace(
        -12.0, 3.0, 121, dtype=torch.float64, device=mean.device
    ).unsqueeze(-1)
    best = grid.gather(0, objective(grid).argmax(0, keepdim=True))[0]
    lo, hi = best - 0.125, best + 0.125
    ratio = (5**0.5 - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        left_better = objective(torch.stack([a, b]))
        take_left = left_better[0] > left_better[1]
        hi = torch.where(take_left, b, hi)
        lo = torch.where(take_left, lo, a)
    return (0.5 * (lo + hi)).exp().to(mean.dtype)


class _VBLLNet(nn.Module):
    """Feature extractor followed by a VBLL head."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class _VBLLEstimator(BaseEstimator):
    """Shared fitting machinery (not public)."""

    def _check_common_params(self) -> None:
        sizes = () if self.hidden_sizes is None else tuple(self.hidden_sizes)
        for i, h in enumerate(sizes):
            check_int(f"hidden_sizes[{i}]", h)
        self.hidden_sizes_ = sizes
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size)
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("prior_scale", self.prior_scale)
        check_int("n_iter_no_change", self.n_iter_no_change)
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must lie in [0, 1), got {self.validation_fraction}"
            )

    def _device(self) -> torch.device:
        return torch.device(self.device)

    def _tensor(self, values: np.ndarray) -> Tensor:
        return torch.as_tensor(values, dtype=torch.float32, device=self._device())

    def _seed(self) -> int:
        if isinstance(self.random_state, numbers.Integral):
            return int(self.random_state)
        return int(check_random_state(self.random_state).randint(0, 2**31 - 1))

    def _split(self, n: int, y_idx: np.ndarray | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Train / validation indices for early stopping (stratified when labels are given)."""
        n_val = int(round(self.validation_fraction * n)) if self.early_stopping else 0
        if y_idx is not None and n_val < len(np.unique(y_idx)):
            n_val = 0
        if n_val < 2 or n - n_val < 2:
            return np.arange(n), np.arange(0)
        rng = np.random.RandomState(seed)
        if y_idx is None:
            perm = rng.permutation(n)
            return np.sort(perm[n_val:]), np.sort(perm[:n_val])
        from sklearn.model_selection import train_test_split

        try:
            tr, va = train_test_split(
                np.arange(n), test_size=n_val, random_state=rng, stratify=y_idx
            )
        except ValueError:  # a class too small to stratify
            tr, va = train_test_split(np.arange(n), test_size=n_val, random_state=rng)
        return np.sort(tr), np.sort(va)

    def _train(
        self,
        net: _VBLLNet,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator,
        x_val: Tensor | None = None,
        y_val: Tensor | None = None,
    ) -> None:
        """Joint Adam training of body and head on the head's per-datum loss.

        With validation data, the state with the best validation NLL (checked every epoch)
        is kept, and training stops after ``n_iter_no_change`` epochs without improvement.
        """
        head = net.head
        groups = [
            {"params": list(net.body.parameters()), "weight_decay": self.weight_decay},
            {"params": list(head.parameters()), "weight_decay": 0.0},
        ]
        opt = torch.optim.Adam([g for g in groups if g["params"]], lr=self.lr)
        n = x.shape[0]
        batch = min(self.batch_size, n)
        use_val = x_val is not None and x_val.shape[0] > 0
        best = {"score": float("inf"), "state": None, "since": 0}
        self.validation_scores_ = []

        def batches():
            return ((x[i], y[i]) for i in shuffled_batches(n, batch, generator, x.device))

        def end_of_epoch(epoch: int) -> bool:
            if not use_val:
                return False
            net.eval()
            score = self._validation_nll(net, x, y, x_val, y_val)
            net.train()
            self.validation_scores_.append(score)
            if score < best["score"]:
                state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                best.update(score=score, state=state, since=0)
            else:
                best["since"] += 1
            return best["since"] >= self.n_iter_no_change

        net.train()
        self.loss_curve_ = train_epochs(
            opt, batches, lambda xb, yb: head.loss(net.body(xb), yb), self.epochs,
            verbose=self.verbose, end_of_epoch=end_of_epoch,
        )  # fmt: skip
        if best["state"] is not None:
            net.load_state_dict(best["state"])
        self.n_epochs_ = len(self.loss_curve_)
        net.eval()

    @torch.no_grad()
    def _features(self, X: np.ndarray) -> Tensor:
        x = self._tensor(self.x_scaler_(X))
        return self.model_.body(x)


class VBLLRegressor(RegressorMixin, _VBLLEstimator):
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
    device : str
        Torch device to train on.
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
        device: str = "cpu",
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
        check_choice("covariance", self.covariance, ("dense", "diagonal", "lowrank"))
        y_array = np.asarray(y)
        if y_array.dtype.kind in "USaV":
            raise ValueError(f"y must be numeric for regression, got dtype {y_array.dtype}")
        X, y = validate_data(self, X, y, y_numeric=True, multi_output=True, dtype=np.float64)
        if X.shape[0] < 2:
            raise ValueError(f"X must have at least 2 samples to fit, got n_samples = {X.shape[0]}")
        self._y_1d = y.ndim == 1
        y2 = y.reshape(len(y), -1)
        self.x_scaler_, self.y_scaler_ = _Standardizer(X), _Standardizer(y2)
        x_t, y_t = self._tensor(self.x_scaler_(X)), self._tensor(self.y_scaler_(y2))
        n, m = y_t.shape
        seed = self._seed()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            body = make_mlp(X.shape[1], self.hidden_sizes_)
            width = self.hidden_sizes_[-1] if self.hidden_sizes_ else X.shape[1]
            if self.heteroscedastic:
                head = HeteroscedasticVBLLRegression(
                    width, m, num_data=n, covariance=self.covariance, rank=self.rank,
                    prior_scale=self.prior_scale,
                )  # fmt: skip
            else:
                head = VBLLRegression(
                    width, m, num_data=n, covariance=self.covariance, rank=self.rank,
                    prior_scale=self.prior_scale,
                )  # fmt: skip
            self.model_ = _VBLLNet(body, head).to(self._device())
        generator = torch.Generator().manual_seed(seed)
        tr, va = np.arange(n), np.arange(0)
        self.validation_scores_, self.n_epochs_ = [], 0  # closed form only, no training
        if self.hidden_sizes_:
            tr, va = self._split(n, None, seed)
            self._train(self.model_, x_t[tr], y_t[tr], generator, x_t[va], y_t[va])
        with torch.no_grad():
            phi = self.model_.body(x_t)
        if self.heteroscedastic:
            self._refine_head(head, phi, y_t, generator)
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
        self.model_.eval()
        return self

    def _refine_head(
        self, head: nn.Module, phi: Tensor, y: Tensor, generator: torch.Generator
    ) -> None:
        """Head-only optimisation on frozen, cached features (cheap: no body passes)."""
        if self.head_epochs == 0:
            return
        opt = torch.optim.Adam(head.parameters(), lr=self.head_lr)
        n, batch = phi.shape[0], min(self.batch_size, phi.shape[0])
        head.train()
        train_epochs(
            opt,
            lambda: ((phi[i], y[i]) for i in shuffled_batches(n, batch, generator, phi.device)),
            head.loss,
            self.head_epochs,
            desc="head",
            verbose=self.verbose,
        )
        head.eval()

    @torch.no_grad()
    def _validation_nll(
        self, net: _VBLLNet, x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor
    ) -> float:
        """Validation NLL of the head refitted in closed form on the current training features."""
        head = copy.deepcopy(net.head)
        if isinstance(head, VBLLRegression):
            head.fit_closed_form(net.body(x), y, learn_noise=True, learn_prior=True)
        post = head.posterior(net.body(x_val), observation_noise=True)
        return float(-post.log_prob(y_val).mean())

    def posterior(self, X, observation_noise: bool = False) -> GaussianPosterior:
        """Predictive at ``X`` (n, d) in the original target units; mean shape (n, m).

        Latent function unless ``observation_noise=True`` (BoTorch convention).
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        phi = self._features(X)
        with torch.no_grad():
            post = self.model_.head.posterior(phi, observation_noise=observation_noise)
        scale = torch.as_tensor(self.y_scaler_.scale, dtype=post.dtype, device=post.device)
        shift = torch.as_tensor(self.y_scaler_.mean, dtype=post.dtype, device=post.device)
        return GaussianPosterior(post.mean * scale + shift, variance=post.variance * scale**2)

    def predict(self, X, return_std: bool = False):
        """Predictive mean (n,) or (n, m); with ``return_std`` also the predictive standard
        deviation including observation noise."""
        post = self.posterior(X, observation_noise=True)
        mean = post.mean.cpu().numpy().astype(np.float64)
        std = post.stddev.cpu().numpy().astype(np.float64)
        if self._y_1d:
            mean, std = mean[:, 0], std[:, 0]
        return (mean, std) if return_std else mean

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.non_deterministic = self.random_state is None
        return tags


class VBLLClassifier(ClassifierMixin, _VBLLEstimator):
    """MLP with a variational Bayesian last layer, as a scikit-learn classifier.

    Parameters
    ----------
    hidden_sizes : sequence of int
        Hidden widths of the ReLU feature extractor.
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
    early_stopping : bool
        Hold out ``validation_fraction`` of the training data, keep the epoch with the best
        validation NLL and stop after ``n_iter_no_change`` epochs without improvement. The
        head is then refitted on all the data. Skipped when the split would be too small.
    validation_fraction : float
        Share of the training data held out for early stopping.
    n_iter_no_change : int
        Patience of early stopping, in epochs.
    device : str
        Torch device to train on.
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
        device: str = "cpu",
        random_state: int | np.random.RandomState | None = None,
        verbose: bool = False,
    ) -> None:
        self.learn_prior = learn_prior
        self.hidden_sizes = hidden_sizes
        self.head = head
        self.covariance = covariance
        self.rank = rank
        self.prior_scale = prior_scale
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def fit(self, X, y) -> VBLLClassifier:
        """Fit on ``X`` (n, d) and class labels ``y`` (n,) of any hashable type; returns self."""
        self._check_common_params()
        check_choice("head", self.head, ("discriminative", "generative"))
        check_choice("covariance", self.covariance, ("dense", "diagonal", "lowrank"))
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"y must contain at least 2 classes, got 1 class: {self.classes_.tolist()}"
            )
        self.x_scaler_ = _Standardizer(X)
        x_t = self._tensor(self.x_scaler_(X))
        y_t = torch.as_tensor(y_idx, dtype=torch.long, device=self._device())
        n, num_classes = len(y_idx), len(self.classes_)
        seed = self._seed()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            body = make_mlp(X.shape[1], self.hidden_sizes_)
            width = self.hidden_sizes_[-1] if self.hidden_sizes_ else X.shape[1]
            if self.head == "generative":
                head = GenerativeVBLLClassification(
                    width, num_classes, num_data=n, prior_scale=self.prior_scale
                )
                head.set_class_prior(torch.bincount(y_t, minlength=num_classes).float())
            else:
                head = VBLLClassification(
                    width, num_classes, num_data=n, covariance=self.covariance,
                    rank=self.rank, prior_scale=self.prior_scale, learn_prior=self.learn_prior,
                )  # fmt: skip
            self.model_ = _VBLLNet(body, head).to(self._device())
        generator = torch.Generator().manual_seed(seed)
        if self.hidden_sizes_:
            tr, va = self._split(n, y_idx, seed)
            self._train(self.model_, x_t[tr], y_t[tr], generator, x_t[va], y_t[va])
        else:
            # Bayesian multinomial regression on the standardised inputs: a smooth, small
            # problem, solved to convergence by full-batch L-BFGS from zero means
            self.validation_scores_, self.n_epochs_ = [], 0
            means = head.class_means.mean if self.head == "generative" else head.weights.mean
            with torch.no_grad():
                means.zero_()
            opt = torch.optim.LBFGS(
                head.parameters(), max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
            )

            def closure() -> Tensor:
                opt.zero_grad()
                loss = head.loss(x_t, y_t)
                loss.backward()
                return loss

            opt.step(closure)
        with torch.no_grad():
            phi = self.model_.body(x_t)
        if isinstance(head, VBLLClassification):
            # the covariance's exact optimum given the trained means (a fixed point; cheap)
            head.fit_covariance(phi)
        self.model_.eval()
        return self

    @torch.no_grad()
    def _validation_nll(
        self, net: _VBLLNet, x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor
    ) -> float:
        """Validation NLL of the current predictive."""
        return float(-net.head.posterior(net.body(x_val)).log_prob(y_val).mean())

    def posterior(self, X) -> CategoricalPosterior:
        """Predictive class probabilities at ``X`` (n, d); probs shape (n, C)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        phi = self._features(X)
        with torch.no_grad():
            return self.model_.head.posterior(phi)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n, C), columns ordered as ``classes_``."""
        probs = self.posterior(X).probs.cpu().numpy().astype(np.float64)
        return probs / probs.sum(1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        """Most probable class label for each row of ``X``."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.random_state is None
        return tags

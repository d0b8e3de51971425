"""scikit-learn estimators that train a sparse Bayesian MLP by sparse subspace VI.

``fit`` standardises the inputs (and the regressor's targets), builds a ReLU MLP, makes every
linear layer sparse mean-field Bayesian at ``density`` (:func:`bdl.ssvi.sparsify`) and trains
it with :class:`bdl.ssvi.SSVI` for ``max(epochs, MIN_STEPS steps)``. ``model_`` is the
:class:`~bdl.ssvi.SSVINetwork` behind the transforms: class probabilities averaged over
``num_samples`` weight draws, or for the regressor the draws' mixture with the learned noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import ClassifierMixin, RegressorMixin
from torch import nn

from bdl.core.estimator import BayesianClassifierMixin, BayesianEstimator, BayesianRegressorMixin
from bdl.core.validation import check_int, check_positive, check_sizes
from bdl.nets import make_mlp
from bdl.ssvi.network import SSVINetwork, sparsify
from bdl.ssvi.trainer import SSVI

__all__ = ["SSVIClassifier", "SSVIRegressor"]

#: ``epochs=None`` trains for this many passes, and at least :data:`MIN_STEPS` steps
DEFAULT_EPOCHS = 40
MIN_STEPS = 500

_PARAMS_DOC = """
    hidden_sizes : sequence of int, default (128, 128)
        Hidden widths of the ReLU MLP.
    density : float, default 0.1
        Fraction of active weights in every layer.
    epochs : int or None
        Passes over the data; default :data:`DEFAULT_EPOCHS` and at least :data:`MIN_STEPS`
        optimisation steps.
    lr : float, default 3e-3
        Adam learning rate.
    batch_size : int, default 64
    prior_std : float, default 1.0
        Standard deviation of the Gaussian prior on every weight (standardised inputs).
    kl_scale : float, default 1.0
        KL weight (1: the ELBO).
    update_every : int, default 25
        Steps between topology updates.
    alpha : float, default 0.3
        Initial removal fraction of the cosine schedule.
    criterion : str, default "snr_abs"
        Removal score (:data:`bdl.ssvi.CRITERIA`).
    num_samples : int, default 32
        Weight draws of the predictive.
    device : str, torch.device or None
    random_state : int, RandomState or None
    verbose : bool, default False
        Progress bar while training.
"""


class _SSVIEstimator(BayesianEstimator):
    def __init__(
        self,
        hidden_sizes: Sequence[int] = (128, 128),
        density: float = 0.1,
        epochs: int | None = None,
        lr: float = 3e-3,
        batch_size: int = 64,
        prior_std: float = 1.0,
        kl_scale: float = 1.0,
        update_every: int = 25,
        alpha: float = 0.3,
        criterion: str = "snr_abs",
        num_samples: int = 32,
        device: str | torch.device | None = None,
        random_state: int | np.random.RandomState | None = None,
        verbose: bool = False,
    ) -> None:
        self.hidden_sizes = hidden_sizes
        self.density = density
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.prior_std = prior_std
        self.kl_scale = kl_scale
        self.update_every = update_every
        self.alpha = alpha
        self.criterion = criterion
        self.num_samples = num_samples
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def _check_params(self) -> None:
        check_sizes("hidden_sizes", self.hidden_sizes)
        if not isinstance(self.density, float | int) or not 0 < self.density <= 1:
            raise ValueError(f"density must lie in (0, 1], got {self.density!r}")
        if self.epochs is not None:
            check_int("epochs", self.epochs)
        check_positive("lr", self.lr)
        check_int("batch_size", self.batch_size)
        check_positive("prior_std", self.prior_std)
        check_int("num_samples", self.num_samples)
        self._start_fit()

    def _epochs(self, n: int) -> int:
        if self.epochs is not None:
            return int(self.epochs)
        steps_per_epoch = math.ceil(n / min(self.batch_size, n))
        return max(DEFAULT_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch))

    def _train(self, x: torch.Tensor, t: torch.Tensor, out: int, task: str) -> SSVINetwork:
        seed = self._seed()
        body = make_mlp(x.shape[1], tuple(self.hidden_sizes))
        width = self.hidden_sizes[-1] if len(self.hidden_sizes) else x.shape[1]
        arch = nn.Sequential(*body, nn.Linear(width, out)).to(self.dtype_)
        net = sparsify(arch, float(self.density), task=task, prior_std=self.prior_std, seed=seed)
        net.num_samples = int(self.num_samples)
        net.to(device=self.device_, dtype=self.dtype_)
        trainer = SSVI(
            net, update_every=self.update_every, alpha=self.alpha, criterion=self.criterion,
            kl_scale=self.kl_scale,
        )  # fmt: skip
        trainer.fit(
            (x, t), epochs=self._epochs(x.shape[0]), lr=self.lr, batch_size=self.batch_size,
            seed=seed, verbose=self.verbose,
        )  # fmt: skip
        net.eval()
        self.loss_curve_ = list(net.history_)
        self.density_ = net.density
        self.topology_updates_ = trainer.updates_
        return net


class SSVIClassifier(BayesianClassifierMixin, ClassifierMixin, _SSVIEstimator):
    __doc__ = (
        "Sparse Bayesian MLP classifier trained by sparse subspace VI (module docstring).\n\n"
        "    Parameters\n    ----------" + _PARAMS_DOC
    )

    def fit(self, X: Any, y: Any) -> SSVIClassifier:
        """Fit to inputs ``X`` (n, d) and class labels ``y`` (n,); returns self."""
        self._check_params()
        X, y_idx = self._validate_fit_data(X, y)
        x = self._fit_inputs(X)
        labels = torch.as_tensor(y_idx, dtype=torch.long, device=self.device_)
        self._set_model(self._train(x, labels, len(self.classes_), "classification"))
        return self


class SSVIRegressor(BayesianRegressorMixin, RegressorMixin, _SSVIEstimator):
    __doc__ = (
        "Sparse Bayesian MLP regressor trained by sparse subspace VI, with a learned\n"
        "    homoscedastic noise (module docstring). ``posterior(X)`` is the mixture of weight\n"
        "    draws; ``observation_noise=True`` adds the noise variance.\n\n"
        "    Parameters\n    ----------" + _PARAMS_DOC
    )

    def fit(self, X: Any, y: Any) -> SSVIRegressor:
        """Fit to inputs ``X`` (n, d) and targets ``y`` (n,) or (n, m); returns self."""
        self._check_params()
        X, y2 = self._validate_fit_data(X, y, min_samples=1)
        x = self._fit_inputs(X)
        targets = self._fit_targets(y2)
        self._set_model(self._train(x, targets, y2.shape[1], "regression"))
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

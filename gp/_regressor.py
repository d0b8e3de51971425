"""The scikit-learn shell shared by :class:`gp.GPRegressor` and :class:`gp.StateSpaceGPRegressor`.

Both standardise the inputs (per column) and the targets with training statistics
(:class:`bdl.core.Normalize`, :class:`bdl.core.Standardize`), fit the kernel hyperparameters
and the noise by maximising the log marginal likelihood of the standardised data (the
model's ``fit``, :func:`gp.fit_hyperparameters`), compute in float64 on the chosen
``device`` and answer in the original units (``model_`` is the fitted model behind the
transforms). The GP prior mean is zero on the standardised targets (the training mean in
original units), as scikit-learn's ``normalize_y=True``.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from typing import Any

import numpy as np
import torch
from gpytorch.kernels import Kernel
from sklearn.base import RegressorMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn

from bdl.core.estimator import BayesianEstimator, BayesianRegressorMixin
from bdl.core.validation import check_choice, check_int, check_positive

__all__ = ["MarginalLikelihoodRegressor"]


class MarginalLikelihoodRegressor(BayesianRegressorMixin, RegressorMixin, BayesianEstimator):
    """Fit, log marginal likelihood and attributes of the GP regressors (not used directly).

    Subclasses define ``_default_kernel(n_features)`` and ``_build_model(kernel)``, and may
    restrict the inputs in ``_check_features``.
    """

    _default_dtype = torch.float64

    def _check_params(self) -> None:
        if self.kernel is not None and not isinstance(self.kernel, Kernel):
            raise ValueError(
                f"kernel must be a gpytorch Kernel or None, got {type(self.kernel).__name__}"
            )
        check_positive("noise", self.noise)
        check_positive("noise_lower_bound", self.noise_lower_bound, allow_zero=True)
        if self.noise <= self.noise_lower_bound:
            raise ValueError(
                f"noise must be above noise_lower_bound = {self.noise_lower_bound:g}, "
                f"got {self.noise}"
            )
        check_choice("optimizer", self.optimizer, ("lbfgs", "adam"))
        check_int("max_iter", self.max_iter, minimum=0)

    def _check_features(self, X: np.ndarray) -> None:
        """Hook: raise ValueError for inputs the model cannot take."""

    @abstractmethod
    def _default_kernel(self, n_features: int) -> Kernel:
        """Kernel used when ``kernel=None``."""

    @abstractmethod
    def _build_model(self, kernel: Kernel) -> nn.Module:
        """The torch GP model around ``kernel`` (with ``fit``, ``log_marginal_likelihood``)."""

    def fit(self, X: Any, y: Any) -> MarginalLikelihoodRegressor:
        """Fit the GP hyperparameters to ``X`` (n, d) and targets ``y`` (n,); returns self.

        Sets ``model_`` (the fitted model in original units; the torch GP on standardised
        data is ``model_.model``), ``kernel_`` (its kernel), ``noise_`` (noise variance in
        original target units), ``loss_curve_`` (``-log p(z)`` of the standardised targets,
        see :func:`gp.fit_hyperparameters`), ``n_iter_`` (objective evaluations of L-BFGS,
        or Adam steps), ``log_marginal_likelihood_value_`` (original units),
        ``input_transform_``, ``outcome_transform_``, ``device_``, ``dtype_``.
        """
        self._check_params()
        self._start_fit()
        X, y = self._validate_fit_data(X, y, multi_output=False, min_samples=1)
        self._check_features(X)
        x = self._fit_inputs(X)
        z = self._fit_targets(y)[:, 0]
        if self.kernel is None:
            kernel = self._default_kernel(X.shape[1])
        else:
            kernel = copy.deepcopy(self.kernel)  # never mutate the parameter
        model = self._build_model(kernel).to(dtype=self.dtype_, device=self.device_)
        model.noise = float(self.noise)  # set again in float64 (the models build in float32)
        model.fit((x, z), optimizer=self.optimizer, max_iter=self.max_iter, verbose=self.verbose)
        self.loss_curve_ = model.history_
        self.n_iter_ = len(self.loss_curve_) - 1  # objective evaluations (Adam: steps)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self._set_model(model)
        self.kernel_ = model.kernel
        scale = float(self.outcome_transform_.scale[0])
        self.noise_ = float(model.noise.detach()) * scale**2
        self.log_marginal_likelihood_value_ = self.log_marginal_likelihood()
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False  # fit and predict are deterministic (sample_y is seeded)
        return tags

    def log_marginal_likelihood(self) -> float:
        """Log marginal likelihood of the training targets at the fitted hyperparameters.

        In original target units: the model sees ``z = (y - m) / s``, and the change of
        variables ``y = s z + m`` (Jacobian ``s`` per point) gives
        ``log p(y) = log p(z) - n log s``
        (:meth:`bdl.core.Standardize.log_det_jacobian`). Standardising the inputs does not
        change it: it is a density of the targets only.
        """
        check_is_fitted(self)
        with torch.no_grad():
            lml = float(self._inner.log_marginal_likelihood())
        n = int(self._inner.train_y.shape[-1])
        return lml - self.outcome_transform_.log_det_jacobian(n)

"""The one scikit-learn estimator base every estimator of ``bdl`` and ``gp`` is a shell over.

:class:`BayesianEstimator` holds what every estimator shares: seeding, device and dtype
resolution, pickling of the torch state to the CPU, input and target transforms
(:class:`~bdl.core.transforms.Normalize`, :class:`~bdl.core.transforms.Standardize`), the
fitted model in the user's units (``model_``, a :class:`~bdl.core.model.TransformedModel`)
and ``posterior``. :class:`BayesianRegressorMixin` and :class:`BayesianClassifierMixin`
add ``predict`` / ``sample_y`` and ``predict_proba`` / ``predict``.

A family's estimator implements ``_fit_model(x, y)``: it receives the transformed inputs
and targets as tensors (model dtype, device) and returns the fitted torch-level model.
"""

from __future__ import annotations

import copy
import numbers
import warnings
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor, nn

from bdl.core.distributed import agreed_seed
from bdl.core.model import Model, TransformedModel
from bdl.core.posterior import CategoricalPosterior, Posterior, SamplePosterior
from bdl.core.transforms import Normalize, Standardize
from bdl.core.validation import check_int

__all__ = [
    "BayesianClassifierMixin",
    "BayesianEstimator",
    "BayesianRegressorMixin",
    "resolve_device",
    "resolve_dtype",
]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device an estimator computes on: the CPU for ``None``.

    Raises
    ------
    ValueError
        Naming ``device``: not a device, or a CUDA / MPS device that is not available here.
    """
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise ValueError(
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
    if resolved.type == "cuda" and resolved.index is not None:
        if resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA devices")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} asks for MPS, but MPS is not available here")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be a CPU, CUDA or MPS device, got {device!r}")
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"float64"`` (or those torch dtypes) as a torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")


def _torch_items(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if isinstance(v, (nn.Module, Tensor))}


class BayesianEstimator(BaseEstimator):
    """Shared machinery of every estimator (not used directly).

    Subclasses store their constructor parameters untouched (scikit-learn's contract), may
    have ``device``, ``dtype`` and ``random_state`` parameters, and implement
    ``_fit_model``. The class attribute ``_default_dtype`` is the model dtype when the
    estimator has no ``dtype`` parameter.
    """

    _default_dtype: torch.dtype = torch.float32

    # -- parameters ---------------------------------------------------------------------------
    def _seed(self) -> int:
        """An int seed from ``random_state`` (drawn from it when it is a RandomState or None);
        under :func:`bdl.core.distributed.data_parallel` rank 0's on every rank."""
        random_state = getattr(self, "random_state", None)
        if isinstance(random_state, numbers.Integral):
            return agreed_seed(int(random_state))
        try:
            seed = int(check_random_state(random_state).randint(0, 2**31 - 1))
        except ValueError as err:
            raise ValueError(
                f"random_state must be None, an int or a numpy RandomState, got {random_state!r}"
            ) from err
        return agreed_seed(seed)

    def _resolve_device(self) -> torch.device:
        return resolve_device(getattr(self, "device", None))

    def _resolve_dtype(self) -> torch.dtype:
        dtype = getattr(self, "dtype", None)
        return self._default_dtype if dtype is None else resolve_dtype(dtype)

    def _start_fit(self) -> None:
        """Resolve ``device_`` and ``dtype_`` (ValueErrors name the parameter)."""
        self.device_ = self._resolve_device()
        self.dtype_ = self._resolve_dtype()

    # -- data in ------------------------------------------------------------------------------
    def _tensor(self, values: np.ndarray | Tensor) -> Tensor:
        return torch.as_tensor(values, dtype=self.dtype_, device=self.device_)

    def _fit_inputs(self, X: np.ndarray) -> Tensor:
        """Fit ``input_transform_`` to ``X`` (n, d); return the transformed inputs."""
        x64 = torch.tensor(np.array(X, dtype=np.float64))  # a copy: X may be read-only
        self.input_transform_ = Normalize(X.shape[1]).fit(x64).to(self.device_)
        return self._tensor(self.input_transform_(x64.to(self.device_)))

    def _fit_targets(self, y: np.ndarray) -> Tensor:
        """Fit ``outcome_transform_`` to targets ``y`` (n, m); return them standardised."""
        y64 = torch.tensor(np.array(y, dtype=np.float64))
        self.outcome_transform_ = Standardize(y.shape[1]).fit(y64).to(self.device_)
        return self._tensor(self.outcome_transform_(y64.to(self.device_)))

    def _set_model(self, model: Model, *, model_dtype: torch.dtype | None = None) -> None:
        """Put the fitted torch-level ``model`` behind the transforms as ``model_``.

        Models follow the protocol (they compute in the promoted dtype of their input and
        their parameters), so ``model_dtype`` is only for one that does not: queries of
        lower precision are then promoted to it.
        """
        self.model_ = TransformedModel(
            model,
            input_transform=self.input_transform_,
            outcome_transform=getattr(self, "outcome_transform_", None),
            model_dtype=model_dtype,
        )

    @property
    def _inner(self) -> Model:
        """The fitted model in transformed units."""
        return self.model_.model

    def _as_query(self, X: Any) -> Tensor:
        """Inputs for :meth:`posterior`: a tensor keeps dtype, shape and graph; else float64."""
        check_is_fitted(self)
        if isinstance(X, Tensor):
            if X.dim() < 2 or X.shape[-1] != self.n_features_in_:
                raise ValueError(
                    f"X must have shape (..., n, {self.n_features_in_}), got {tuple(X.shape)}"
                )
            if not X.is_floating_point():
                raise ValueError(f"X must have a floating-point dtype, got {X.dtype}")
            if not bool(torch.isfinite(X).all()):
                raise ValueError("X contains NaN or inf")
            return X.to(self.device_)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return torch.tensor(np.array(X, dtype=np.float64), device=self.device_)

    # -- data out -----------------------------------------------------------------------------
    def posterior(
        self, X: Any, *, observation_noise: bool = False, joint: bool = False
    ) -> Posterior:
        """Predictive distribution at ``X`` in the user's units.

        Parameters
        ----------
        X : array-like of shape (n, d), or Tensor of shape (..., n, d)
            A tensor keeps its dtype (the posterior is returned in it) and, when it requires
            grad, the posterior is differentiable in it (e.g. for acquisition functions);
            arrays are read as float64.
        observation_noise : bool, default False
            Regression: the predictive of ``y`` (noise included) instead of the latent ``f``.
        joint : bool, default False
            A joint covariance across the ``n`` points where the model has one.

        Returns
        -------
        Posterior
            ``mean`` of shape (..., n, m) on the model's device.
        """
        x = self._as_query(X)
        with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
            return self.model_.posterior(x, observation_noise=observation_noise, joint=joint)

    # -- pickling and tags --------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """Torch state (modules, tensors) is pickled on the CPU; the estimator is untouched."""
        state = super().__getstate__()
        device = state.get("device_")
        if device is not None and torch.device(device).type != "cpu":
            copied = copy.deepcopy(_torch_items(state))  # one memo: shared modules stay shared
            state.update({k: v.cpu() for k, v in copied.items()})
        return state

    def __setstate__(self, state: dict) -> None:
        """Move the torch state back to ``device_`` if available, else keep it on the CPU."""
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
        for key, value in _torch_items(self.__dict__).items():
            setattr(self, key, value.to(device))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = getattr(self, "random_state", 0) is None
        return tags


class BayesianRegressorMixin:
    """``predict`` (noise-inclusive mean and std) and joint ``sample_y`` for regressors."""

    #: whether :meth:`sample_y` asks the model for a joint posterior across the points
    _joint_samples: bool = True

    def _validate_fit_data(
        self, X: Any, y: Any, *, multi_output: bool = True, min_samples: int = 2
    ) -> tuple[np.ndarray, np.ndarray]:
        """Validated float64 ``X`` (n, d) and targets as (n, m); sets ``_y_1d``."""
        kind = np.asarray(y).dtype.kind
        if kind in "USaVb":
            raise ValueError(f"y must be numeric for regression, got dtype {np.asarray(y).dtype}")
        X, y = validate_data(
            self, X, y, y_numeric=True, multi_output=multi_output, dtype=np.float64
        )
        if X.shape[0] < min_samples:
            raise ValueError(
                f"{type(self).__name__} needs at least {min_samples} samples to fit, got "
                f"{X.shape[0]} sample{'s' if X.shape[0] != 1 else ''}"
            )
        self._y_1d = y.ndim == 1
        return X, y.reshape(len(y), -1)

    def _output(self, values: Tensor) -> np.ndarray:
        """(n, m) tensor as numpy, (n,) when the estimator was fitted on 1-D targets."""
        out = values.detach().to(torch.float64).cpu().numpy()
        return out[..., 0] if getattr(self, "_y_1d", True) else out

    def predict(self, X: Any, return_std: bool = False):
        """Predictive mean of ``y`` (n,) or (n, m); with ``return_std`` also its standard
        deviation (observation noise included)."""
        with torch.no_grad():
            post = self.posterior(X, observation_noise=True)
        mean = self._output(post.mean)
        return (mean, self._output(post.stddev)) if return_std else mean

    def sample_y(self, X: Any, n_samples: int = 1, random_state: Any = None) -> np.ndarray:
        """Draws of ``y = f + eps`` at the rows of ``X``, joint across the points where the
        model has a joint posterior.

        Parameters
        ----------
        X : array-like, shape (n, d)
        n_samples : int, default 1
        random_state : int, RandomState or None
            Seed of the draws; None uses the estimator's ``random_state`` where it has one.

        Returns
        -------
        ndarray, shape (n, n_samples), or (n, m, n_samples) for several outputs
        """
        check_int("n_samples", n_samples)
        if random_state is None:
            random_state = getattr(self, "random_state", None)
        rng = check_random_state(random_state)
        with torch.no_grad():
            post = self.posterior(X, observation_noise=True, joint=self._joint_samples)
            if isinstance(post, SamplePosterior):  # a random member for every draw
                members = rng.randint(post.num_samples, size=n_samples)
                post = post.select(torch.as_tensor(members))
            shape = (n_samples, *post.base_sample_shape)
            base = torch.as_tensor(rng.standard_normal(shape), dtype=post.dtype, device=post.device)
            draws = post.rsample_from_base_samples(torch.Size([n_samples]), base)
        draws = draws.to(torch.float64).cpu().numpy()  # (s, n, m)
        draws = np.moveaxis(draws, 0, -1)  # (n, m, s)
        return draws[:, 0, :] if getattr(self, "_y_1d", True) else draws


class BayesianClassifierMixin:
    """Label encoding, ``predict_proba`` and ``predict`` for classifiers."""

    def _validate_fit_data(
        self, X: Any, y: Any, *, min_samples: int = 2
    ) -> tuple[np.ndarray, np.ndarray]:
        """Validated float64 ``X`` (n, d) and integer labels (n,); sets ``classes_``."""
        X, y = validate_data(self, X, y, dtype=np.float64)
        if X.shape[0] < min_samples:
            raise ValueError(
                f"{type(self).__name__} needs at least {min_samples} samples to fit, got "
                f"{X.shape[0]} sample{'s' if X.shape[0] != 1 else ''}"
            )
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"y must contain at least 2 classes, got 1 class: {self.classes_.tolist()}"
            )
        return X, y_idx

    def posterior(self, X: Any, *, observation_noise: bool = False, joint: bool = False):
        """Predictive class probabilities at ``X``: a
        :class:`~bdl.core.posterior.CategoricalPosterior` with ``probs`` (..., n, C)."""
        post = super().posterior(X, observation_noise=observation_noise, joint=joint)
        if not isinstance(post, CategoricalPosterior):
            raise TypeError(f"expected a CategoricalPosterior, got {type(post).__name__}")
        return post

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n, C), columns ordered as ``classes_``."""
        check_is_fitted(self)
        with torch.no_grad():
            probs = self.posterior(X).probs.to(torch.float64).cpu().numpy()
        return probs / probs.sum(-1, keepdims=True)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Log class probabilities (n, C), columns ordered as ``classes_``."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def label_indices(self, y: Any) -> np.ndarray:
        """Positions in ``classes_`` of the original labels ``y`` (n,), e.g. for
        ``posterior(X).log_prob(torch.as_tensor(est.label_indices(y)))``.

        Raises
        ------
        ValueError
            Naming ``y`` if it holds a label that is not in ``classes_``.
        """
        check_is_fitted(self)
        y = np.asarray(y)
        idx = np.clip(np.searchsorted(self.classes_, y), 0, len(self.classes_) - 1)
        unknown = self.classes_[idx] != y
        if bool(np.any(unknown)):
            raise ValueError(
                f"y holds labels not in classes_ (first: {y[unknown][0]!r}); classes_ = "
                f"{self.classes_.tolist()}"
            )
        return idx

    def predict(self, X: Any) -> np.ndarray:
        """Most probable class label for each row of ``X``."""
        proba = self.predict_proba(X)  # checks that the estimator is fitted
        return self.classes_[np.argmax(proba, axis=-1)]

"""The estimator base: device and dtype resolution, seeding, the model in the user's units."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import RegressorMixin
from torch import nn

from bdl.core import GaussianPosterior, Model
from bdl.core.estimator import (
    BayesianEstimator,
    BayesianRegressorMixin,
    resolve_device,
    resolve_dtype,
)


def test_resolve_device_errors_name_the_argument():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("gpu", 3, "meta"):
        with pytest.raises(ValueError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            resolve_device("cuda")


def test_resolve_dtype():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype(torch.float64) is torch.float64
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float16")


class _Linear(nn.Module, Model):
    """Bayesian linear regression with known posterior N(w_mean, w_cov), fixed noise."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.register_buffer("w_mean", torch.zeros(d))
        self.register_buffer("w_cov", torch.eye(d))
        self.noise = 0.25

    @property
    def num_outputs(self) -> int:
        return 1

    def posterior(self, X, *, observation_noise=False, joint=False):
        w_mean, w_cov = self.w_mean.to(X), self.w_cov.to(X)
        mean = (X @ w_mean).unsqueeze(-1)
        if joint:
            cov = X @ w_cov @ X.mT + (self.noise if observation_noise else 0.0) * torch.eye(
                X.shape[-2], dtype=X.dtype
            )
            return GaussianPosterior(mean, covariance=cov)
        var = ((X @ w_cov) * X).sum(-1, keepdim=True)
        return GaussianPosterior(mean, variance=var + (self.noise if observation_noise else 0.0))


class _Regressor(BayesianRegressorMixin, RegressorMixin, BayesianEstimator):
    """Exact conjugate regression on standardised data: a minimal shell over the base."""

    def __init__(self, random_state=None, device=None):
        self.random_state = random_state
        self.device = device

    def fit(self, X, y):
        X, y = self._validate_fit_data(X, y)
        self._start_fit()
        x, z = self._fit_inputs(X), self._fit_targets(y)
        model = _Linear(X.shape[1]).to(self.dtype_)
        precision = x.mT @ x / model.noise + torch.eye(X.shape[1], dtype=x.dtype)
        model.w_cov = torch.linalg.inv(precision)
        model.w_mean = model.w_cov @ x.mT @ z[:, 0] / model.noise
        self._set_model(model)
        return self


def _fit():
    rng = np.random.default_rng(0)
    X = rng.normal(3.0, 2.0, (50, 2))
    y = 100.0 + 10.0 * (X @ np.array([1.0, -0.5])) + rng.normal(0, 1.0, 50)
    return _Regressor(random_state=0).fit(X, y), X, y


def test_predictions_are_in_the_users_units():
    est, X, y = _fit()
    mean, std = est.predict(X, return_std=True)
    assert abs(np.mean(mean) - np.mean(y)) < 1e-6 * np.std(y) * 10
    assert np.corrcoef(mean, y)[0, 1] > 0.99
    # std of y is sqrt(noise + latent) times the target scale
    latent = est.posterior(X).variance[:, 0].numpy()
    s = float(est.outcome_transform_.scale[0])
    # the model computes in float32: agreement to a few float32 ulps
    np.testing.assert_allclose(std**2, (latent / s**2 + 0.25) * s**2, rtol=1e-5)


def test_tensor_queries_keep_dtype_and_gradients():
    est, X, _ = _fit()
    Xq = torch.as_tensor(X[:6]).reshape(3, 2, 2).float().requires_grad_(True)
    post = est.posterior(Xq)
    assert post.mean.dtype == torch.float32 and post.mean.shape == (3, 2, 1)
    post.mean.sum().backward()
    assert Xq.grad is not None and bool(torch.isfinite(Xq.grad).all())


def test_sample_y_is_seeded_and_joint():
    est, X, _ = _fit()
    a = est.sample_y(X[:4], n_samples=2000, random_state=1)
    b = est.sample_y(X[:4], n_samples=2000, random_state=1)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 2000)
    cov = est.posterior(X[:4], observation_noise=True, joint=True).covariance_matrix.numpy()
    # sample covariance within 6 standard errors of the exact one (Wishart sd ~ sqrt(2/S) var)
    tol = 6 * np.sqrt(2.0 / 2000) * np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
    assert (np.abs(np.cov(a) - cov) < tol).all()


def test_bad_device_is_a_value_error_naming_device():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(10, 2)), rng.normal(size=10)
    with pytest.raises(ValueError, match="device"):
        _Regressor(device="gpu").fit(X, y)


def test_wrong_feature_count_for_tensor_queries():
    est, _, _ = _fit()
    with pytest.raises(ValueError, match="X must have shape"):
        est.posterior(torch.zeros(3, 5, dtype=torch.float64))


def test_seed_from_random_state():
    assert _Regressor(random_state=7)._seed() == 7
    rs = np.random.RandomState(0)
    assert _Regressor(random_state=rs)._seed() == np.random.RandomState(0).randint(0, 2**31 - 1)

"""Exact GPs on constant and noiseless targets: a positive noise floor, finite answers,
reported jitter, and agreement with scikit-learn's GaussianProcessRegressor."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from gpytorch.kernels import MaternKernel, ScaleKernel
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, Matern

from bdl.core.linalg import JitterWarning
from gp import ExactGP, GPRegressor
from gp.exact.model import psd_posterior_covariance
from gp.likelihoods import NOISE_LOWER_BOUND

DT = torch.float64
X = np.random.default_rng(0).uniform(-2, 2, (30, 3))
X_TEST = np.random.default_rng(1).uniform(-2, 2, (10, 3))


def _sklearn(y: np.ndarray) -> GaussianProcessRegressor:
    kernel = ConstantKernel() * Matern(length_scale=np.ones(3), nu=2.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence / bound warnings on degenerate data
        return GaussianProcessRegressor(kernel, normalize_y=True, random_state=0).fit(X, y)


def _assert_finite_everywhere(model: GPRegressor, y: np.ndarray) -> None:
    """predict, sample_y, rsample, log_prob and joint_log_prob at the training inputs."""
    mean, std = model.predict(X, return_std=True)
    assert np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()
    assert np.isfinite(model.sample_y(X, 4, random_state=0)).all()
    target = torch.as_tensor(y, dtype=DT).unsqueeze(-1)
    for noisy in (False, True):
        post = model.posterior(X, joint=True, observation_noise=noisy)
        assert bool(torch.isfinite(post.rsample(torch.Size([3]))).all())
        assert bool(torch.isfinite(post.joint_log_prob(target)))
        assert not bool(torch.isnan(post.log_prob(target)).any())


@pytest.mark.parametrize("max_iter", [10, 100])
def test_constant_targets_keep_the_noise_floor_and_match_sklearn(max_iter):
    y = np.full(30, 3.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model = GPRegressor(max_iter=max_iter).fit(X, y)
    # constant targets keep scale 1 under standardisation: the floor is in original units
    assert model.noise_ >= NOISE_LOWER_BOUND * (1 - 1e-6)
    assert np.isfinite(model.log_marginal_likelihood_value_)
    mean, std = model.predict(X_TEST, return_std=True)
    np.testing.assert_allclose(mean, 3.5, rtol=0, atol=1e-12)
    # the predictive sd is the noise sd (the latent f is pinned by 30 exact observations)
    np.testing.assert_allclose(std, np.sqrt(model.noise_), rtol=1e-3)
    np.testing.assert_allclose(_sklearn(y).predict(X_TEST), mean, rtol=0, atol=1e-12)
    _assert_finite_everywhere(model, y)


def test_noiseless_linear_targets_interpolate_like_sklearn():
    y = X[:, 0].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JitterWarning)  # reported, checked below
        model = GPRegressor().fit(X, y)
        _assert_finite_everywhere(model, y)
    assert model.noise_ > 0
    # both interpolate the linear function; the error is of the order of the noise sd
    truth = X_TEST[:, 0]
    sk_error = np.abs(_sklearn(y).predict(X_TEST) - truth).max()
    our_error = np.abs(model.predict(X_TEST) - truth).max()
    assert sk_error < 1e-4 and our_error < 10 * np.sqrt(model.noise_)


def test_noiseless_smooth_targets_are_finite_and_accurate():
    y = np.sin(X[:, 0]) + 0.5 * X[:, 1] ** 2
    model = GPRegressor().fit(X, y)
    _assert_finite_everywhere(model, y)
    truth = np.sin(X_TEST[:, 0]) + 0.5 * X_TEST[:, 1] ** 2
    sk_error = np.abs(_sklearn(y).predict(X_TEST) - truth).max()
    assert np.abs(model.predict(X_TEST) - truth).max() < max(2 * sk_error, 0.02)


def _near_noiseless_model() -> tuple[ExactGP, torch.Tensor]:
    """A GP whose latent posterior at its 40 training inputs is numerically singular: its
    eigenvalues (down to ~1e-13) lie below the rounding error of ``K_** - K_*X (.)^-1 K_X*``
    (~ eps * n * 1e6 with output scale 1e6)."""
    t = torch.linspace(-2, 2, 40, dtype=DT).unsqueeze(-1)
    model = ExactGP(ScaleKernel(MaternKernel(nu=2.5)), noise=2e-6, mean="zero").to(DT)
    model.kernel.base_kernel.lengthscale = 300.0
    model.kernel.outputscale = 1e6
    model.noise = 1.1e-6
    return model.set_data(t, t[:, 0]), t


def test_singular_joint_posterior_gets_reported_bounded_jitter():
    model, t = _near_noiseless_model()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        post = model.posterior(t, joint=True)
        draws = post.rsample(torch.Size([2]))
        value = post.joint_log_prob(t)
    assert bool(torch.isfinite(draws).all()) and bool(torch.isfinite(value))
    messages = [str(w.message) for w in caught if issubclass(w.category, JitterWarning)]
    assert len(messages) == 1 and "prior variance" in messages[0]
    relative = float(messages[0].split("added jitter ")[1].split(" x")[0])
    # bounded: far below the noise, and the covariance is the dense formula plus that jitter
    assert relative * 1e6 < 1e-2 * 1.1e-6
    with torch.no_grad():
        K = model.kernel(t).to_dense()
        reference = K - K @ torch.linalg.solve(K + 1.1e-6 * torch.eye(40, dtype=DT), K)
    error = (post.covariance_matrix - reference).abs().max()
    assert float(error) <= 2 * relative * 1e6 + 1e-16 * 40 * 1e6 * 10


def test_psd_posterior_covariance_leaves_a_positive_definite_matrix_alone():
    A = torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", JitterWarning)
        assert psd_posterior_covariance(A, A, 10) is A
    bad = torch.tensor([[1.0, 1.0], [1.0, 1.0 - 1e-12]], dtype=DT)  # slightly indefinite
    with pytest.warns(JitterWarning, match="jitter"):
        fixed = psd_posterior_covariance(bad, torch.eye(2, dtype=DT), 10)
    assert bool(torch.linalg.cholesky_ex(fixed).info == 0)
    assert float((fixed - bad).abs().max()) < 1e-6

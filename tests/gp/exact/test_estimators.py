"""GPRegressor: sklearn contract, references, sampling, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from gpytorch.kernels import MaternKernel, ScaleKernel
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel
from sklearn.utils.estimator_checks import parametrize_with_checks

from gp import GaussianPosterior, GPRegressor

TINY = dict(max_iter=3)


@parametrize_with_checks([GPRegressor(**TINY)])
def test_sklearn_compatible(estimator, check):
    check(estimator)


DT = torch.float64


def _data(n: int = 30, d: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 4, size=(n, d)) * np.arange(1, d + 1)
    y = 3.0 * np.sin(X).sum(1) + 5.0 + 0.2 * rng.standard_normal(n)
    return X, y


def _fixed_kernel(nu: float, lengthscale, outputscale: float, ard: int | None = None):
    kernel = ScaleKernel(MaternKernel(nu=nu, ard_num_dims=ard)).to(DT)
    kernel.base_kernel.lengthscale = torch.as_tensor(np.asarray(lengthscale), dtype=DT)
    kernel.outputscale = outputscale
    return kernel


def test_fit_predict_posterior_and_units():
    X, y = _data()
    model = GPRegressor(random_state=0).fit(X, y)
    assert model.n_iter_ >= 1 and model.loss_curve_[-1] < model.loss_curve_[0]
    mean, std = model.predict(X[:5], return_std=True)
    assert mean.shape == std.shape == (5,) and np.all(std > 0)
    assert model.score(X, y) > 0.9
    post = model.posterior(X[:5], joint=True)
    assert isinstance(post, GaussianPosterior) and post.is_joint and post.mean.shape == (5, 1)
    noisy = model.posterior(X[:5], observation_noise=True)
    np.testing.assert_allclose(noisy.mean[:, 0].numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(noisy.stddev[:, 0].numpy(), std, rtol=1e-10)
    np.testing.assert_allclose(noisy.variance - post.variance, model.noise_, rtol=1e-10)


def test_kernel_parameter_is_not_mutated():
    X, y = _data()
    kernel = _fixed_kernel(2.5, [[0.8, 1.3]], 1.2, ard=2)
    before = {k: v.clone() for k, v in kernel.state_dict().items()}
    model = GPRegressor(kernel=kernel, max_iter=20).fit(X, y)
    assert model.kernel is kernel and model.kernel_ is not kernel
    after = kernel.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(model.kernel_.base_kernel.lengthscale, kernel.base_kernel.lengthscale)


@pytest.mark.parametrize("est", [GPRegressor(max_iter=5)])
def test_pickle_round_trip(est):
    X, y = _data(d=1)
    model = est.fit(X, y)
    loaded = pickle.loads(pickle.dumps(model))
    X_new = np.linspace(-3, 5, 17)[:, None]
    for a, b in zip(
        model.predict(X_new, return_std=True), loaded.predict(X_new, return_std=True), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert loaded.log_marginal_likelihood() == model.log_marginal_likelihood()


def test_matches_sklearn_gaussian_process_regressor_with_fixed_hyperparameters():
    X, y = _data(n=25, d=2)
    ls, scale, noise = np.array([0.8, 1.3]), 1.2, 0.05
    ours = GPRegressor(kernel=_fixed_kernel(2.5, [ls], scale, ard=2), noise=noise, max_iter=0)
    ours.fit(X, y)
    # we standardise X, so our length scales are in units of X.std(0); sklearn's normalize_y
    # standardises y (ddof=0) like ours, and WhiteKernel puts the noise into predict's std
    sk_kernel = ConstantKernel(scale, "fixed") * Matern(
        ls * X.std(0), "fixed", nu=2.5
    ) + WhiteKernel(noise, "fixed")
    sk = GaussianProcessRegressor(sk_kernel, alpha=0.0, optimizer=None, normalize_y=True)
    sk.fit(X, y)
    X_new = np.random.default_rng(1).uniform(-3, 9, size=(40, 2))
    mean, std = ours.predict(X_new, return_std=True)
    sk_mean, sk_std = sk.predict(X_new, return_std=True)
    np.testing.assert_allclose(mean, sk_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std, sk_std, rtol=1e-6, atol=1e-6)
    # sklearn reports the LML of the standardised targets; ours is in original units
    expected = sk.log_marginal_likelihood_value_ - len(y) * np.log(y.std())
    assert ours.log_marginal_likelihood() == pytest.approx(expected, abs=1e-6)


def test_log_marginal_likelihood_is_the_density_of_the_raw_targets():
    X, y = _data(n=20, d=1)
    model = GPRegressor(max_iter=10).fit(X, y)
    x = model.input_transform_(torch.as_tensor(X, dtype=DT))
    with torch.no_grad():
        K = model.kernel_(x).to_dense() + model.model_.model.noise * torch.eye(len(y), dtype=DT)
    s = y.std()
    dist = torch.distributions.MultivariateNormal(
        torch.full((len(y),), y.mean(), dtype=DT), covariance_matrix=s**2 * K
    )
    assert model.log_marginal_likelihood() == pytest.approx(
        float(dist.log_prob(torch.as_tensor(y))), abs=1e-8
    )
    assert model.log_marginal_likelihood_value_ == model.log_marginal_likelihood()


@pytest.mark.parametrize("Est", [GPRegressor])
def test_sample_y_is_joint(Est):
    X, y = _data(n=15, d=1)
    model = Est(max_iter=20, random_state=0).fit(X, y)
    X_new = np.array([[0.0], [0.05], [3.0]])
    S = 20000
    draws = model.sample_y(X_new, n_samples=S)
    assert draws.shape == (3, S)
    np.testing.assert_array_equal(draws, model.sample_y(X_new, n_samples=S))  # random_state=0
    cov = model.posterior(X_new, observation_noise=True, joint=True).covariance_matrix.numpy()
    emp = np.cov(draws)
    # standard error of a sample covariance: sqrt((c_ii c_jj + c_ij^2) / S); 5 sigma
    se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / S)
    assert np.all(np.abs(emp - cov) < 5 * se)
    assert cov[0, 1] > 0.5 * np.sqrt(cov[0, 0] * cov[1, 1])  # the joint part is tested
    mean_se = np.sqrt(np.diag(cov) / S)
    assert np.all(np.abs(draws.mean(1) - model.predict(X_new)) < 5 * mean_se)


@pytest.mark.parametrize("Est", [GPRegressor])
def test_bad_input_raises(Est):
    X, y = _data(n=10, d=1)
    Xn = X.copy()
    Xn[3, 0] = np.nan
    yn = y.copy()
    yn[2] = np.inf
    with pytest.raises(ValueError, match="NaN"):
        Est().fit(Xn, y)
    with pytest.raises(ValueError):
        Est().fit(X, yn)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        Est().fit(X, y[:-1])
    with pytest.raises(ValueError, match="2D array"):
        Est().fit(X[:, 0], y)
    with pytest.raises(ValueError, match="noise"):
        Est(noise=-1.0).fit(X, y)
    with pytest.raises(ValueError, match="max_iter"):
        Est(max_iter=-1).fit(X, y)
    with pytest.raises(ValueError, match="optimizer"):
        Est(optimizer="sgd").fit(X, y)
    with pytest.raises(ValueError, match="kernel"):
        Est(kernel="rbf").fit(X, y)
    model = Est(max_iter=0).fit(X, y)
    with pytest.raises(ValueError, match="features"):
        model.predict(np.c_[X, X])
    with pytest.raises(ValueError, match="NaN"):
        model.predict(Xn)


@pytest.mark.parametrize("Est", [GPRegressor])
def test_device_option_on_cpu(Est):
    X, y = _data(n=20, d=1)
    ref = Est(max_iter=5).fit(X, y)
    X_new = np.linspace(-3, 5, 7)[:, None]
    for device in ["cpu", torch.device("cpu")]:
        model = Est(max_iter=5, device=device).fit(X, y)
        assert model.device_ == torch.device("cpu")
        for a, b in zip(
            model.predict(X_new, return_std=True), ref.predict(X_new, return_std=True), strict=True
        ):
            assert isinstance(a, np.ndarray)
            np.testing.assert_array_equal(a, b)
        assert model.posterior(X_new).mean.device == torch.device("cpu")
        draws = model.sample_y(X_new, n_samples=2, random_state=0)
        np.testing.assert_array_equal(draws, ref.sample_y(X_new, n_samples=2, random_state=0))


@pytest.mark.parametrize("Est", [GPRegressor])
def test_bad_device_raises(Est):
    X, y = _data(n=10, d=1)
    with pytest.raises(ValueError, match="device"):
        Est(device="tpu").fit(X, y)
    with pytest.raises(ValueError, match="device"):
        Est(device=3).fit(X, y)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Est(device="cuda").fit(X, y)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the fallback without CUDA")
def test_unpickling_a_cuda_fitted_estimator_without_cuda_falls_back_to_cpu():
    X, y = _data(n=15, d=1)
    model = GPRegressor(max_iter=3).fit(X, y)
    expected = model.predict(X, return_std=True)
    model.device_ = torch.device("cuda")  # as if fitted on a GPU (its tensors are on the CPU)
    with pytest.warns(UserWarning, match="not available"):
        loaded = pickle.loads(pickle.dumps(model))
    assert loaded.device_ == torch.device("cpu")
    for a, b in zip(loaded.predict(X, return_std=True), expected, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("Est", [GPRegressor])
def test_cuda_matches_cpu_and_pickles(Est):
    X, y = _data(n=40, d=1)
    X_new = np.linspace(-3, 5, 11)[:, None]
    cpu = Est(max_iter=5).fit(X, y)
    gpu = Est(max_iter=5, device="cuda").fit(X, y)
    assert gpu.device_.type == "cuda" and gpu.posterior(X_new).mean.device.type == "cuda"
    for a, b in zip(
        gpu.predict(X_new, return_std=True), cpu.predict(X_new, return_std=True), strict=True
    ):
        assert isinstance(a, np.ndarray)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)  # float64, different kernels
    assert gpu.sample_y(X_new, n_samples=3, random_state=0).shape == (11, 3)
    state = gpu.__getstate__()
    assert next(state["model_"].parameters()).device.type == "cpu"  # stored on the CPU
    loaded = pickle.loads(pickle.dumps(gpu))
    assert next(loaded.model_.parameters()).device.type == "cuda"
    np.testing.assert_allclose(loaded.predict(X_new), gpu.predict(X_new), rtol=1e-12)

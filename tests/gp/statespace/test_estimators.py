"""StateSpaceGPRegressor: sklearn contract, agreement with GPRegressor, sampling, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from gpytorch.kernels import MaternKernel, PeriodicKernel, ScaleKernel
from sklearn.utils.estimator_checks import parametrize_with_checks

from gp import GPRegressor, StateSpaceGP, StateSpaceGPRegressor

TINY = dict(max_iter=3)

# StateSpaceGPRegressor takes exactly one input column (the time); these checks fit or
# predict on X with several columns and get the documented ValueError instead.
_ONE_COLUMN = "StateSpaceGPRegressor requires X with exactly one column (time input)"
SS_EXPECTED_FAILED = {
    name: _ONE_COLUMN
    for name in [
        "check_dtype_object",
        "check_estimators_dtypes",
        "check_fit_score_takes_y",
        "check_estimators_fit_returns_self",
        "check_pipeline_consistency",
        "check_estimators_nan_inf",
        "check_estimators_overwrite_params",
        "check_estimators_pickle",
        "check_f_contiguous_array_estimator",
        "check_fit2d_predict1d",
        "check_methods_subset_invariance",
        "check_fit2d_1sample",
        "check_dict_unchanged",
        "check_dont_overwrite_parameters",
        "check_fit_idempotent",
        "check_fit_check_is_fitted",
        "check_n_features_in",
        "check_regressors_train",
        "check_regressor_data_not_an_array",
        "check_regressors_no_decision_function",
        "check_supervised_y_2d",
        "check_regressors_int",
        "check_methods_sample_order_invariance",
        "check_n_features_in_after_fitting",
        "check_positive_only_tag_during_fit",
        "check_readonly_memmap_input",
        "check_non_transformer_estimators_n_iter",
        "check_estimators_pickle(readonly_memmap=True)",
    ]
}


@parametrize_with_checks(
    [StateSpaceGPRegressor(**TINY)], expected_failed_checks=lambda _: SS_EXPECTED_FAILED
)
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


@pytest.mark.parametrize("est", [StateSpaceGPRegressor(max_iter=5)])
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


def test_statespace_equals_exact_with_the_same_fixed_kernel():
    X, y = _data(n=40, d=1)
    kw = dict(noise=0.07, max_iter=0)
    # GPRegressor standardises X, StateSpaceGPRegressor keeps the user's time units: the same
    # prior has lengthscale 0.6 in standardised units and 0.6 * std(X) in the time units
    ss_kernel = _fixed_kernel(1.5, 0.6 * X.std(), 1.3)
    ss = StateSpaceGPRegressor(kernel=ss_kernel, **kw).fit(X, y)
    ex = GPRegressor(kernel=_fixed_kernel(1.5, 0.6, 1.3), **kw).fit(X, y)
    X_new = np.r_[np.linspace(-4, 6, 31), X[:5, 0]][:, None]  # interpolation, extrapolation
    for a, b in zip(
        ss.predict(X_new, return_std=True), ex.predict(X_new, return_std=True), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-8)
    assert ss.log_marginal_likelihood() == pytest.approx(ex.log_marginal_likelihood(), abs=1e-8)
    latent_ss, latent_ex = ss.posterior(X_new, joint=True), ex.posterior(X_new, joint=True)
    np.testing.assert_allclose(latent_ss.variance, latent_ex.variance, rtol=1e-8, atol=1e-8)
    # the joint covariance that sample_y draws from (FFBS on one side, Cholesky on the other)
    np.testing.assert_allclose(
        latent_ss.covariance_matrix, latent_ex.covariance_matrix, rtol=1e-8, atol=1e-8
    )


@pytest.mark.parametrize("Est", [StateSpaceGPRegressor])
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


def test_statespace_sample_y_is_linear_time():
    # 20,000 training and requested points: a dense joint would need 3.2 GB; FFBS is O(n)
    X, y = _data(n=20000, d=1)
    model = StateSpaceGPRegressor(max_iter=0, method="parallel").fit(X, y)
    X_new = np.linspace(X.min() - 1, X.max() + 1, 20000)[:, None]
    draws = model.sample_y(X_new, n_samples=2, random_state=0)
    assert draws.shape == (20000, 2) and np.isfinite(draws).all()


@pytest.mark.parametrize("Est", [StateSpaceGPRegressor])
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


def test_statespace_rejects_several_columns():
    X, y = _data(n=10, d=2)
    with pytest.raises(ValueError, match="exactly one column"):
        StateSpaceGPRegressor().fit(X, y)


@pytest.mark.parametrize("Est", [StateSpaceGPRegressor])
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


@pytest.mark.parametrize("Est", [StateSpaceGPRegressor])
def test_bad_device_raises(Est):
    X, y = _data(n=10, d=1)
    with pytest.raises(ValueError, match="device"):
        Est(device="tpu").fit(X, y)
    with pytest.raises(ValueError, match="device"):
        Est(device=3).fit(X, y)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Est(device="cuda").fit(X, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("Est", [StateSpaceGPRegressor])
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


# -- time units, missing targets, degenerate data, the mean option (issue 10) -----------------


def _seasonal(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Times in years over 20 years and a yearly cycle plus a slow rise and noise."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0.0, 20.0, n))
    y = np.sin(2 * np.pi * t) + 0.1 * t + 0.1 * rng.standard_normal(n)
    return t[:, None], y


def _periodic_kernel(period: float, scale: float = 1.0):
    kernel = ScaleKernel(PeriodicKernel()).to(DT)
    # tensors: gpytorch rounds a Python float through float32 on the way in
    kernel.base_kernel.period_length = torch.tensor(period, dtype=DT)
    kernel.base_kernel.lengthscale = torch.tensor(1.0, dtype=DT)
    kernel.outputscale = torch.tensor(scale, dtype=DT)
    return kernel


def test_kernel_hyperparameters_are_in_the_time_units_of_X():
    """A one-year period written as 1.0 is one year (it used to be std(t) ~ 5.8 years)."""
    X, y = _seasonal()
    est = StateSpaceGPRegressor(kernel=_periodic_kernel(1.0), noise=0.1, max_iter=0).fit(X, y)
    assert float(est.kernel_.base_kernel.period_length) == pytest.approx(1.0, rel=1e-12)
    inner = est.model_.model.kernel.base_kernel.period_length  # standardised time inside
    assert float(inner) == pytest.approx(1.0 / X.std(), rel=1e-12)
    # the same prior as the low-level model on the raw times (targets standardised alike)
    gp_model = StateSpaceGP(_periodic_kernel(1.0), noise=0.1).to(DT)
    z = (y - y.mean()) / y.std()
    gp_model.noise = 0.1
    gp_model.set_data(torch.as_tensor(X[:, 0]), torch.as_tensor(z))
    X_new = np.linspace(-1.0, 22.0, 23)[:, None]
    with torch.no_grad():
        ref = gp_model.posterior(torch.as_tensor(X_new), observation_noise=True)
    mean, std = est.predict(X_new, return_std=True)
    np.testing.assert_allclose(mean, ref.mean[:, 0].numpy() * y.std() + y.mean(), atol=1e-8)
    np.testing.assert_allclose(std, ref.stddev[:, 0].numpy() * y.std(), atol=1e-8)


def test_fit_does_not_depend_on_the_time_unit():
    X, y = _seasonal()
    X_new = np.linspace(-1.0, 22.0, 9)[:, None]
    fits = {}
    for unit in (1.0, 3.15e7, 1e-6):  # years, seconds, ...
        kernel = _periodic_kernel(1.02 * unit, 0.5) + _fixed_kernel(1.5, 5.0 * unit, 0.5)
        est = StateSpaceGPRegressor(kernel=kernel, max_iter=200).fit(X * unit, y)
        fits[unit] = est
        np.testing.assert_allclose(
            est.predict(X_new * unit), fits[1.0].predict(X_new), rtol=1e-6, atol=1e-6
        )
        period = float(est.kernel_.kernels[0].base_kernel.period_length) / unit
        assert period == pytest.approx(1.0, abs=0.01)  # the fitted period, in years


def test_nan_targets_are_missing_values():
    X, y = _seasonal(60)
    y_nan = y.copy()
    y_nan[[3, 17, 40]] = np.nan
    keep = ~np.isnan(y_nan)
    X_new = np.linspace(0.0, 20.0, 11)[:, None]
    # fixed hyperparameters: exactly the GP of the observed points; fitted (to convergence,
    # from other internal time units: the missing points' times count in the scaling): the
    # same optimum
    for max_iter, tol in ((0, 1e-10), (200, 1e-4)):
        kw = dict(kernel=_periodic_kernel(1.0), noise=0.1, max_iter=max_iter)
        with_nan = StateSpaceGPRegressor(**kw).fit(X, y_nan)
        observed = StateSpaceGPRegressor(**kw).fit(X[keep], y[keep])
        for a, b in zip(
            with_nan.predict(X_new, return_std=True),
            observed.predict(X_new, return_std=True),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
        assert with_nan.log_marginal_likelihood_value_ == pytest.approx(
            observed.log_marginal_likelihood_value_, rel=tol
        )
    with pytest.raises(ValueError, match="inf"):
        StateSpaceGPRegressor().fit(X, np.where(keep, y, np.inf))
    with pytest.raises(ValueError, match="no finite value"):
        StateSpaceGPRegressor().fit(X, np.full(len(y), np.nan))
    with pytest.raises(ValueError, match="y is None"):
        StateSpaceGPRegressor().fit(X, None)


@pytest.mark.parametrize("mean", ["constant", "linear", 2])
def test_constant_targets_and_one_sample_give_finite_answers(mean):
    X = np.linspace(0.0, 10.0, 30)[:, None]
    cases = [(X, np.full(30, 3.5))]
    if mean == "constant":
        cases.append((X[:1], np.array([2.0])))
    for X_fit, y_fit in cases:
        est = StateSpaceGPRegressor(mean=mean).fit(X_fit, y_fit)
        mu, std = est.predict(np.array([[-5.0], [0.0], [3.3], [20.0]]), return_std=True)
        assert np.isfinite(mu).all() and np.isfinite(std).all() and (std > 0).all()
        np.testing.assert_allclose(mu, y_fit[0], atol=1e-6)
        assert est.noise_ > 0 and np.isfinite(est.log_marginal_likelihood_value_)
        assert np.isfinite(est.sample_y(X[:3], n_samples=2, random_state=0)).all()


def test_linear_mean_extrapolates_a_line():
    rng = np.random.default_rng(1)
    X = np.sort(rng.uniform(0.0, 10.0, 50))[:, None]
    y = 2.0 + 3.0 * X[:, 0] + 0.05 * rng.standard_normal(50)
    X_far = np.array([[15.0], [25.0], [50.0]])
    line = StateSpaceGPRegressor(mean="linear").fit(X, y)
    mean, std = line.predict(X_far, return_std=True)
    np.testing.assert_allclose(mean, 2.0 + 3.0 * X_far[:, 0], rtol=0.01)
    assert (np.diff(std) > 0).all()  # the slope's uncertainty grows with the horizon
    flat = StateSpaceGPRegressor().fit(X, y)  # a constant mean reverts to the average
    assert abs(flat.predict(X_far[-1:])[0] - y.mean()) < abs(mean[-1] - y.mean())
    assert type(line.model_.model).__name__ == "TrendGP"
    loaded = pickle.loads(pickle.dumps(line))
    np.testing.assert_array_equal(loaded.predict(X_far), line.predict(X_far))
    draws = line.sample_y(X_far, n_samples=3, random_state=0)
    assert draws.shape == (3, 3) and np.isfinite(draws).all()


@pytest.mark.parametrize("mean", ["quadratic", -1, 1.5, True, None])
def test_bad_mean_raises(mean):
    X, y = _data(n=10, d=1)
    with pytest.raises(ValueError, match="mean"):
        StateSpaceGPRegressor(mean=mean).fit(X, y)


def test_trend_needs_enough_observed_targets():
    X, y = _data(n=3, d=1)
    y[0] = np.nan
    with pytest.raises(ValueError, match="mean=2 asks for a polynomial trend of degree 2"):
        StateSpaceGPRegressor(mean=2).fit(X, y)
    with pytest.raises(ValueError, match="periodic_order"):
        StateSpaceGPRegressor(periodic_order=-1).fit(X[1:], y[1:])

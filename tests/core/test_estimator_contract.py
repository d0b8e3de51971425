"""The shared contract every scikit-learn estimator honours (see ``cases.py``)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from cases import all_cases

from bdl.core import CategoricalPosterior, Model, Posterior

_, ESTIMATOR_CASES = all_cases()
ids = [c.name for c in ESTIMATOR_CASES]


@pytest.fixture(scope="module")
def fitted():
    cache = {}

    def get(case):
        if case.name not in cache:
            X, y = case.data()
            cache[case.name] = (case.make().fit(X, y), X, y)
        return cache[case.name]

    return get


@pytest.mark.parametrize("case", ESTIMATOR_CASES, ids=ids)
def test_model_is_a_model_in_user_units(case, fitted):
    est, X, _ = fitted(case)
    assert isinstance(est.model_, Model)
    x = torch.as_tensor(X[:5])
    a, b = est.posterior(X[:5]), est.model_.posterior(x)
    torch.testing.assert_close(a.mean, b.mean)


@pytest.mark.parametrize("case", ESTIMATOR_CASES, ids=ids)
def test_posterior_of_numpy_and_batched_tensor_inputs(case, fitted):
    est, X, _ = fitted(case)
    post = est.posterior(X[:7])
    assert isinstance(post, Posterior)
    assert post.mean.dtype == torch.float64 and post.mean.shape[:-1] == (7,)
    Xq = torch.as_tensor(X[:6]).reshape(2, 3, X.shape[1])
    batched = est.posterior(Xq)
    assert batched.mean.shape[:-1] == (2, 3)
    torch.testing.assert_close(batched.mean.reshape(6, -1), post.mean[:6], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", ESTIMATOR_CASES, ids=ids)
def test_posterior_keyword_only(case, fitted):
    est, X, _ = fitted(case)
    with pytest.raises(TypeError):
        est.posterior(X[:3], True)


@pytest.mark.parametrize("case", ESTIMATOR_CASES, ids=ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_posterior_dtype_follows_a_tensor_input(case, fitted, dtype):
    est, X, _ = fitted(case)
    post = est.posterior(torch.as_tensor(X[:4], dtype=dtype))
    assert post.mean.dtype == dtype and post.variance.dtype == dtype


@pytest.mark.parametrize("case", [c for c in ESTIMATOR_CASES if c.differentiable], ids=str)
def test_posterior_is_differentiable_in_a_batched_float64_input(case, fitted):
    est, X, _ = fitted(case)
    Xq = torch.as_tensor(X[:4]).reshape(2, 2, X.shape[1]).clone().requires_grad_(True)

    def moments(x):
        post = est.posterior(x)
        return post.mean, post.variance

    assert torch.autograd.gradcheck(moments, (Xq,), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ESTIMATOR_CASES, ids=ids)
def test_pickle_round_trip(case, fitted):
    est, X, _ = fitted(case)
    loaded = pickle.loads(pickle.dumps(est))
    a, b = est.posterior(X[:5]), loaded.posterior(X[:5])
    torch.testing.assert_close(b.mean, a.mean)
    torch.testing.assert_close(b.variance, a.variance)


@pytest.mark.parametrize("case", ESTIMATOR_CASES, ids=ids)
def test_fit_inside_no_grad(case):
    X, y = case.data()
    with torch.no_grad():
        est = case.make().fit(X, y)
    assert np.isfinite(est.predict(X[:5]).astype(float) if case.task == "regression" else 1).all()


@pytest.mark.parametrize("case", ESTIMATOR_CASES, ids=ids)
def test_fit_under_float64_default_dtype(case):
    X, y = case.data()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        est = case.make().fit(X, y)
        post = est.posterior(X[:3])
        assert bool(torch.isfinite(post.mean).all())
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("case", [c for c in ESTIMATOR_CASES if c.task == "regression"], ids=str)
def test_regressor_predict_and_observation_noise(case, fitted):
    est, X, _ = fitted(case)
    mean, std = est.predict(X[:5], return_std=True)
    post = est.posterior(X[:5], observation_noise=True)
    np.testing.assert_allclose(mean, post.mean[:, 0].numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(std, post.stddev[:, 0].numpy(), rtol=1e-6, atol=1e-8)
    latent = est.posterior(X[:5])
    assert bool((post.variance >= latent.variance - 1e-12).all())
    draws = est.sample_y(X[:5], n_samples=3, random_state=0)
    assert draws.shape == (5, 3) and np.isfinite(draws).all()


@pytest.mark.parametrize(
    "case", [c for c in ESTIMATOR_CASES if c.task == "classification"], ids=str
)
def test_classifier_predict_proba(case, fitted):
    est, X, y = fitted(case)
    post = est.posterior(X[:5])
    assert isinstance(post, CategoricalPosterior)
    proba = est.predict_proba(X[:5])
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-10)
    assert set(est.predict(X[:5])) <= set(np.unique(y))


@pytest.mark.parametrize("case", [c for c in ESTIMATOR_CASES if c.task == "regression"], ids=str)
def test_sample_y_draws_have_the_predictive_moments(case, fitted):
    """Mean and variance of S seeded draws within 5 standard errors of the predictive's."""
    est, X, _ = fitted(case)
    S = 4000
    draws = est.sample_y(X[:4], n_samples=S, random_state=1)
    np.testing.assert_array_equal(draws, est.sample_y(X[:4], n_samples=S, random_state=1))
    post = est.posterior(X[:4], observation_noise=True)
    mean, var = post.mean[:, 0].double().numpy(), post.variance[:, 0].double().numpy()
    # standard error of a sample mean sqrt(var / S); of a sample variance ~ var sqrt(2 / S)
    # (a Gaussian's; a mixture's kurtosis is covered by the factor 5 for these small models)
    assert (np.abs(draws.mean(1) - mean) < 5 * np.sqrt(var / S)).all()
    assert (np.abs(draws.var(1) - var) < 5 * var * np.sqrt(2.0 / S) + 1e-12).all()


@pytest.mark.parametrize("case", ESTIMATOR_CASES, ids=ids)
def test_fitted_model_state_dict_round_trip(case, fitted):
    """model_.state_dict() holds everything the predictions depend on (transforms included)."""
    est, X, y = fitted(case)
    other = case.make()
    other.set_params(**{k: v for k, v in other.get_params().items() if k == "random_state"})
    if "random_state" in other.get_params():
        other.set_params(random_state=12345)
    other.fit(X[::-1].copy() * 2.0, y[::-1].copy())  # different data: different statistics
    other.model_.load_state_dict(est.model_.state_dict())
    a, b = est.posterior(X[:5]), other.posterior(X[:5])
    torch.testing.assert_close(b.mean, a.mean)
    torch.testing.assert_close(b.variance, a.variance)


@pytest.mark.parametrize(
    "case", [c for c in ESTIMATOR_CASES if c.joint and c.task == "regression"], ids=str
)
def test_joint_posterior_matches_marginals(case, fitted):
    est, X, _ = fitted(case)
    marginal = est.posterior(X[:5], observation_noise=True)
    joint = est.posterior(X[:5], observation_noise=True, joint=True)
    torch.testing.assert_close(joint.mean, marginal.mean, rtol=1e-6, atol=1e-8)
    n, m = marginal.mean.shape[-2:]
    diag = joint.covariance_matrix.diagonal(dim1=-2, dim2=-1).reshape(n, m)
    torch.testing.assert_close(diag, marginal.variance, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "case", [c for c in ESTIMATOR_CASES if c.task == "classification"], ids=str
)
def test_classifier_log_proba_and_label_indices(case, fitted):
    est, X, y = fitted(case)
    np.testing.assert_allclose(
        np.exp(est.predict_log_proba(X[:5])), est.predict_proba(X[:5]), rtol=1e-12
    )
    labels = est.classes_[y[:5]]
    idx = est.label_indices(labels)
    np.testing.assert_array_equal(est.classes_[idx], labels)
    lp = est.posterior(X[:5]).log_prob(torch.as_tensor(idx))
    np.testing.assert_allclose(
        lp.numpy(), np.log(est.predict_proba(X[:5])[np.arange(5), idx]), rtol=1e-6
    )
    with pytest.raises(ValueError, match="y holds labels not in classes_"):
        est.label_indices(np.array([12345]))

"""scikit-learn contract, pickling, bad input and closed-form behaviour of the VBLL estimators."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes, load_digits
from sklearn.model_selection import train_test_split
from sklearn.utils.estimator_checks import parametrize_with_checks

from bdl import CategoricalPosterior, GaussianPosterior, VBLLClassifier, VBLLRegressor
from bdl.core import TransformedModel
from bdl.lastlayer import VBLLNetwork
from bdl.lastlayer.estimators import heldout_noise_variance

TINY = dict(hidden_sizes=(16,), epochs=20, batch_size=16, random_state=0)


# Predictions are computed in float64 (the dtype of numpy queries), so every check passes,
# check_methods_subset_invariance included (float32 predictions differed at ~1e-7 by batch).
@parametrize_with_checks([VBLLRegressor(**TINY), VBLLClassifier(**TINY)])
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def diabetes():
    X, y = load_diabetes(return_X_y=True)
    return train_test_split(X, y, test_size=0.2, random_state=0)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)


def test_regressor_fit_predict_and_posterior(diabetes):
    X_train, X_test, y_train, y_test = diabetes
    model = VBLLRegressor(hidden_sizes=(32,), epochs=20, random_state=0).fit(X_train, y_train)
    mean, std = model.predict(X_test, return_std=True)
    assert mean.shape == std.shape == (len(X_test),)
    assert np.all(std > 0)
    # far better than predicting the training mean (R^2 > 0.3 on this split)
    assert model.score(X_test, y_test) > 0.3
    post = model.posterior(X_test)
    assert isinstance(post, GaussianPosterior) and post.mean.shape == (len(X_test), 1)
    noisy = model.posterior(X_test, observation_noise=True)
    assert torch.all(noisy.variance > post.variance)
    np.testing.assert_allclose(noisy.stddev[:, 0].numpy(), std, rtol=1e-5)
    # targets are standardised internally: outputs are back in the original units
    assert abs(mean.mean() - y_train.mean()) < 0.5 * y_train.std()


def test_regressor_multi_output_and_constant_target():
    rng = np.random.RandomState(0)
    X = rng.randn(60, 3)
    Y = np.stack([X[:, 0], -X[:, 1] + 5.0], 1) + 0.1 * rng.randn(60, 2)
    model = VBLLRegressor(hidden_sizes=(), random_state=0).fit(X, Y)
    mean, std = model.predict(X, return_std=True)
    assert mean.shape == std.shape == (60, 2)
    assert np.sqrt(((mean - Y) ** 2).mean()) < 0.2
    const = VBLLRegressor(**TINY).fit(X, np.full(60, 3.0))
    assert np.allclose(const.predict(X), 3.0, atol=1e-3)


def test_linear_regressor_equals_bayesian_linear_regression():
    # hidden_sizes=() is Bayesian linear regression on standardised inputs: the predictive
    # mean equals the ridge solution with penalty sigma^2 / s_p from the evidence fixed point.
    rng = np.random.RandomState(1)
    X = rng.randn(200, 4)
    y = X @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.3 * rng.randn(200)
    model = VBLLRegressor(hidden_sizes=(), random_state=0).fit(X, y)
    head = model.model_.model.head
    noise = float(head.noise_variance[0]) * y.std() ** 2
    xs = (X - X.mean(0)) / X.std(0)
    alpha = float(head.noise_variance[0]) / head.weights.prior_variance
    ys = (y - y.mean()) / y.std()
    w = np.linalg.solve(xs.T @ xs + alpha * np.eye(4), xs.T @ ys)
    np.testing.assert_allclose(
        model.predict(X), (xs @ w) * y.std() + y.mean(), rtol=1e-4, atol=1e-4
    )
    # the evidence-optimal noise is close to the true 0.09 (sampling error ~ 0.09 * sqrt(2/200))
    assert abs(noise - 0.09) < 5 * 0.09 * np.sqrt(2 / 200)


def test_classifier_fit_predict_proba_and_labels(digits):
    X_train, X_test, y_train, y_test = digits
    model = VBLLClassifier(hidden_sizes=(32,), epochs=5, random_state=0).fit(X_train, y_train)
    proba = model.predict_proba(X_test)
    assert proba.shape == (len(X_test), 10)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    assert model.score(X_test, y_test) > 0.85
    post = model.posterior(X_test)
    assert isinstance(post, CategoricalPosterior)
    # string labels round trip through classes_
    names = np.array([f"digit-{k}" for k in range(10)])
    named = VBLLClassifier(**TINY).fit(X_train, names[y_train])
    assert set(named.predict(X_test)) <= set(names)


@pytest.mark.parametrize("head", ["generative"])
def test_classifier_generative_head(digits, head):
    X_train, X_test, y_train, y_test = digits
    model = VBLLClassifier(head=head, hidden_sizes=(32,), epochs=5, random_state=0)
    assert model.fit(X_train, y_train).score(X_test, y_test) > 0.8


@pytest.mark.parametrize(
    "estimator", [VBLLRegressor(**TINY), VBLLClassifier(**TINY)], ids=["regressor", "classifier"]
)
def test_pickle_round_trip_identical(estimator, digits):
    X_train, X_test, y_train, _ = digits
    estimator.fit(X_train[:200], y_train[:200])
    restored = pickle.loads(pickle.dumps(estimator))
    method = "predict_proba" if hasattr(estimator, "predict_proba") else "predict"
    np.testing.assert_array_equal(
        getattr(estimator, method)(X_test), getattr(restored, method)(X_test)
    )


def test_same_seed_same_model(digits):
    X_train, X_test, y_train, _ = digits
    a = VBLLClassifier(**TINY).fit(X_train[:200], y_train[:200]).predict_proba(X_test)
    b = VBLLClassifier(**TINY).fit(X_train[:200], y_train[:200]).predict_proba(X_test)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "X, y, match",
    [
        (np.array([[np.nan, 1.0], [1.0, 2.0], [3.0, 4.0]]), np.array([0.0, 1.0, 2.0]), "NaN"),
        (np.array([[np.inf, 1.0], [1.0, 2.0], [3.0, 4.0]]), np.array([0.0, 1.0, 2.0]), "infinity"),
        (np.ones((3, 2)), np.array([0.0, np.nan, 1.0]), "NaN"),
        (np.ones((3, 2)), np.array([0.0, 1.0]), "inconsistent numbers of samples"),
        (np.ones((0, 2)), np.ones(0), "0 sample"),
        (np.ones(3), np.ones(3), "2D array"),
        (np.ones((3, 2)), np.array(["a", "b", "c"]), "numeric"),
    ],
)
def test_regressor_bad_input(X, y, match):
    with pytest.raises(ValueError, match=match):
        VBLLRegressor(**TINY).fit(X, y)


def test_classifier_bad_input():
    X = np.random.RandomState(0).randn(10, 2)
    with pytest.raises(ValueError, match="at least 2 classes"):
        VBLLClassifier(**TINY).fit(X, np.zeros(10))
    with pytest.raises(ValueError, match="continuous"):
        VBLLClassifier(**TINY).fit(X, np.linspace(0, 1, 10))


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(epochs=0), "epochs"),
        (dict(lr=-1.0), "lr"),
        (dict(batch_size=0), "batch_size"),
        (dict(covariance="full"), "covariance"),
        (dict(prior_scale=0.0), "prior_scale"),
        (dict(hidden_sizes=(8, 0)), r"hidden_sizes\[1\]"),
        (dict(validation_fraction=1.5), "validation_fraction"),
    ],
)
def test_bad_hyperparameters_name_the_argument(params, match):
    X = np.random.RandomState(0).randn(20, 2)
    with pytest.raises(ValueError, match=match):
        VBLLRegressor(**{**TINY, **params}).fit(X, X[:, 0])


def test_heldout_noise_variance_is_the_maximum_likelihood_noise():
    # for zero latent variance the maximiser is the mean squared residual, exactly
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(500, 2, generator=gen, dtype=torch.float64) * torch.tensor([0.5, 2.0])
    mean = torch.zeros_like(y)
    noise = heldout_noise_variance(mean, torch.zeros_like(y), y)
    torch.testing.assert_close(noise, y.pow(2).mean(0), rtol=1e-6, atol=0)
    # with latent variance v the maximiser is mean(r^2) - v when that is positive
    noise = heldout_noise_variance(mean, torch.full_like(y, 0.1), y)
    torch.testing.assert_close(noise, y.pow(2).mean(0) - 0.1, rtol=1e-6, atol=0)


def test_early_stopping_records_scores(diabetes):
    X_train, _, y_train, _ = diabetes
    model = VBLLRegressor(hidden_sizes=(16,), epochs=30, n_iter_no_change=3, random_state=0)
    model.fit(X_train, y_train)
    assert 1 <= len(model.validation_scores_) <= 30
    assert model.n_epochs_ == len(model.validation_scores_)


@pytest.mark.parametrize("head", ["discriminative", "generative"])
def test_linear_classifier_without_hidden_layers_is_fitted(head):
    # hidden_sizes=() is Bayesian multinomial regression on the inputs: a linearly separable
    # problem must be (almost) perfectly classified
    rng = np.random.RandomState(0)
    X = rng.randn(300, 3)
    y = (X[:, 0] > 0).astype(int)
    model = VBLLClassifier(hidden_sizes=(), head=head, random_state=0).fit(X, y)
    assert model.score(X, y) > 0.95


def test_random_state_accepts_generators_and_integers(digits):
    X_train, _, y_train, _ = digits
    for rs in (0, np.random.RandomState(0), None):
        VBLLClassifier(**{**TINY, "random_state": rs, "epochs": 1}).fit(
            X_train[:100], y_train[:100]
        )


def test_model_is_a_vbll_network_behind_the_transforms(diabetes):
    X_train, X_test, y_train, _ = diabetes
    model = VBLLRegressor(**TINY).fit(X_train, y_train)
    assert isinstance(model.model_, TransformedModel)
    assert isinstance(model.model_.model, VBLLNetwork)
    # joint posterior in the original units: its diagonal is the marginal variance
    joint = model.posterior(X_test[:6], observation_noise=True, joint=True)
    marginal = model.posterior(X_test[:6], observation_noise=True)
    torch.testing.assert_close(joint.variance, marginal.variance)
    draws = model.sample_y(X_test[:6], n_samples=4, random_state=0)
    assert draws.shape == (6, 4) and np.isfinite(draws).all()
    # a float32 tensor query is answered in float32, at the numbers of a float64 query
    post32 = model.posterior(torch.as_tensor(X_test[:6], dtype=torch.float32))
    assert post32.mean.dtype == torch.float32
    torch.testing.assert_close(post32.mean, marginal.mean.float(), rtol=1e-5, atol=1e-3)


def test_classifier_posterior_rejects_joint(digits):
    X_train, X_test, y_train, _ = digits
    model = VBLLClassifier(**{**TINY, "epochs": 1}).fit(X_train[:100], y_train[:100])
    with pytest.raises(ValueError, match="joint"):
        model.posterior(X_test[:3], joint=True)

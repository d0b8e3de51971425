"""scikit-learn contract, pickling, bad input and a Bayesian-linear-regression check of the
SG-MCMC estimators."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn.utils.estimator_checks import parametrize_with_checks

from bdl import CategoricalPosterior, SamplePosterior, SGMCMCClassifier, SGMCMCRegressor
from bdl.sgmcmc._recipe import prior_precisions as _prior_precisions

TINY = dict(hidden_sizes=(8,), epochs=10, batch_size=16, n_cycles=2, random_state=0)


@parametrize_with_checks([SGMCMCRegressor(**TINY), SGMCMCClassifier(**TINY)])
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.RandomState(0)
    centers = np.array([[0.0, 3.0], [3.0, 0.0], [-3.0, -3.0]])
    y = rng.randint(0, 3, 150)
    return centers[y] + rng.randn(150, 2), y


def test_classifier_posterior_and_labels(blobs):
    X, y = blobs
    names = np.array(["a", "b", "c"])
    model = SGMCMCClassifier(**TINY).fit(X, names[y])
    post = model.posterior(X)
    assert isinstance(post, CategoricalPosterior)
    assert post.prob_samples.shape == (model.n_samples_, 150, 3)
    proba = model.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-12)
    assert model.score(X, names[y]) > 0.95  # well-separated blobs (3 sd apart)
    assert model.lr_ > 0 and model.n_samples_ >= 1


@pytest.mark.parametrize("sampler", ["sgld", "sghmc", "psgld"])
def test_every_sampler_fits_with_the_heuristic_step(blobs, sampler):
    X, y = blobs
    model = SGMCMCClassifier(**{**TINY, "sampler": sampler}).fit(X, y)
    assert np.isfinite(model.lr_) and model.lr_ > 0
    assert model.score(X, y) > 0.9


@pytest.mark.parametrize(
    "estimator", [SGMCMCRegressor(**TINY), SGMCMCClassifier(**TINY)], ids=["reg", "clf"]
)
def test_pickle_round_trip_identical(estimator, blobs):
    X, y = blobs
    estimator.fit(X, y)
    restored = pickle.loads(pickle.dumps(estimator))
    method = "predict_proba" if hasattr(estimator, "predict_proba") else "predict"
    np.testing.assert_array_equal(getattr(estimator, method)(X), getattr(restored, method)(X))


def test_regressor_recovers_bayesian_linear_regression():
    # hidden_sizes=() is Bayesian linear regression with the noise sampled too. With N = 200
    # the exact predictive is N(OLS mean, s^2 (1 + x^T (A^T A)^-1 x)) up to O(1/N) prior
    # effects; the posterior sd of the mean is s * sqrt(x^T (A^T A)^-1 x) and that of the noise
    # sd about s / sqrt(2 N) (5 %), so 3 of each bound the errors.
    rng = np.random.RandomState(0)
    n = 200
    X = rng.uniform(-2.0, 2.0, (n, 1))
    y = 1.5 * X[:, 0] + 0.3 + 0.5 * rng.randn(n)
    # 400 steps in 2 cycles: sampling phases of 40 steps at the end of each
    model = SGMCMCRegressor(hidden_sizes=(), batch_size=20, n_cycles=2, random_state=0).fit(X, y)
    x_new = np.linspace(-2.0, 2.0, 9)[:, None]
    mean, std = model.predict(x_new, return_std=True)
    design = np.c_[X, np.ones(n)]
    coef, ssr, _, _ = np.linalg.lstsq(design, y, rcond=None)
    s2 = ssr[0] / (n - 2)
    a_new = np.c_[x_new, np.ones(len(x_new))]
    lever = np.einsum("ij,jk,ik->i", a_new, np.linalg.inv(design.T @ design), a_new)
    np.testing.assert_array_less(np.abs(mean - a_new @ coef), 3 * np.sqrt(s2 * lever))
    ref_std = np.sqrt(s2 * (1.0 + lever))
    np.testing.assert_array_less(np.abs(std / ref_std - 1.0), 3 / np.sqrt(2 * n))
    post = model.posterior(x_new, observation_noise=True)
    assert isinstance(post, SamplePosterior)
    latent = model.posterior(x_new)
    assert torch.all(post.variance > latent.variance)


def test_regressor_multi_output_and_units():
    rng = np.random.RandomState(1)
    X = rng.randn(120, 3)
    Y = np.stack([X[:, 0], -X[:, 1] + 50.0], 1) * np.array([1.0, 100.0])
    Y = Y + 0.1 * rng.randn(120, 2)
    model = SGMCMCRegressor(**{**TINY, "hidden_sizes": ()}).fit(X, Y)
    mean, std = model.predict(X, return_std=True)
    assert mean.shape == std.shape == (120, 2)
    # targets are standardised internally: predictions are back in the original units
    assert np.all(np.abs(mean - Y).mean(0) < 0.2 * Y.std(0))


def test_same_seed_same_model(blobs):
    X, y = blobs
    a = SGMCMCClassifier(**TINY).fit(X, y).predict_proba(X)
    b = SGMCMCClassifier(**TINY).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=-1.0), "lr"),
        (dict(epochs=0), "epochs"),
        (dict(sampler="adam"), "sampler"),
        (dict(batch_size=0), "batch_size"),
        (dict(momentum_decay=0.0), "momentum_decay"),
        (dict(temperature=-1.0), "temperature"),
        (dict(prior_precision=-1.0), "prior_precision"),
        (dict(prior_precision="he"), "prior_precision"),
        (dict(prior_weight_variance=0.0), "prior_weight_variance"),
        (dict(n_cycles=0), "n_cycles"),
        (dict(exploration_fraction=1.0), "exploration_fraction"),
        (dict(samples_per_cycle=0), "samples_per_cycle"),
        (dict(hidden_sizes=(8, 0)), r"hidden_sizes\[1\]"),
    ],
)
@pytest.mark.parametrize("cls", [SGMCMCRegressor, SGMCMCClassifier])
def test_bad_hyperparameters_name_the_argument(cls, params, match):
    X = np.random.RandomState(0).randn(20, 2)
    y = (X[:, 0] > 0).astype(int)
    with pytest.raises(ValueError, match=match):
        cls(**{**TINY, **params}).fit(X, y)


@pytest.mark.parametrize("cls", [SGMCMCRegressor, SGMCMCClassifier])
def test_non_finite_inputs_are_rejected(cls):
    X = np.random.RandomState(0).randn(20, 2)
    y = (X[:, 0] > 0).astype(int)
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cls(**TINY).fit(bad, y)
    model = cls(**TINY).fit(X, y)
    with pytest.raises(ValueError, match="NaN"):
        model.predict(bad)


def test_fan_in_prior_precisions_per_layer(blobs):
    # weights ~ N(0, sigma_w^2 / fan_in): precision fan_in / sigma_w^2; biases N(0, 1)
    X, y = blobs
    model = SGMCMCClassifier(**{**TINY, "hidden_sizes": (8, 4), "prior_weight_variance": 4.0})
    model.fit(X, y)
    expected = [2 / 4.0, 1.0, 8 / 4.0, 1.0, 4 / 4.0, 1.0]  # (2->8), (8->4), (4->3)
    net = model.model_.model.model  # TransformedModel -> SampleCollector -> network
    assert _prior_precisions(net, "fan_in", 4.0) == expected
    assert _prior_precisions(net, 0.5, 4.0) == [0.5] * 6


def test_fan_in_and_isotropic_priors_differ_only_through_the_prior(blobs):
    # one linear layer of fan-in 2 (hidden_sizes=()): sigma_w^2 = 2 makes the weights'
    # precision 2 / 2 = 1, like the biases', so the chain is prior_precision=1.0's, bit for bit
    X, y = blobs
    kw = {**TINY, "hidden_sizes": ()}
    a = SGMCMCClassifier(**kw, prior_precision="fan_in", prior_weight_variance=2.0).fit(X, y)
    b = SGMCMCClassifier(**kw, prior_precision=1.0).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))


def test_run_too_short_for_a_sampling_phase_is_refused():
    X = np.random.RandomState(0).randn(20, 2)
    y = (X[:, 0] > 0).astype(int)
    # 1 epoch of 2 minibatches: a cycle needs 1 / (1 - 0.8) = 5 steps to contain a sampling step
    with pytest.raises(ValueError, match="too few for a sampling phase"):
        SGMCMCClassifier(**{**TINY, "epochs": 1, "batch_size": 10}).fit(X, y)


def test_classifier_needs_two_classes():
    X = np.random.RandomState(0).randn(10, 2)
    with pytest.raises(ValueError, match="at least 2 classes"):
        SGMCMCClassifier(**TINY).fit(X, np.zeros(10))

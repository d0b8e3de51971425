"""The SG-MCMC estimators' data-scaled defaults: a step floor on the classifier's budget, the
layer-wise fan-in prior, and a clear error when a chain diverges."""

from __future__ import annotations

import math

import numpy as np
import pytest
from torch import nn

from bdl import SGMCMCClassifier, SGMCMCRegressor
from bdl.sgmcmc._recipe import prior_precisions
from bdl.sgmcmc.estimators import DEFAULT_EPOCHS, MIN_STEPS

SMALL = dict(hidden_sizes=(8,), n_cycles=2, random_state=0)


def _data(n: int):
    rng = np.random.RandomState(0)
    X = rng.randn(n, 2)
    return X, (X[:, 0] > 0).astype(int)


@pytest.mark.parametrize("n", [30, 120])
def test_classifier_default_budget_has_a_step_floor(n):
    X, y = _data(n)
    model = SGMCMCClassifier(**SMALL).fit(X, y)
    steps_per_epoch = math.ceil(n / 64)
    # whole epochs: the fewest that reach MIN_STEPS (40 epochs are far fewer steps here)
    assert model.n_epochs_ == math.ceil(MIN_STEPS / steps_per_epoch)
    assert model.n_iter_ == model.n_epochs_ * steps_per_epoch >= MIN_STEPS
    assert len(model.loss_curve_) == model.n_epochs_


def test_classifier_default_budget_on_large_data_is_epochs():
    # 40 epochs of ceil(800 / 64) = 13 steps are 520 >= MIN_STEPS steps: no change
    X, y = _data(800)
    model = SGMCMCClassifier(**{**SMALL, "hidden_sizes": ()}).fit(X, y)
    assert DEFAULT_EPOCHS * 13 >= MIN_STEPS
    assert model.n_epochs_ == DEFAULT_EPOCHS and model.n_iter_ == DEFAULT_EPOCHS * 13


@pytest.mark.parametrize("cls", [SGMCMCClassifier, SGMCMCRegressor])
def test_explicit_epochs_are_honoured(cls):
    X, y = _data(30)
    model = cls(**SMALL, epochs=7, batch_size=16).fit(X, y)
    assert model.n_epochs_ == 7 and model.n_iter_ == 14


def test_regressor_default_budget_is_epochs():
    # the regressor's sampled noise shrinks in longer runs: no floor
    X, y = _data(30)
    model = SGMCMCRegressor(**SMALL).fit(X, y.astype(float))
    assert model.n_epochs_ == DEFAULT_EPOCHS and model.n_iter_ == DEFAULT_EPOCHS


def test_layerwise_prior_variance():
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    # weights: fan_in / sigma^2 with the input layer's sigma^2 first; biases N(0, 1)
    expected = [3 / 2.0, 1.0, 8 / 6.0, 1.0, 4 / 6.0, 1.0]
    assert prior_precisions(net, "fan_in", (2.0, 6.0)) == expected
    assert prior_precisions(net, "fan_in", 2.0) == prior_precisions(net, "fan_in", (2.0, 2.0))


def test_default_prior_is_the_layerwise_pair():
    X, y = _data(40)
    model = SGMCMCClassifier(**{**SMALL, "hidden_sizes": (8, 4)}, epochs=5, batch_size=8)
    model.fit(X, y)
    net = model.model_.model.model
    expected = prior_precisions(net, "fan_in", (32.0, 64.0))
    assert expected == [2 / 32.0, 1.0, 8 / 64.0, 1.0, 4 / 64.0, 1.0]
    assert model.get_params()["prior_weight_variance"] == (32.0, 64.0)


@pytest.mark.parametrize(
    "value, match",
    [
        ((1.0, 2.0, 3.0), "prior_weight_variance must be a float or a pair"),
        ((1.0, 0.0), r"prior_weight_variance\[1\]"),
        ((-1.0, 1.0), r"prior_weight_variance\[0\]"),
        ("wide", "prior_weight_variance"),
    ],
)
def test_bad_prior_weight_variance_names_the_argument(value, match):
    X, y = _data(20)
    with pytest.raises(ValueError, match=match):
        SGMCMCClassifier(**SMALL, epochs=2, prior_weight_variance=value).fit(X, y)


def test_diverging_regressor_chain_raises_a_clear_error():
    # a step 100 is far beyond the stability limit: the sampled log noise sd runs away
    rng = np.random.RandomState(0)
    X = rng.randn(40, 2)
    y = X[:, 0] + 0.1 * rng.randn(40)
    with pytest.raises(RuntimeError, match="chain diverged.*lr"):
        SGMCMCRegressor(**SMALL, lr=100.0, epochs=10, batch_size=16).fit(X, y)

"""Data-scaled defaults of the sparse GP estimators: inducing points, budget, step size and
the classifier's kernel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from gp import SparseGPClassifier, SparseGPRegressor
from gp.sparse.estimators import (
    CLASSIFIER_LR,
    CLASSIFIER_MIN_STEPS,
    DEFAULT_LR,
    FULL_BATCH_LR,
    MIN_CLASSIFIER_OUTPUTSCALE,
    MIN_STEPS,
    auto_num_inducing,
    classification_kernel,
    nearest_neighbour_error_rate,
)


def _blobs(n: int, d: int = 3, classes: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian clusters, one per class (centres 10 sd apart)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centres = 10.0 * rng.standard_normal((classes, d))
    return centres[y] + rng.standard_normal((n, d)), y


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, 1), (20, 20), (100, 32), (426, 32), (1000, 62), (4096, 256), (10**6, 256)],
)
def test_auto_num_inducing_rule(n, expected):
    # n // 16 within [32, 256], never more than n
    assert auto_num_inducing(n) == expected


def test_classifier_num_inducing_auto_and_user_values():
    X, y = _blobs(600)
    auto = SparseGPClassifier(epochs=1, random_state=0).fit(X, y)
    assert auto.num_inducing_ == auto_num_inducing(600) == 37
    given = SparseGPClassifier(num_inducing=100, epochs=1, random_state=0).fit(X, y)
    assert given.num_inducing_ == 100
    small = SparseGPClassifier(num_inducing=100, epochs=1, random_state=0).fit(X[:40], y[:40])
    assert small.num_inducing_ == 40  # clamped to n
    reg = SparseGPRegressor(epochs=1, random_state=0).fit(X, X[:, 0])
    assert reg.num_inducing_ == 256  # the regressor's default is unchanged
    assert SparseGPRegressor(epochs=1).fit(X[:50], X[:50, 0]).num_inducing_ == 50


def test_default_budget_and_learning_rate():
    X, y = _blobs(60)
    clf = SparseGPClassifier(random_state=0).fit(X, y)
    assert clf.n_iter_ == CLASSIFIER_MIN_STEPS and clf.lr_ == CLASSIFIER_LR  # full batch
    clf = SparseGPClassifier(batch_size=16, random_state=0).fit(X, y)
    assert clf.n_iter_ == 4 * math.ceil(CLASSIFIER_MIN_STEPS / 4)  # whole epochs of 4 steps
    reg = SparseGPRegressor(num_inducing=8, random_state=0).fit(X, X[:, 0])
    assert reg.n_iter_ == MIN_STEPS and reg.lr_ == FULL_BATCH_LR  # n <= batch_size
    reg = SparseGPRegressor(num_inducing=8, batch_size=30, epochs=1, random_state=0)
    assert reg.fit(X, X[:, 0]).lr_ == DEFAULT_LR["svgp"]  # minibatches
    sw = SparseGPRegressor("swsgp", num_inducing=8, num_neighbors=4, epochs=1).fit(X, X[:, 0])
    assert sw.lr_ == DEFAULT_LR["swsgp"]
    assert SparseGPClassifier(lr=0.02, epochs=1).fit(X, y).lr_ == 0.02


def test_nearest_neighbour_error_rate_is_smoothed_loo_error():
    # separated clusters: no mistakes -> (0 + 1) / (n + 2)
    X, y = _blobs(50)
    x = torch.as_tensor(X)
    assert nearest_neighbour_error_rate(x, torch.as_tensor(y)) == pytest.approx(1 / 52)
    # alternating labels on a line: every nearest neighbour has the other label
    line = torch.arange(40, dtype=torch.float64)[:, None]
    alternating = torch.arange(40) % 2
    assert nearest_neighbour_error_rate(line, alternating) == pytest.approx(41 / 42)
    # exact duplicates with different labels: a duplicate is the nearest other row
    dup = torch.tensor([[0.0], [0.0], [5.0], [5.0]])
    assert nearest_neighbour_error_rate(dup, torch.tensor([0, 1, 0, 0])) == pytest.approx(3 / 6)


def test_probit_relation_behind_the_output_scale():
    # E[Phi(-|f|)] = 1/2 - arctan(s) / pi for f ~ N(0, s^2), the relation the kernel inverts
    def expected_less_likely(s: float) -> float:
        def integrand(f: float) -> float:
            return stats.norm.cdf(-abs(f)) * stats.norm.pdf(f, 0, s)

        return integrate.quad(integrand, -np.inf, np.inf, epsabs=1e-12)[0]

    for s in [0.3, 1.0, 4.0, 20.0]:
        assert expected_less_likely(s) == pytest.approx(0.5 - math.atan(s) / math.pi, abs=1e-9)


@pytest.mark.parametrize("classes", [2, 3])
def test_classification_kernel_initial_values(classes):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((200, 5))
    y = (X[:, 0] + 0.5 * rng.standard_normal(200) > 0).astype(int)
    if classes == 3:
        y = y + (X[:, 1] > 1)
    x, t = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y)
    kernel = classification_kernel(x, t, classes, seed=0)
    latent = (classes,) if classes > 2 else ()
    assert kernel.batch_shape == torch.Size(latent)
    ls = kernel.base_kernel.lengthscale.detach()
    torch.testing.assert_close(ls, torch.full_like(ls, math.sqrt(5)))
    # the output scale inverts E[Phi(-|f|)] = e (float32 parameters: relative 1e-5)
    e = nearest_neighbour_error_rate(x, t, seed=0)
    s = kernel.outputscale.detach().double().sqrt()
    torch.testing.assert_close(
        0.5 - torch.atan(s) / math.pi, torch.full_like(s, e), rtol=1e-5, atol=0
    )
    # optimised in log space: the raw parameters are the logarithms
    torch.testing.assert_close(kernel.raw_outputscale.exp(), kernel.outputscale)
    torch.testing.assert_close(kernel.base_kernel.raw_lengthscale.exp(), ls)


def test_classification_kernel_scale_follows_label_predictability():
    X, y = _blobs(200)
    separated = classification_kernel(torch.as_tensor(X), torch.as_tensor(y), 2)
    noise = torch.as_tensor(np.random.default_rng(2).integers(0, 2, 200))
    random = classification_kernel(torch.as_tensor(X), noise, 2)
    assert float(separated.outputscale.detach()) == pytest.approx(1 / math.tan(math.pi / 202) ** 2)
    assert float(random.outputscale.detach()) < 0.5 < 1000 < float(separated.outputscale.detach())
    alternating = torch.arange(40) % 2
    line = torch.arange(40, dtype=torch.float64)[:, None]
    worst = classification_kernel(line, alternating, 2)  # e > 1/2: the floor
    assert float(worst.outputscale.detach()) == pytest.approx(MIN_CLASSIFIER_OUTPUTSCALE)


def test_user_kernel_replaces_the_classification_default():
    from gpytorch.kernels import MaternKernel, ScaleKernel

    X, y = _blobs(60)
    kernel = ScaleKernel(MaternKernel(nu=2.5))
    model = SparseGPClassifier(kernel=kernel, epochs=1, random_state=0).fit(X, y)
    fitted = model.model_.model.gp.kernel
    assert isinstance(fitted.base_kernel, MaternKernel) and fitted is not kernel


def test_classifier_defaults_on_a_small_separable_problem():
    # the defaults fit a few hundred rows to a confident, accurate classifier quickly
    X, y = _blobs(300, d=4, classes=3, seed=3)
    model = SparseGPClassifier(random_state=0).fit(X[:200], y[:200])
    assert model.n_iter_ == CLASSIFIER_MIN_STEPS and model.num_inducing_ == 32
    proba = model.predict_proba(X[200:])
    nll = -np.mean(np.log(proba[np.arange(100), y[200:]]))
    assert np.mean(proba.argmax(1) == y[200:]) == 1.0 and nll < 0.1

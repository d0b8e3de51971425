"""VBLL heads and estimators on bad and degenerate input: clear errors, never NaN or inf.

- ``loss`` refuses NaN or inf features and targets, naming them (as ``posterior`` does);
- the heteroscedastic loss stays finite for features of scale 100 (the noise layer starts
  inside its prior, see :class:`HeteroscedasticVBLLRegression`), and an overflow that is
  left is an error, not an inf;
- ``fit_closed_form`` on one sample or constant targets gives finite, exact answers;
- float64 features into float32 heads: ``fit`` and ``posterior`` work (protocol), ``loss``
  asks for one dtype;
- the classifiers' ``posterior(X).log_prob`` with the original labels points to ``classes_``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bdl.lastlayer import (
    GenerativeVBLLClassification,
    HeteroscedasticVBLLRegression,
    VBLLClassification,
    VBLLRegression,
)
from bdl.lastlayer.estimators import VBLLClassifier, VBLLRegressor

D, N = 4, 20
HEADS = {
    "regression": lambda: VBLLRegression(D, num_data=N),
    "heteroscedastic": lambda: HeteroscedasticVBLLRegression(D, num_data=N),
    "classification": lambda: VBLLClassification(D, 3, num_data=N),
    "generative": lambda: GenerativeVBLLClassification(D, 3, num_data=N),
}


def _data(name: str, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    phi = scale * torch.randn(N, D, generator=g)
    if name in ("classification", "generative"):
        return phi, torch.randint(3, (N,), generator=g)
    return phi, torch.randn(N, generator=g)


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_loss_refuses_non_finite_features_and_targets(name, bad):
    torch.manual_seed(0)
    head = HEADS[name]()
    phi, y = _data(name)
    broken = phi.clone()
    broken[3, 1] = bad
    with pytest.raises(ValueError, match="features contain NaN or inf"):
        head.loss(broken, y)
    if y.is_floating_point():
        broken_y = y.clone()
        broken_y[2] = bad
        with pytest.raises(ValueError, match="y contains NaN or inf"):
            head.loss(phi, broken_y)
    assert bool(torch.isfinite(head.loss(phi, y)))


@pytest.mark.parametrize("name", list(HEADS))
def test_loss_is_finite_at_feature_scale_100(name):
    torch.manual_seed(0)
    head = HEADS[name]()
    phi, y = _data(name, scale=100.0)
    loss = head.loss(phi, y)
    assert bool(torch.isfinite(loss))
    loss.backward()
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in head.parameters())


def test_heteroscedastic_noise_layer_starts_inside_its_prior():
    head = HeteroscedasticVBLLRegression(D, num_data=N, noise_prior_scale=0.5)
    prior = 0.5 / D
    variances = head.noise_weights.cov.matrix().diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(variances, torch.full_like(variances, 0.01 * prior))
    assert head.noise_weights.prior_variance == pytest.approx(prior)


def test_heteroscedastic_overflow_is_an_error_not_inf():
    torch.manual_seed(0)
    head = HeteroscedasticVBLLRegression(D, num_data=N)
    phi, y = _data("heteroscedastic", scale=1e5)  # log-noise variance ~ 1e6: exp overflows
    with pytest.raises(RuntimeError, match="overflow"):
        head.loss(phi, y)


@pytest.mark.parametrize("name", ["heteroscedastic", "generative"])
def test_float64_features_into_float32_heads(name):
    torch.manual_seed(0)
    head = HEADS[name]()
    phi, y = _data(name)
    phi64 = phi.double()
    y64 = y.double() if y.is_floating_point() else y
    head.fit((phi64, y64), epochs=3, seed=0)  # fit casts to the head's dtype
    assert all(math.isfinite(v) for v in head.history_)
    post = head.posterior(phi64)  # computed and answered in float64
    assert post.mean.dtype == torch.float64
    reference = head.posterior(phi)
    torch.testing.assert_close(post.mean.float(), reference.mean, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="features have dtype torch.float64"):
        head.loss(phi64, y64)


def _closed_form_reference(phi: torch.Tensor, y: torch.Tensor, noise: float, prior: float):
    """Bayesian linear regression posterior with an offset under a flat prior (dense)."""
    n, d = phi.shape
    A = torch.cat([phi, torch.ones(n, 1, dtype=phi.dtype)], 1)
    precision = A.T @ A / noise
    precision[:d, :d] += torch.eye(d, dtype=phi.dtype) / prior
    return torch.linalg.solve(precision, A.T @ y / noise)


def test_fit_closed_form_with_one_sample():
    phi = torch.tensor([[0.3, -1.2, 0.5, 2.0]], dtype=torch.float64)
    y = torch.tensor([1.7], dtype=torch.float64)
    head = VBLLRegression(D, num_data=1).double()
    # the offset takes the only degree of freedom: nothing is left to learn the noise from
    with pytest.raises(ValueError, match="2 samples"):
        head.fit_closed_form(phi, y, learn_noise=True)
    with pytest.raises(ValueError, match="2 samples"):
        head.fit((phi, y), closed_form=True)
    # with the noise and the prior fixed, one sample has an exact answer: the offset is y
    head.fit_closed_form(phi, y, learn_noise=False)
    post = head.posterior(phi, observation_noise=True)
    torch.testing.assert_close(post.mean[:, 0], y)
    assert bool(torch.isfinite(post.variance).all())
    # without an offset one sample does identify the weights (and the noise shrinks to its floor)
    nobias = VBLLRegression(D, num_data=1, bias=False).double()
    info = nobias.fit_closed_form(phi, y, learn_noise=True, learn_prior=True)
    assert bool(torch.isfinite(info["log_evidence"]).all())
    assert float(info["noise_variance"]) > 0


def test_fit_closed_form_with_constant_targets_is_finite_and_exact():
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(30, D, generator=g, dtype=torch.float64)
    for level in (0.0, 3.5):
        y = torch.full((30,), level, dtype=torch.float64)
        head = VBLLRegression(D, num_data=30).double()
        info = head.fit_closed_form(phi, y, learn_noise=True, learn_prior=True)
        assert all(bool(torch.isfinite(v).all()) for v in info.values())
        assert float(info["noise_variance"]) > 0
        post = head.posterior(phi, observation_noise=True)
        # the exact posterior mean of a constant target is the constant (weights at 0)
        torch.testing.assert_close(post.mean[:, 0], y, rtol=0, atol=1e-6)
        assert bool(torch.isfinite(post.variance).all()) and bool((post.variance > 0).all())
        w = _closed_form_reference(phi, y, float(info["noise_variance"]), 1.0)
        torch.testing.assert_close(head.weights.mean[0], w[:D], rtol=0, atol=1e-6)


def test_vbll_regressor_on_constant_targets_and_two_samples():
    X = np.random.default_rng(0).uniform(-2, 2, (30, 3))
    for hidden in ((), (8,)):
        est = VBLLRegressor(hidden_sizes=hidden, epochs=2, random_state=0)
        mean, std = est.fit(X, np.full(30, 3.5)).predict(X, return_std=True)
        np.testing.assert_allclose(mean, 3.5, atol=1e-4)
        assert np.isfinite(std).all() and (std > 0).all()
    est = VBLLRegressor(hidden_sizes=(), random_state=0).fit(X[:2], [1.0, 2.0])
    mean, std = est.predict(X[:2], return_std=True)
    assert np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()


@pytest.mark.parametrize("head", ["discriminative", "generative"])
def test_classifier_log_prob_with_original_labels_points_to_classes(head):
    X = np.random.default_rng(0).uniform(-2, 2, (30, 3))
    labels = np.array(["a", "b", "c"])[np.arange(30) % 3]
    est = VBLLClassifier(hidden_sizes=(), head=head, random_state=0).fit(X, labels)
    post = est.posterior(X)
    with pytest.raises(ValueError, match="classes_"):
        post.log_prob(labels)
    indices = torch.as_tensor(np.searchsorted(est.classes_, labels))
    assert bool(torch.isfinite(post.log_prob(indices)).all())


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error without CUDA")
@pytest.mark.parametrize("Est", [VBLLRegressor, VBLLClassifier])
def test_unavailable_cuda_device_names_the_argument(Est):
    X = np.random.default_rng(0).uniform(-2, 2, (12, 3))
    y = np.arange(12) % 2
    with pytest.raises(ValueError, match="device='cuda'.*CUDA is not available"):
        Est(hidden_sizes=(), epochs=1, device="cuda").fit(X, y)

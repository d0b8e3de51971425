"""Behaviour every VBLL head shares: serialisation, validation, shapes and dtypes.

Round trips are compared bit-for-bit (``atol=rtol=0``): a loaded state dict reproduces every
tensor exactly and the forward computations are deterministic on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from bdl.lastlayer import (
    GenerativeVBLLClassification,
    HeteroscedasticVBLLRegression,
    VBLLClassification,
    VBLLRegression,
)

D = 4

# (class, constructor kwargs, output width, kind of target)
HEADS = [
    (VBLLRegression, {"out_features": 2}, 2, "real"),
    (VBLLRegression, {"out_features": 1, "covariance": "lowrank", "rank": 2}, 1, "real"),
    (
        VBLLRegression,
        {"out_features": 2, "covariance": "diagonal", "learn_noise": False},
        2,
        "real",
    ),
    (HeteroscedasticVBLLRegression, {"out_features": 2}, 2, "real"),
    (HeteroscedasticVBLLRegression, {"noise_covariance": "dense", "bias": False}, 1, "real"),
    (VBLLClassification, {"num_classes": 3}, 3, "label"),
    (VBLLClassification, {"num_classes": 3, "covariance": "lowrank", "rank": 2}, 3, "label"),
    (VBLLClassification, {"num_classes": 2, "predictive": "mc", "num_samples": 5}, 2, "label"),
    (GenerativeVBLLClassification, {"num_classes": 3}, 3, "label"),
]
IDS = [f"{cls.__name__}-{i}" for i, (cls, *_rest) in enumerate(HEADS)]


def build(cls, kwargs, num_data=20, dtype=None):
    head = cls(D, **kwargs, num_data=num_data)
    return head if dtype is None else head.to(dtype)


def targets(kind, width, n, g, dtype=torch.float32):
    if kind == "label":
        return torch.randint(width, (n,), generator=g)
    return torch.randn(n, width, generator=g, dtype=dtype)


def posterior(head, x):
    if isinstance(head, VBLLClassification):
        return head.posterior(x, generator=torch.Generator().manual_seed(0))
    return head.posterior(x)


def randomise(head, g):
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize(("cls", "kwargs", "width", "kind"), HEADS, ids=IDS)
def test_state_dict_round_trip(cls, kwargs, width, kind):
    g = torch.Generator().manual_seed(0)
    head = build(cls, kwargs)
    randomise(head, g)
    x = torch.randn(7, D, generator=g)
    y = targets(kind, width, 7, g)
    torch.manual_seed(123)  # a different init for the copy: everything must come from the dict
    copy = build(cls, kwargs)
    copy.load_state_dict(head.state_dict())
    torch.testing.assert_close(copy.loss(x, y), head.loss(x, y), rtol=0, atol=0)
    a, b = posterior(head, x), posterior(copy, x)
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
    torch.testing.assert_close(a.variance, b.variance, rtol=0, atol=0)


def test_learned_prior_survives_state_dict():
    # fit_closed_form(learn_prior=True) changes s_p: a saved head must remember it
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, D, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([3.0, -2.0, 1.0, 4.0], dtype=torch.float64)
    y = y + 0.1 * torch.randn(30, generator=g, dtype=torch.float64)
    head = VBLLRegression(D, num_data=30).double()
    head.fit_closed_form(x, y, learn_prior=True)
    assert head.weights.prior_variance > 1.0  # far from the default 1/d
    copy = VBLLRegression(D, num_data=30).double()
    copy.load_state_dict(head.state_dict())
    assert copy.weights.prior_variance == head.weights.prior_variance
    torch.testing.assert_close(copy.loss(x, y), head.loss(x, y), rtol=0, atol=0)


@pytest.mark.parametrize(("cls", "kwargs", "width", "kind"), HEADS, ids=IDS)
def test_loss_needs_num_data(cls, kwargs, width, kind):
    g = torch.Generator().manual_seed(2)
    head = build(cls, kwargs, num_data=None)
    x, y = torch.randn(5, D, generator=g), targets(kind, width, 5, g)
    with pytest.raises(ValueError, match="num_data"):
        head.loss(x, y)
    head.num_data = 5  # can be set later
    assert torch.isfinite(head.loss(x, y))


@pytest.mark.parametrize(("cls", "kwargs", "width", "kind"), HEADS, ids=IDS)
def test_bad_inputs_raise(cls, kwargs, width, kind):
    g = torch.Generator().manual_seed(3)
    head = build(cls, kwargs)
    x, y = torch.randn(5, D, generator=g), targets(kind, width, 5, g)
    with pytest.raises(ValueError, match="features"):
        head.loss(torch.randn(5, D + 1), y)
    with pytest.raises(ValueError, match="features"):
        head.posterior(torch.randn(5, D - 1))
    with pytest.raises(ValueError, match="features"):
        head.loss(x.numpy(), y)
    with pytest.raises(ValueError, match="y"):
        head.loss(x, y[:4])  # wrong length
    if kind == "label":
        with pytest.raises(ValueError, match="y"):
            head.loss(x, y.double())  # float labels
        with pytest.raises(ValueError, match="y"):
            head.loss(x, y.unsqueeze(-1))  # (n, 1) labels
        with pytest.raises(ValueError, match="y"):
            head.loss(x, torch.tensor([0, 1, width, 0, 1]))  # out of range
        with pytest.raises(ValueError, match="y"):
            head.loss(x, torch.tensor([0, 1, -1, 0, 1]))
        with pytest.raises(ValueError, match="y"):
            head.loss(x, y.bool())
    else:
        with pytest.raises(ValueError, match="y"):
            head.loss(x, torch.randn(5, width + 1))
        with pytest.raises(ValueError, match="y"):
            head.loss(x, torch.randn(5, width, 1))
        with pytest.raises(ValueError, match="y"):
            head.loss(x, y.tolist())


def test_nan_features_are_refused_by_the_loss():
    # a NaN input makes the loss NaN, never a silently finite one; the loss checks its own
    # finiteness (one host sync per call) and then names the input responsible
    x = torch.randn(4, D)
    x[0, 0] = float("nan")
    y = torch.randn(4, 1)
    for head in (VBLLRegression(D, num_data=4), HeteroscedasticVBLLRegression(D, num_data=4)):
        with pytest.raises(ValueError, match="features"):
            head.loss(x, y)
    labels = torch.tensor([0, 1, 0, 1])
    for head in (
        VBLLClassification(D, 2, num_data=4),
        GenerativeVBLLClassification(D, 2, num_data=4),
    ):
        with pytest.raises(ValueError, match="features"):
            head.loss(x, labels)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: VBLLRegression(D, covariance="foo"), "covariance"),
        (lambda: VBLLRegression(D, prior_scale=0.0), "prior_scale"),
        (lambda: VBLLRegression(D, prior_scale=-1.0), "prior_scale"),
        (lambda: VBLLRegression(D, noise_std=0.0), "noise_std"),
        (lambda: VBLLRegression(D, wishart_scale=-1.0), "wishart_scale"),
        (lambda: VBLLRegression(0), "in_features"),
        (lambda: VBLLRegression(D, 0), "out_features"),
        (lambda: VBLLRegression(D, num_data=0), "num_data"),
        (lambda: VBLLRegression(D, num_data=2.5), "num_data"),
        (lambda: VBLLRegression(D, covariance="lowrank", rank=0), "rank"),
        (lambda: HeteroscedasticVBLLRegression(D, covariance="foo"), "covariance"),
        (lambda: HeteroscedasticVBLLRegression(D, noise_covariance="foo"), "noise_covariance"),
        (lambda: HeteroscedasticVBLLRegression(D, noise_prior_scale=0.0), "noise_prior_scale"),
        (lambda: HeteroscedasticVBLLRegression(D, prior_scale=0.0), "prior_scale"),
        (lambda: VBLLClassification(D, 1), "num_classes"),
        (lambda: VBLLClassification(D, 3, covariance="foo"), "covariance"),
        (lambda: VBLLClassification(D, 3, predictive="probit"), "predictive"),
        (lambda: VBLLClassification(D, 3, num_samples=0), "num_samples"),
        (lambda: VBLLClassification(D, 3, prior_scale=0.0), "prior_scale"),
        (lambda: GenerativeVBLLClassification(D, 1), "num_classes"),
        (lambda: GenerativeVBLLClassification(D, 3, prior_scale=-2.0), "prior_scale"),
        (lambda: GenerativeVBLLClassification(D, 3, noise_std=0.0), "noise_std"),
    ],
)
def test_bad_constructor_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize(("cls", "kwargs", "width", "kind"), HEADS, ids=IDS)
def test_leading_batch_dims(cls, kwargs, width, kind):
    head = build(cls, kwargs)
    x = torch.randn(3, 5, D)
    post = posterior(head, x)
    assert post.mean.shape == (3, 5, width)
    assert post.variance.shape == (3, 5, width)
    # the same numbers as the flattened batch
    flat = posterior(head, x.reshape(15, D))
    torch.testing.assert_close(post.mean.reshape(15, width), flat.mean, rtol=1e-6, atol=1e-7)
    out = head(x)
    assert out.shape == (3, 5, width)
    if isinstance(head, VBLLRegression | HeteroscedasticVBLLRegression):
        noisy = head.posterior(x, observation_noise=True)
        assert bool((noisy.variance > post.variance).all())
        with pytest.raises(ValueError, match="features"):
            head.posterior(torch.randn(D))  # a single vector has no point axis


@pytest.mark.parametrize(("cls", "kwargs", "width", "kind"), HEADS, ids=IDS)
def test_dtypes(cls, kwargs, width, kind):
    g = torch.Generator().manual_seed(4)
    head = build(cls, kwargs)
    x, y = torch.randn(6, D, generator=g), targets(kind, width, 6, g)
    loss32 = head.loss(x, y)
    assert loss32.dtype == torch.float32 and torch.isfinite(loss32)
    loss32.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in head.parameters())
    head64 = build(cls, kwargs, dtype=torch.float64)
    head64.load_state_dict(head.state_dict())  # float32 dict into a float64 head
    assert all(p.dtype == torch.float64 for p in head64.parameters())
    assert all(b.dtype == torch.float64 for b in head64.buffers() if b.is_floating_point())
    x64 = x.double()
    y64 = y.double() if kind == "real" else y
    loss64 = head64.loss(x64, y64)
    assert loss64.dtype == torch.float64
    # float32 vs float64 on the same parameters: float32 round-off, relative ~1e-6
    torch.testing.assert_close(loss64.float(), loss32.detach(), rtol=1e-4, atol=1e-5)
    post = posterior(head64, x64)
    assert post.mean.dtype == torch.float64


def test_regression_fit_closed_form_float32():
    # the solve runs in float64 internally and is cast back
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, D, generator=g)
    y = x @ torch.tensor([1.0, 0.0, -1.0, 2.0]) + 0.3 + 0.1 * torch.randn(40, generator=g)
    head = VBLLRegression(D, num_data=40)
    out = head.fit_closed_form(x, y)
    assert head.weights.mean.dtype == torch.float32
    assert out["log_evidence"].dtype == torch.float64
    assert math.isfinite(head.loss(x, y).item())
    assert (head(x)[:, 0] - y).pow(2).mean().sqrt() < 0.15


@pytest.mark.parametrize(
    "make",
    [
        lambda: VBLLRegression(3, 1, num_data=10),
        lambda: VBLLClassification(3, 2, num_data=10),
        lambda: GenerativeVBLLClassification(3, 2, num_data=10),
        lambda: HeteroscedasticVBLLRegression(3, 1, num_data=10),
    ],
)
def test_posterior_rejects_non_finite_features(make):
    phi = torch.ones(4, 3)
    phi[1, 2] = float("nan")
    with pytest.raises(ValueError, match="features"):
        make().posterior(phi)


def test_closed_form_rejects_non_finite_inputs():
    head = VBLLRegression(3, 1, num_data=10)
    phi, y = torch.randn(6, 3), torch.randn(6)
    with pytest.raises(ValueError, match="features"):
        head.fit_closed_form(phi.masked_fill(phi > 1, float("inf")), y)
    with pytest.raises(ValueError, match="y"):
        head.fit_closed_form(phi, y.masked_fill(y > 0, float("nan")))


def test_fit_closed_form_keeps_a_fixed_noise():
    head = VBLLRegression(3, 1, num_data=20, noise_std=0.5, learn_noise=False)
    phi = torch.randn(20, 3)
    head.fit_closed_form(phi, phi[:, 0] + 0.01 * torch.randn(20))
    torch.testing.assert_close(head.noise_variance, torch.tensor([0.25]))

"""The VBLL heads, ``wrap`` results and ``VBLLNetwork`` as :class:`bdl.core.Model`\\ s.

What the shared contract suite (``tests/core``) does not cover: ``fit`` of each head,
dtype promotion with exact equality to a float64 copy, batched joint covariances, the
heteroscedastic noise, and the classification-specific arguments.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bdl.core import Model
from bdl.lastlayer import (
    GenerativeVBLLClassification,
    HeteroscedasticVBLLRegression,
    VBLLClassification,
    VBLLNetwork,
    VBLLRegression,
    wrap,
)
from bdl.lastlayer.regression import interleave_block_diagonal

D = 4
HEADS = [
    (lambda: VBLLRegression(D, 2), "real"),
    (lambda: VBLLRegression(D, 1, covariance="lowrank", rank=2), "real"),
    (lambda: HeteroscedasticVBLLRegression(D, 2), "real"),
    (lambda: VBLLClassification(D, 3), "label"),
    (lambda: VBLLClassification(D, 3, covariance="diagonal"), "label"),
    (lambda: GenerativeVBLLClassification(D, 3), "label"),
]
IDS = ["regression", "regression-lowrank", "heteroscedastic", "dvbll", "dvbll-diag", "gvbll"]


def _data(kind, n=50, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=dtype)
    if kind == "label":
        return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    y = torch.stack([x[:, 0] - x[:, 1], torch.sin(x[:, 2])], -1)
    return x, y + 0.1 * torch.randn(n, 2, generator=g, dtype=dtype)


def _targets_for(head, y):
    return y[:, :1] if isinstance(head, VBLLRegression) and head.out_features == 1 else y


@pytest.mark.parametrize(("make", "kind"), HEADS, ids=IDS)
def test_heads_are_models_with_fit(make, kind):
    torch.manual_seed(0)
    head = make()
    assert isinstance(head, Model) and head.batch_shape == torch.Size([])
    x, y = _data(kind)
    y = _targets_for(head, y)
    out = head.fit((x, y), epochs=30, lr=1e-2, batch_size=16, seed=0)
    assert out is head and head.num_data == 50
    assert len(head.history_) == 30 and head.history_[-1] < head.history_[0]
    # the same seed and initialisation give the same fit
    torch.manual_seed(0)
    again = make().fit((x, y), epochs=30, lr=1e-2, batch_size=16, seed=0)
    assert again.history_ == head.history_
    with pytest.raises(ValueError, match="data"):
        make().fit(x)
    with pytest.raises(ValueError, match="different lengths"):
        make().fit((x, y[:-1]))


@pytest.mark.parametrize(("make", "kind"), HEADS, ids=IDS)
def test_fit_inside_no_grad_and_from_float64_features(make, kind):
    head = make()
    x, y = _data(kind, dtype=torch.float64)  # cast to the (float32) head's dtype
    with torch.no_grad():
        head.fit((x, _targets_for(head, y)), epochs=2, seed=0)
    assert len(head.history_) == 2
    assert all(p.dtype == torch.float32 for p in head.parameters())


@pytest.mark.parametrize(("make", "kind"), HEADS, ids=IDS)
def test_float32_head_answers_float64_features_in_float64(make, kind):
    torch.manual_seed(1)
    head = make()
    x, _ = _data(kind, n=7, seed=3, dtype=torch.float64)
    x = x.reshape(1, 7, D).expand(2, 7, D).clone().requires_grad_(True)
    post = head.posterior(x)
    assert post.mean.dtype == torch.float64 and post.variance.dtype == torch.float64
    # exactly what a float64 copy of the head computes
    head64 = copy.deepcopy(head).double()
    ref = head64.posterior(x)
    torch.testing.assert_close(post.mean, ref.mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(post.variance, ref.variance, rtol=1e-12, atol=1e-14)
    post.mean.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert all(p.dtype == torch.float32 for p in head.parameters())  # the head is untouched
    # float32 features of a float64 head: computed in float64, answered in float32
    low = head64.posterior(x.detach().float())
    assert low.mean.dtype == torch.float32
    torch.testing.assert_close(low.mean, ref.mean.detach().float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("make", "kind"), HEADS, ids=IDS)
def test_posterior_arguments(make, kind):
    head = make()
    x = torch.randn(5, D)
    with pytest.raises(TypeError):
        head.posterior(x, True)
    if kind == "label":
        with pytest.raises(ValueError, match="joint"):
            head.posterior(x, joint=True)
        torch.testing.assert_close(
            head.posterior(x, observation_noise=True).probs, head.posterior(x).probs
        )


@pytest.mark.parametrize(
    "make",
    [lambda: VBLLRegression(D, 2), lambda: HeteroscedasticVBLLRegression(D, 2)],
    ids=["regression", "heteroscedastic"],
)
@pytest.mark.parametrize("observation_noise", [False, True])
def test_batched_joint_covariance(make, observation_noise):
    torch.manual_seed(2)
    head = make().double()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    joint = head.posterior(x, observation_noise=observation_noise, joint=True)
    assert joint.covariance_matrix.shape == (3, 10, 10)
    for b in range(3):
        single = head.posterior(x[b], observation_noise=observation_noise, joint=True)
        torch.testing.assert_close(joint.covariance_matrix[b], single.covariance_matrix)
    marginal = head.posterior(x, observation_noise=observation_noise)
    torch.testing.assert_close(joint.variance, marginal.variance)


def test_heteroscedastic_observation_noise_is_the_expected_noise():
    torch.manual_seed(3)
    head = HeteroscedasticVBLLRegression(D, 2).double()
    with torch.no_grad():
        head.noise_weights.mean.normal_()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    latent, noisy = head.posterior(x), head.posterior(x, observation_noise=True)
    torch.testing.assert_close(noisy.mean, latent.mean)
    torch.testing.assert_close(noisy.variance - latent.variance, head.noise_variance(x))


def test_interleave_block_diagonal_batched():
    blocks = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    joint = interleave_block_diagonal(blocks)
    assert joint.shape == (2, 12, 12)
    for b in range(2):
        for j in range(3):
            torch.testing.assert_close(joint[b, j::3, j::3], blocks[b, j])
        off = joint[b].reshape(4, 3, 4, 3)
        mask = ~torch.eye(3, dtype=torch.bool)
        assert bool((off.permute(1, 3, 0, 2)[mask] == 0).all())


def test_regression_closed_form_fit():
    x, y = _data("real", dtype=torch.float64)
    head = VBLLRegression(D, 2).double().fit((x, y), closed_form=True)
    ref = VBLLRegression(D, 2, num_data=50).double()
    ref.fit_closed_form(x, y)
    torch.testing.assert_close(head.weights.mean, ref.weights.mean)
    torch.testing.assert_close(head.noise_variance, ref.noise_variance)
    assert head.num_data == 50 and len(head.history_) == 1
    with torch.no_grad():
        assert head.history_[0] == pytest.approx(float(ref.loss(x, y)))


def test_network_posterior_is_head_posterior_of_features():
    torch.manual_seed(4)
    body = nn.Sequential(nn.Linear(3, 8), nn.Tanh())
    net = VBLLNetwork(body, VBLLRegression(8, 1))
    x = torch.randn(40, 3)
    y = x.sum(-1, keepdim=True)
    assert net.fit((x, y), epochs=3, seed=0) is net and len(net.history_) == 3
    assert net.head.num_data == 40 and net.num_outputs == 1
    xq = torch.randn(2, 5, 3)
    post = net.posterior(xq, observation_noise=True, joint=True)
    with torch.no_grad():
        ref = net.head.posterior(body(xq), observation_noise=True, joint=True)
    torch.testing.assert_close(post.covariance_matrix, ref.covariance_matrix)


def test_wrapper_is_a_model():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(60, 3), torch.randint(0, 3, (60,))
    model = wrap(net, "classification").fit((x, y), epochs=2, seed=0)
    assert isinstance(model, Model) and model.num_outputs == 3
    assert model.batch_shape == torch.Size([])
    with pytest.raises(ValueError, match="joint"):
        model.posterior(x[:4], joint=True)
    with pytest.raises(TypeError):
        model.posterior(x[:4], True)
    batched = model.posterior(x[:6].reshape(2, 3, 3))
    torch.testing.assert_close(batched.probs.reshape(6, 3), model.posterior(x[:6]).probs)
    # the same seed gives the same head
    again = wrap(net, "classification").fit((x, y), epochs=2, seed=0)
    assert again.history_ == model.history_

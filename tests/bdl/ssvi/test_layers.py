"""Sparse Bayesian layers and networks: storage, kernels, draws, saving, accounting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bdl.ssvi import SparseBayesConv2d, SparseBayesLinear, flops, sparsify


def _cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 64, 10),
    )  # fmt: skip


def test_only_active_weights_are_stored():
    layer = SparseBayesLinear(100, 50, density=0.1)
    assert layer.mu.numel() == layer.rho_raw.numel() == layer.index.numel() == 500
    assert layer.mask().sum() == 500 and layer.dense_mean()[~layer.mask()].abs().sum() == 0
    dense = SparseBayesLinear(100, 50, density=1.0)
    assert dense.mu.numel() == 5000


def test_auto_kernel_choice():
    assert SparseBayesLinear(512, 512, density=0.05).uses_csr()
    assert not SparseBayesLinear(512, 512, density=0.3).uses_csr()
    assert not SparseBayesLinear(64, 64, density=0.05).uses_csr()
    with pytest.raises(ValueError, match="sparse_kernel"):
        SparseBayesLinear(8, 8, sparse_kernel="always")


def test_sparse_kernel_equals_the_dense_product():
    torch.manual_seed(0)
    layer = SparseBayesLinear(40, 30, density=0.2, sparse_kernel=True).eval()
    x = torch.randn(7, 5, 40)
    with torch.no_grad():
        sparse = layer(x)
        layer.sparse_kernel = False
        torch.testing.assert_close(sparse, layer(x))


def test_conv_network_first_layer_dense_and_shapes():
    net = sparsify(_cnn(), 0.1, seed=0)
    first, second = net.layers[0], net.layers[1]
    assert isinstance(first, SparseBayesConv2d) and first.density == 1.0
    assert second.density == pytest.approx(0.1, abs=1e-3)
    post = net.posterior(torch.randn(4, 1, 8, 8), num_samples=3)
    assert post.probs.shape == (4, 10) and post.prob_samples.shape == (3, 4, 10)


def test_function_draws_are_deterministic_and_differentiable():
    net = sparsify(
        nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)), 0.5, task="regression", seed=0
    )
    f = net.sample_functions(4, seed=1)
    X = torch.randn(2, 5, 3, requires_grad=True)
    values = f(X)
    assert values.shape == (4, 2, 5, 1)
    torch.testing.assert_close(values, f(X))
    (grad,) = torch.autograd.grad(values.sum(), X)
    assert bool(torch.isfinite(grad).all())
    torch.testing.assert_close(
        net.posterior(X.detach(), num_samples=4, seed=1).samples, values.detach()
    )


def test_state_dict_round_trip_keeps_the_support():
    net = sparsify(_cnn(), 0.2, seed=0)
    other = sparsify(_cnn(), 0.2, seed=1)
    assert not torch.equal(net.layers[1].index, other.layers[1].index)
    other.load_state_dict(net.state_dict())
    for a, b in zip(net.layers, other.layers, strict=False):
        assert torch.equal(a.mask(), b.mask())
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(net.posterior(x).probs, other.posterior(x).probs)


def test_flops_and_parameters_scale_with_density():
    x = torch.randn(2, 1, 8, 8)
    sparse = flops(sparsify(_cnn(), 0.1, seed=0), x)["total"]
    dense = flops(sparsify(_cnn(), 1.0, seed=0), x)["total"]
    assert dense["train_ratio"] == 1.0
    assert dense["param_ratio"] == pytest.approx(1.5, abs=0.01)  # the float32 layer's index
    assert sparse["inference_ratio"] < 0.2 and sparse["param_ratio"] < 0.2
    mlp = flops(
        sparsify(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), 0.1, seed=0),
        x.flatten(1),
    )
    assert mlp["total"]["inference_ratio"] == pytest.approx(0.1, abs=0.01)


def test_erk_allocation_keeps_the_budget_and_favours_small_layers():
    from bdl.ssvi.network import layer_densities

    mlp = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    net = sparsify(mlp, 0.1, allocation="erk", seed=0)
    dens = [m.density for m in net.layers]
    assert dens[2] > dens[0] > dens[1]  # the thin output layer gets the most
    assert net.density == pytest.approx(0.1, abs=1e-3)
    capped = layer_densities(nn.Sequential(nn.Linear(2, 2), nn.Linear(500, 500)), 0.5, "erk", None)
    assert max(capped.values()) == 1.0
    with pytest.raises(ValueError, match="allocation"):
        sparsify(mlp, 0.1, allocation="random")

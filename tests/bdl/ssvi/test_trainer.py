"""SSVI against its gold standards: dense and fixed-support mean-field VI, the sparse Bayesian
linear-regression posterior; the density and optimiser-state invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdl.ssvi import SSVI, sparsify
from bdl.ssvi.layers import LRT_EPS


def _data(n=96, d=6, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen)
    y = (X @ torch.randn(d, classes, generator=gen)).argmax(-1)
    return X, y


def _arch(d=6, classes=3):
    return nn.Sequential(nn.Linear(d, 12), nn.ReLU(), nn.Linear(12, classes))


class MaskedMeanFieldMLP(nn.Module):
    """Reference mean-field VI with dense tensors and a fixed mask (local reparameterisation),
    written independently of the slot storage."""

    def __init__(self, net) -> None:
        super().__init__()
        self.masks = [m.mask() for m in net.layers]
        self.mu = nn.ParameterList(
            [nn.Parameter(m.dense_mean().detach().clone()) for m in net.layers]
        )
        self.rho = nn.ParameterList(
            [nn.Parameter(m._scatter(m.rho_raw.detach()).clone()) for m in net.layers]
        )
        self.bmu = nn.ParameterList([nn.Parameter(m.bias_mu.detach().clone()) for m in net.layers])
        self.brho = nn.ParameterList(
            [nn.Parameter(m.bias_rho_raw.detach().clone()) for m in net.layers]
        )
        self.prior = net.layers[0].prior_std

    def forward(self, x):
        for i in range(len(self.mu)):
            w_mu = self.mu[i] * self.masks[i]
            w_var = (F.softplus(self.rho[i]) * self.masks[i]) ** 2
            mean = F.linear(x, w_mu, self.bmu[i])
            var = F.linear(x * x, w_var, F.softplus(self.brho[i]) ** 2)
            x = mean + torch.sqrt(var + LRT_EPS) * torch.randn_like(mean)
            if i < len(self.mu) - 1:
                x = torch.relu(x)
        return x

    def kl(self):
        total = 0.0
        for i in range(len(self.mu)):
            m = self.masks[i]
            for mu, sd in (
                (self.mu[i][m], F.softplus(self.rho[i][m])),
                (self.bmu[i], F.softplus(self.brho[i])),
            ):
                r = (sd / self.prior) ** 2
                total = total + 0.5 * (r + (mu / self.prior) ** 2 - 1 - r.log()).sum()
        return total


def _train_reference(ref, X, y, epochs, lr, batch, seed, kl_warm_steps):
    opt = torch.optim.Adam(ref.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    torch.manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(X), generator=gen).split(batch):
            step += 1
            loss = F.cross_entropy(ref(X[idx]), y[idx]) + min(
                1.0, step / kl_warm_steps
            ) * ref.kl() / len(X)
            opt.zero_grad()
            loss.backward()
            for p, m in zip(
                ref.mu, ref.masks, strict=False
            ):  # masked VI: inactive gradients are zero
                p.grad *= m
            for p, m in zip(ref.rho, ref.masks, strict=False):
                p.grad *= m
            opt.step()


@pytest.mark.parametrize("density, alpha", [(1.0, 0.3), (0.4, 0.0)])
def test_equals_mean_field_vi_on_a_dense_or_fixed_support(density, alpha):
    """Density 1 is dense mean-field VI; alpha = 0 is masked VI on the initial support."""
    X, y = _data()
    torch.manual_seed(0)
    net = sparsify(_arch(), density, seed=0)
    ref = MaskedMeanFieldMLP(net)
    epochs, batch = 4, 16
    total = epochs * math.ceil(len(X) / batch)
    SSVI(net, alpha=alpha, update_every=3).fit(
        (X, y), epochs=epochs, lr=1e-2, batch_size=batch, seed=5
    )
    _train_reference(ref, X, y, epochs, 1e-2, batch, 5, 0.5 * total)
    for layer, mu, rho, mask in zip(net.layers, ref.mu, ref.rho, ref.masks, strict=False):
        assert torch.equal(layer.mask(), mask)
        # same arithmetic up to summation order of the KL
        torch.testing.assert_close(layer.dense_mean(), mu.detach() * mask, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            layer.dense_std(), F.softplus(rho.detach()) * mask, rtol=1e-5, atol=1e-6
        )


def test_density_and_optimiser_state_invariants():
    X, y = _data(n=128)
    net = sparsify(_arch(), 0.3, seed=0)
    trainer = SSVI(net, alpha=0.5, update_every=2)
    expected = [round(0.3 * m.numel) for m in net.layers]
    checks = []
    original = trainer.update_topology

    def checked(xb, yb):
        before = [m.index.clone() for m in net.layers]
        original(xb, yb)
        for layer, count, old in zip(net.layers, expected, before, strict=False):
            assert layer.num_active == count and layer.mask().sum() == count
            assert bool((layer.index[1:] > layer.index[:-1]).all())  # unique, sorted
            grown = ~torch.isin(layer.index, old)
            for p in (layer.mu, layer.rho_raw):
                state = trainer.optimizer.state[p]
                assert bool((state["exp_avg"][grown] == 0).all())
                assert bool((state["exp_avg_sq"][grown] == 0).all())
            assert bool((layer.mu.detach()[grown] == 0).all())
            assert bool((layer.dense_mean()[~layer.mask()] == 0).all())
        checks.append(
            sum(
                int((~torch.isin(m.index, o)).sum())
                for m, o in zip(net.layers, before, strict=False)
            )
        )

    trainer.update_topology = checked
    trainer.fit((X, y), epochs=6, batch_size=16, seed=0)
    assert len(checks) > 5 and sum(checks) > 0  # the support moved
    assert all(u["step"] < 0.75 * 48 for u in trainer.updates_)


def test_sparse_linear_regression_recovers_the_support():
    """y = X w* with 10 % non-zeros: SSVI at density 0.1 finds the support, and its means
    match the Bayesian linear-regression posterior restricted to that support."""
    gen = torch.Generator().manual_seed(0)
    n, d, noise = 400, 50, 0.1
    support = torch.tensor([3, 11, 20, 34, 47])
    w = torch.zeros(d)
    w[support] = torch.tensor([1.5, -2.0, 1.0, 0.8, -1.2])
    X = torch.randn(n, d, generator=gen)
    y = X @ w + noise * torch.randn(n, generator=gen)
    net = sparsify(nn.Linear(d, 1, bias=False), 0.1, task="regression", noise_std=noise, seed=0)
    net.log_noise_std.requires_grad_(False)  # the noise known, as in the reference posterior
    SSVI(net, alpha=0.5, update_every=10, kl_warmup=0.0).fit(
        (X, y), epochs=200, lr=5e-2, batch_size=100, seed=0
    )
    layer = net.layers[0]
    assert torch.equal(layer.index.sort().values, support)
    Xs = X[:, support].double()
    precision = Xs.T @ Xs / noise**2 + torch.eye(5, dtype=torch.float64) / layer.prior_std**2
    blr_mean = torch.linalg.solve(precision, Xs.T @ y.double() / noise**2)
    blr_sd = torch.linalg.inv(precision).diagonal().sqrt()
    # stochastic optimisation of the ELBO: within a few posterior sds of the exact mean
    assert bool(((layer.mu.detach().double() - blr_mean).abs() < 3 * blr_sd).all())
    # the mean-field optimum: sd 1 / sqrt(precision_ii) (the noisy scale gradients of the
    # local reparameterisation leave it within about 20 %)
    torch.testing.assert_close(
        layer.sigma.detach().double(), 1 / precision.diagonal().sqrt(), rtol=0.25, atol=0
    )


def test_bad_arguments():
    net = sparsify(_arch(), 0.5, seed=0)
    with pytest.raises(ValueError, match="criterion"):
        SSVI(net, criterion="weights")
    with pytest.raises(ValueError, match="network must be"):
        SSVI(_arch())
    with pytest.raises(ValueError, match="density"):
        sparsify(_arch(), 0.0)
    with pytest.raises(ValueError, match="no nn.Linear"):
        sparsify(nn.ReLU())
    X, y = _data()
    with pytest.raises(ValueError, match="same number"):
        SSVI(net).fit((X, y[:5]))

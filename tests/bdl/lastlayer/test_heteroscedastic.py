"""Heteroscedastic VBLL regression: exact expected log-likelihood and predictive moments.

Tolerances
----------
Every identity checked here is exact under ``q(W) q(M)`` (Gaussian moments and the
log-normal moment ``E e^{a l} = e^{a mu_l + a^2 s_l^2 / 2}``), so Monte-Carlo estimates may
differ only by MC error. We allow 4 standard errors of each estimator (per-number false-alarm
probability ~6e-5 under the CLT; seeds are fixed):

- sample mean of ``S`` i.i.d. draws: ``sd / sqrt(S)``;
- sample variance: ``sqrt((mu_4 - var^2) / S)`` with the fourth central moment estimated from
  the same draws (the predictive is a log-normal scale mixture, not Gaussian, so the Gaussian
  formula ``var sqrt(2 / S)`` would be too small).
"""

from __future__ import annotations

import math

import pytest
import torch

from bdl.lastlayer import HeteroscedasticVBLLRegression

DT = torch.float64
D, M, B, S = 4, 2, 6, 100_000


def make_head(covariance="dense", noise_covariance="diagonal", seed=0):
    g = torch.Generator().manual_seed(seed)
    head = HeteroscedasticVBLLRegression(
        D, M, num_data=30, covariance=covariance, noise_covariance=noise_covariance, rank=2
    ).to(DT)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=g, dtype=DT))
        # keep the log-noise spread s_l^2 ~ 0.1: a log-normal with a much larger spread has
        # such heavy tails that MC moment estimates (not the head) become unreliable
        for p in head.noise_weights.parameters():
            p.mul_(0.25)
        head.noise_weights.cov.log_diag.add_(math.log(0.3))
        head.noise_offset.copy_(torch.tensor([-1.0, 0.5], dtype=DT))
    return head, g


def draw(head, phi, g, s=S):
    """Draws of (mean f = w^T phi + b, log-noise l = m^T phi + c), each (S, B, M)."""
    with torch.no_grad():
        w = head.weights.mean + head.weights.cov.sample_noise(
            torch.randn(s, M, D, generator=g, dtype=DT)
        )
        m = head.noise_weights.mean + head.noise_weights.cov.sample_noise(
            torch.randn(s, M, D, generator=g, dtype=DT)
        )
        f = phi @ w.mT + head.bias
        log_var = phi @ m.mT + head.noise_offset
    return f, log_var


@pytest.mark.parametrize(
    ("covariance", "noise_covariance"),
    [("dense", "diagonal"), ("diagonal", "dense"), ("lowrank", "lowrank")],
)
def test_expected_log_likelihood_matches_monte_carlo(covariance, noise_covariance):
    head, g = make_head(covariance, noise_covariance)
    phi = torch.randn(B, D, generator=g, dtype=DT)
    y = torch.randn(B, M, generator=g, dtype=DT)
    ell = head.expected_log_likelihood(phi, y).detach()
    f, log_var = draw(head, phi, g)
    with torch.no_grad():
        logp = -0.5 * (math.log(2 * math.pi) + log_var + (y - f).pow(2) * torch.exp(-log_var))
        vals = logp.sum(-1)  # (S, B), summed over outputs like the head
        mc, se = vals.mean(0), vals.std(0) / math.sqrt(S)
    assert bool(((ell - mc).abs() <= 4 * se).all()), (ell - mc).abs() / se
    mu_l, s_l = head.log_noise_moments(phi)
    assert 0.01 < s_l.max().item() < 1.0
    # and the ELBO / loss are assembled from it
    elbo = head.expected_log_likelihood(phi, y).sum() - head.kl_divergence()
    torch.testing.assert_close(head.elbo(phi, y), elbo)
    expected = -head.expected_log_likelihood(phi, y).mean() + head.kl_divergence() / 30
    torch.testing.assert_close(head.loss(phi, y), expected)


def test_predictive_moments_match_monte_carlo():
    head, g = make_head()
    phi = torch.randn(B, D, generator=g, dtype=DT)
    post = head.posterior(phi, observation_noise=True)
    latent = head.posterior(phi)
    f, log_var = draw(head, phi, g)
    with torch.no_grad():
        y = f + torch.exp(0.5 * log_var) * torch.randn(f.shape, generator=g, dtype=DT)
        mean, var = y.mean(0), y.var(0)
        mu4 = (y - mean).pow(4).mean(0)
        se_mean, se_var = (var / S).sqrt(), ((mu4 - var.pow(2)) / S).sqrt()
        # latent f: Gaussian, exact variance phi^T S phi; noise: log-normal mean
        var_f = f.var(0)
        se_var_f = var_f * math.sqrt(2 / (S - 1))
        noise = torch.exp(log_var)
        se_noise = noise.std(0) / math.sqrt(S)
    assert bool(((post.mean - mean).abs() <= 4 * se_mean).all())
    assert bool(((post.variance - var).abs() <= 4 * se_var).all())
    assert bool(((latent.variance - var_f).abs() <= 4 * se_var_f).all())
    assert bool(((head.noise_variance(phi) - noise.mean(0)).abs() <= 4 * se_noise).all())
    # exact decomposition: var(y) = phi^T S phi + E sigma^2(x)
    torch.testing.assert_close(post.variance, latent.variance + head.noise_variance(phi))
    quad = torch.einsum("bi,kij,bj->bk", phi, head.weights.cov.matrix(), phi)
    torch.testing.assert_close(latent.variance, quad)
    mu_l, s_l = head.log_noise_moments(phi)
    quad_m = torch.einsum("bi,kij,bj->bk", phi, head.noise_weights.cov.matrix(), phi)
    torch.testing.assert_close(s_l, quad_m)
    torch.testing.assert_close(mu_l, phi @ head.noise_weights.mean.T + head.noise_offset)


def test_deterministic_limit_is_gaussian_log_likelihood():
    # with both posteriors collapsed the ELL is log N(y | wbar^T phi + b, exp(mbar^T phi + c))
    head, g = make_head()
    with torch.no_grad():
        head.weights.cov.log_diag.fill_(-40.0)
        head.weights.cov.off_diag.zero_()
        head.noise_weights.cov.log_diag.fill_(-40.0)
    phi = torch.randn(B, D, generator=g, dtype=DT)
    y = torch.randn(B, M, generator=g, dtype=DT)
    mean = head(phi)
    sd = torch.exp(0.5 * (phi @ head.noise_weights.mean.T + head.noise_offset))
    ref = torch.distributions.Normal(mean, sd).log_prob(y).sum(-1)
    torch.testing.assert_close(head.expected_log_likelihood(phi, y), ref, rtol=0, atol=1e-10)


def test_heteroscedastic_training_smoke():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = 4 * torch.rand(400, 1, generator=g) - 2
    sd = torch.exp(0.5 * (-3.0 + 1.5 * x))  # noise sd from 0.05 (x=-2) to 1.0 (x=2)
    y = 2 * x - 1 + sd * torch.randn(400, 1, generator=g)
    head = HeteroscedasticVBLLRegression(1, 1, num_data=400, noise_prior_scale=1.0)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = head.loss(x, y).item()
    for _ in range(400):
        opt.zero_grad()
        loss = head.loss(x, y)
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0
    grid = torch.tensor([[-1.5], [1.5]])
    with torch.no_grad():
        noise = head.noise_variance(grid).sqrt()[:, 0]
        err = (head(x) - (2 * x - 1)).abs().max()
    # true sd 0.1 at x=-1.5 and 0.72 at x=1.5
    assert noise[1] > 3 * noise[0]
    assert 0.05 < noise[0] < 0.2 and 0.4 < noise[1] < 1.1
    assert err < 0.3

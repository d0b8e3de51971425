"""TrendGP (polynomial mean with a flat prior) against the dense formulas, and the
low-rank / shift operations of StateSpacePosterior it is built on.

Gold standard: Rasmussen & Williams (2006) eqs. 2.41, 2.42 and 2.45 (flat-prior limit)
with dense matrices in float64. Both sides are exact and well conditioned here
(``cond(K) <= 1 + n s^2 / noise ~ 400``), so they agree to rounding (observed ~1e-14); the
tests use 1e-10. Monte Carlo checks use 5 standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from gpytorch.kernels import MaternKernel, ScaleKernel

from gp.statespace import StateSpaceGP, TrendGP

DT = torch.float64
NOISE = 0.05


def _data(n: int = 25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(n, generator=gen, dtype=DT) * 4 - 2).values
    y = (
        0.5
        + 0.8 * t
        + 0.3 * t**2
        + torch.sin(3 * t)
        + 0.1 * torch.randn(n, generator=gen, dtype=DT)
    )
    y[4] = float("nan")  # a missing target
    return t, y


def _kernel() -> ScaleKernel:
    kernel = ScaleKernel(MaternKernel(nu=1.5)).to(DT)
    kernel.base_kernel.lengthscale = 0.7
    kernel.outputscale = 0.8
    return kernel


def _model(degree: int, method: str = "parallel") -> TrendGP:
    gp = StateSpaceGP(_kernel(), noise=NOISE, method=method).to(DT)
    gp.noise = NOISE
    return TrendGP(gp, degree).to(DT)


def _dense(model: TrendGP, t, y, ts):
    """R&W eqs. 2.41, 2.42, 2.45 with dense matrices on the observed points."""
    kernel, degree = model.kernel, model.degree
    obs = ~torch.isnan(y)
    to, yo = t[obs], y[obs]
    with torch.no_grad():
        K = kernel(to[:, None]).to_dense() + NOISE * torch.eye(len(to), dtype=DT)
        Ks = kernel(to[:, None], ts[:, None]).to_dense()
        Kss = kernel(ts[:, None]).to_dense()
    H, Hs = model.basis(to).mT, model.basis(ts).mT
    Ki = torch.linalg.inv(K)
    A = H @ Ki @ H.mT
    beta = torch.linalg.solve(A, H @ Ki @ yo)
    R = Hs - H @ Ki @ Ks
    mean = Ks.mT @ Ki @ (yo - H.mT @ beta) + Hs.mT @ beta
    cov = Kss - Ks.mT @ Ki @ Ks + R.mT @ torch.linalg.solve(A, R)
    r = yo - H.mT @ beta
    reml = -0.5 * (
        r @ Ki @ r
        + torch.logdet(K)
        + torch.logdet(A)
        + (len(yo) - degree - 1) * math.log(2 * math.pi)
    )
    return beta, mean, cov, reml


@pytest.mark.parametrize("method", ["sequential", "parallel"])
@pytest.mark.parametrize("degree", [1, 2, 3])
def test_trend_gp_equals_the_dense_flat_prior_formulas(degree, method):
    t, y = _data()
    model = _model(degree, method).fit((t, y), max_iter=0)
    ts = torch.tensor([-3.0, -1.0, 0.1, 1.5, 3.5], dtype=DT)  # in and far out of the data
    beta, mean, cov, reml = _dense(model, t, y, ts)
    with torch.no_grad():
        post = model.posterior(ts[:, None])
        lml = model.log_marginal_likelihood()
    torch.testing.assert_close(model.coef, beta, rtol=0, atol=1e-10)
    torch.testing.assert_close(post.mean[:, 0], mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(post.variance[:, 0], cov.diagonal(), rtol=0, atol=1e-10)
    torch.testing.assert_close(post.covariance_matrix, cov, rtol=0, atol=1e-10)
    torch.testing.assert_close(lml, reml, rtol=0, atol=1e-10)


def test_trend_gp_draws_have_the_joint_law():
    t, y = _data()
    model = _model(2).fit((t, y), max_iter=0)
    ts = torch.tensor([-2.5, 0.0, 0.05, 3.0], dtype=DT)
    post = model.posterior(ts[:, None], observation_noise=True)
    S = 20000
    draws = post.rsample(torch.Size([S]), generator=torch.Generator().manual_seed(1))[..., 0]
    cov = post.covariance_matrix
    emp = torch.cov(draws.mT)
    se = ((cov.diagonal()[:, None] * cov.diagonal()[None] + cov**2) / S).sqrt()
    assert bool(((emp - cov).abs() < 5 * se).all())
    assert bool(((draws.mean(0) - post.mean[:, 0]).abs() < 5 * (cov.diagonal() / S).sqrt()).all())
    assert post.base_sample_shape[-1] == 2 + 2  # d = 2 states, noise, low-rank column


def test_trend_uncertainty_grows_away_from_the_data():
    t, y = _data()
    model = _model(1).fit((t, y), max_iter=0)
    gp = model.gp
    far = torch.tensor([[3.0], [6.0], [12.0]], dtype=DT)
    with torch.no_grad():
        extra = model.posterior(far).variance - gp.posterior(far).variance
    assert bool((extra > 0).all()) and bool((extra[1:] > extra[:-1]).all())


def test_too_few_observed_targets_for_the_degree():
    t = torch.tensor([0.0, 1.0, 2.0], dtype=DT)
    y = torch.tensor([1.0, float("nan"), 2.0], dtype=DT)
    with pytest.raises(ValueError, match="mean asks for a polynomial trend of degree 2"):
        _model(2).fit((t, y), max_iter=0)


def test_posterior_shifted_and_low_rank_are_exact():
    t, y = _data()
    gp = StateSpaceGP(_kernel(), noise=NOISE).to(DT).set_data(t, y)
    ts = torch.tensor([[-1.0], [0.3], [2.5]], dtype=DT)
    post = gp.posterior(ts).affine(2.0, 1.0)
    offset = torch.tensor([[0.5], [-1.0], [2.0]], dtype=DT)
    W = torch.tensor([[1.0, 0.0], [0.5, 0.2], [0.0, 0.3]], dtype=DT)
    out = post.shifted(offset).with_low_rank(W)
    torch.testing.assert_close(out.mean, post.mean + offset)
    torch.testing.assert_close(out.variance, post.variance + (W**2).sum(-1, keepdim=True))
    torch.testing.assert_close(out.covariance_matrix, post.covariance_matrix + W @ W.mT)
    base = torch.randn((2, *out.base_sample_shape), dtype=DT)
    draws = out.rsample_from_base_samples(torch.Size([2]), base)
    ref = post.rsample_from_base_samples(torch.Size([2]), base[..., :-1])
    low = (W @ base[:, :2, -1].unsqueeze(-1)).squeeze(-1)  # first r normals of the column
    torch.testing.assert_close(draws[..., 0], ref[..., 0] + offset[:, 0] + low)
    with pytest.raises(ValueError, match="offset"):
        post.shifted(torch.zeros(5, 1, dtype=DT))
    with pytest.raises(ValueError, match="W must have shape"):
        post.with_low_rank(torch.zeros(4, 2, dtype=DT))

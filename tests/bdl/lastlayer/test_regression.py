"""VBLL regression is exactly Bayesian linear regression on fixed features.

Tolerances
----------
With fixed features, known noise and no noise prior, the ELBO of a Gaussian ``q(W)`` is a
concave quadratic-plus-log-det whose maximiser is the BLR posterior, and at that maximiser the
ELBO *equals* the log evidence (the KL gap ``KL(q || p(W | y))`` is zero). Nothing is
approximated, so every closed-form comparison is limited only by float64 round-off on
well-conditioned 5 x 5 systems (condition numbers ~1e2): ``1e-10`` absolute on posterior moments
and ``1e-8`` relative on log densities (which add ~50 terms of size ~1). A gradient fit stops
when the gradient is ~1e-9; the optimiser error in the parameters is then ~grad / curvature,
with curvature >= 1 / (n s_p) = 0.1 per datum, so ``1e-6`` is a comfortable bound.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from bdl.lastlayer import VBLLRegression

N, D = 50, 5
DT = torch.float64


def blr(phi: torch.Tensor, y: torch.Tensor, noise_var: float, prior_var: float):
    """Textbook Bayesian linear regression posterior (S*, wbar*) for one output."""
    prec = phi.T @ phi / noise_var + torch.eye(phi.shape[1], dtype=phi.dtype) / prior_var
    cov = torch.linalg.inv(prec)
    mean = cov @ phi.T @ y / noise_var
    return cov, mean


def exact_log_evidence(phi: torch.Tensor, y: torch.Tensor, noise_var, prior_var: float):
    """``log N(y | 0, s_p Phi Phi^T + sigma^2 I)`` with torch's MultivariateNormal."""
    n = phi.shape[0]
    cov = prior_var * phi @ phi.T + noise_var * torch.eye(n, dtype=phi.dtype)
    return MultivariateNormal(torch.zeros(n, dtype=phi.dtype), covariance_matrix=cov).log_prob(y)


def make_data(seed: int = 0, m: int = 1, noise_std=(0.3,)):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(N, D, generator=g, dtype=DT)
    w = torch.randn(m, D, generator=g, dtype=DT)
    noise = torch.tensor(noise_std, dtype=DT)
    y = phi @ w.T + noise * torch.randn(N, m, generator=g, dtype=DT)
    return phi, y


def make_head(m: int = 1, noise_std: float = 0.3, **kw) -> VBLLRegression:
    kw.setdefault("bias", False)
    kw.setdefault("wishart_scale", None)
    kw.setdefault("learn_noise", False)
    head = VBLLRegression(D, m, num_data=N, noise_std=noise_std, **kw).to(DT)
    # parameters are created in float32: set the noise exactly in float64 so that the
    # reference sigma^2 below is the head's sigma^2 to the last bit
    with torch.no_grad():
        head.log_noise_std.fill_(math.log(noise_std))
    return head


@pytest.mark.parametrize("covariance", ["dense", "diagonal", "lowrank"])
def test_closed_form_is_blr(covariance):
    phi, y = make_data()
    head = make_head(covariance=covariance, rank=2)
    s_p = head.weights.prior_variance
    out = head.fit_closed_form(phi, y, learn_noise=False)
    cov, mean = blr(phi, y[:, 0], 0.09, s_p)
    exact = exact_log_evidence(phi, y[:, 0], 0.09, s_p)
    torch.testing.assert_close(out["log_evidence"][0], exact, rtol=1e-8, atol=0)
    # the mean is exact for every family (KL(q || posterior) is minimised at the true mean)
    torch.testing.assert_close(head.weights.mean[0], mean, rtol=0, atol=1e-10)
    elbo = head.elbo(phi, y).detach()
    if covariance == "dense":
        torch.testing.assert_close(head.weights.cov.matrix()[0], cov, rtol=0, atol=1e-10)
        # the ELBO at the exact optimum is the exact evidence (zero KL gap)
        torch.testing.assert_close(elbo, exact, rtol=1e-8, atol=0)
    else:
        # a restricted family: ELBO = evidence - KL(q || posterior) < evidence
        assert elbo < exact - 1e-3
    if covariance == "diagonal":
        # mean-field optimum of KL(q || posterior): S_ii = 1 / precision_ii
        prec = torch.linalg.inv(cov)
        var = head.weights.cov.matrix()[0].diagonal()
        torch.testing.assert_close(var, 1.0 / prec.diagonal(), rtol=0, atol=1e-10)


def test_gradient_fit_reaches_blr():
    torch.manual_seed(1)
    phi, y = make_data()
    head = make_head()
    opt = torch.optim.LBFGS(
        head.parameters(),
        lr=1.0,
        max_iter=1000,
        tolerance_grad=1e-12,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = head.loss(phi, y)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    s_p = head.weights.prior_variance
    cov, mean = blr(phi, y[:, 0], 0.09, s_p)
    torch.testing.assert_close(head.weights.mean[0], mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(head.weights.cov.matrix()[0], cov, rtol=0, atol=1e-6)
    # the ELBO is stationary at the optimum: its error is second order in the parameter error
    exact = exact_log_evidence(phi, y[:, 0], 0.09, s_p)
    with torch.no_grad():
        torch.testing.assert_close(head.elbo(phi, y), exact, rtol=1e-9, atol=0)
        # loss is the per-datum negative ELBO when there is no noise prior
        torch.testing.assert_close(head.loss(phi, y), -head.elbo(phi, y) / N, rtol=1e-12, atol=0)


def test_predictive_variance_and_joint():
    phi, y = make_data()
    head = make_head()
    head.fit_closed_form(phi, y, learn_noise=False)
    cov, mean = blr(phi, y[:, 0], 0.09, head.weights.prior_variance)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, D, generator=g, dtype=DT)
    latent = x @ cov @ x.T
    post = head.posterior(x)
    torch.testing.assert_close(post.mean[:, 0], x @ mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(post.variance[:, 0], latent.diagonal(), rtol=0, atol=1e-10)
    noisy = head.posterior(x, observation_noise=True)
    torch.testing.assert_close(noisy.variance[:, 0], latent.diagonal() + 0.09, rtol=0, atol=1e-10)
    joint = head.posterior(x, joint=True)
    assert joint.is_joint
    torch.testing.assert_close(joint.covariance_matrix, latent, rtol=0, atol=1e-10)
    joint_noisy = head.posterior(x, observation_noise=True, joint=True)
    eye = torch.eye(7, dtype=DT)
    torch.testing.assert_close(
        joint_noisy.covariance_matrix, latent + 0.09 * eye, rtol=0, atol=1e-10
    )
    # the joint predictive density is the BLR predictive density
    target = torch.randn(7, 1, generator=g, dtype=DT)
    ref = MultivariateNormal(x @ mean, covariance_matrix=latent + 0.09 * eye)
    torch.testing.assert_close(joint_noisy.joint_log_prob(target), ref.log_prob(target[:, 0]))


def test_two_outputs_each_match_their_blr():
    sds = (0.2, 0.7)
    phi, y = make_data(seed=4, m=2, noise_std=sds)
    head = make_head(m=2)
    with torch.no_grad():
        head.log_noise_std.copy_(torch.tensor(sds, dtype=DT).log())
    head.fit_closed_form(phi, y, learn_noise=False)
    s_p = head.weights.prior_variance
    total = 0.0
    x = torch.randn(4, D, dtype=DT)
    post = head.posterior(x, observation_noise=True)
    joint = head.posterior(x, observation_noise=True, joint=True).covariance_matrix
    for k, sd in enumerate(sds):
        cov, mean = blr(phi, y[:, k], sd**2, s_p)
        torch.testing.assert_close(head.weights.mean[k], mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(head.weights.cov.matrix()[k], cov, rtol=0, atol=1e-10)
        pred = x @ cov @ x.T + sd**2 * torch.eye(4, dtype=DT)
        torch.testing.assert_close(post.variance[:, k], pred.diagonal(), rtol=0, atol=1e-10)
        # interleaved joint layout: row i*m + k is point i, output k
        torch.testing.assert_close(joint[k::2, k::2], pred, rtol=0, atol=1e-10)
        total = total + exact_log_evidence(phi, y[:, k], sd**2, s_p)
    torch.testing.assert_close(joint[0::2, 1::2], torch.zeros(4, 4, dtype=DT))
    torch.testing.assert_close(head.elbo(phi, y), total, rtol=1e-8, atol=0)


def test_learned_noise_maximises_exact_evidence():
    phi, y = make_data(seed=5, noise_std=(0.5,))
    head = make_head(noise_std=1.0)
    s_p = head.weights.prior_variance
    out = head.fit_closed_form(phi, y, learn_noise=True)
    noise = out["noise_variance"][0]
    # head was updated to the returned noise
    torch.testing.assert_close(head.noise_variance[0], noise, rtol=1e-12, atol=0)
    # MacKay's fixed point is the stationarity condition of the exact evidence in sigma^2:
    # d/d log sigma^2 log N(y | 0, s_p Phi Phi^T + sigma^2 I) = 0 (up to the fixed-point tol)
    log_var = noise.log().clone().requires_grad_(True)
    ev = exact_log_evidence(phi, y[:, 0], log_var.exp(), s_p)
    (grad,) = torch.autograd.grad(ev, log_var)
    assert abs(grad.item()) < 1e-6
    torch.testing.assert_close(out["log_evidence"][0], ev.detach(), rtol=1e-8, atol=0)
    # ... and it is a maximum: a grid around it is never better
    grid = noise * torch.logspace(-1, 1, 41, dtype=DT)
    values = torch.stack([exact_log_evidence(phi, y[:, 0], v, s_p) for v in grid])
    assert bool((values <= ev.detach() + 1e-10).all())
    # the ELBO of the assigned q at that noise is the evidence too
    torch.testing.assert_close(head.elbo(phi, y), ev.detach(), rtol=1e-8, atol=0)


def test_learned_prior_maximises_exact_evidence():
    phi, y = make_data(seed=6)
    head = make_head()
    out = head.fit_closed_form(phi, y, learn_noise=True, learn_prior=True)
    noise, prior = out["noise_variance"][0], out["prior_variance"][0]
    params = torch.stack([noise.log(), prior.log()]).requires_grad_(True)
    ev = exact_log_evidence(phi, y[:, 0], params[0].exp(), params[1].exp())
    (grad,) = torch.autograd.grad(ev, params)
    assert grad.abs().max().item() < 1e-6
    torch.testing.assert_close(out["log_evidence"][0], ev.detach(), rtol=1e-8, atol=0)
    assert head.weights.prior_variance == pytest.approx(prior.item(), rel=1e-12)


def test_bias_recovers_offset():
    g = torch.Generator().manual_seed(7)
    phi = torch.randn(N, D, generator=g, dtype=DT)
    w = torch.randn(D, generator=g, dtype=DT)
    y = 100.0 + phi @ w + 0.05 * torch.randn(N, generator=g, dtype=DT)
    head = make_head(bias=True, noise_std=0.05)
    head.fit_closed_form(phi, y, learn_noise=False)
    # the offset has a flat prior: its error is the noise-level OLS error, ~0.05/sqrt(50)
    assert abs(head.bias.item() - 100.0) < 0.05
    torch.testing.assert_close(head.weights.mean[0], w, rtol=0, atol=0.05)
    # the fitted mean reproduces the targets to noise level (no shrinkage of the offset)
    resid = head(phi)[:, 0] - y
    assert resid.pow(2).mean().sqrt().item() < 0.08
    # with the learned noise, too
    head2 = make_head(bias=True)
    out = head2.fit_closed_form(phi, y, learn_noise=True)
    assert abs(head2.bias.item() - 100.0) < 0.05
    assert 0.03 < out["noise_variance"][0].sqrt().item() < 0.08


def restricted_log_evidence(phi, y, noise_var, prior_var):
    """Evidence with a flat prior on the offset: the density of the ``n - 1`` contrasts
    ``Q^T y`` (``Q`` an orthonormal basis of ``1^perp``), which do not involve the offset.
    Equals ``log int N(y | b 1, C) db + log(n) / 2``."""
    n = phi.shape[0]
    centre = torch.eye(n, dtype=phi.dtype) - 1.0 / n
    evals, evecs = torch.linalg.eigh(centre)
    q = evecs[:, evals > 0.5]  # (n, n - 1)
    cov = prior_var * phi @ phi.T + noise_var * torch.eye(n, dtype=phi.dtype)
    cov = q.T @ cov @ q
    return MultivariateNormal(torch.zeros(n - 1, dtype=phi.dtype), cov).log_prob(q.T @ y)


def test_bias_closed_form_is_the_bound_optimum():
    # features with a large common mean (as after a ReLU): where centring matters most
    g = torch.Generator().manual_seed(9)
    phi = torch.randn(N, D, generator=g, dtype=DT) + 2.0
    y = (
        3.0
        + phi @ torch.randn(D, generator=g, dtype=DT)
        + 0.3 * torch.randn(N, generator=g, dtype=DT)
    )
    head = make_head(bias=True)
    s_p = head.weights.prior_variance
    out = head.fit_closed_form(phi, y, learn_noise=False)
    # (b, q(W)) maximise the head's own bound: every gradient vanishes (round-off ~1e-14)
    head.loss(phi, y).backward()
    for name, p in head.named_parameters():
        assert p.grad.abs().max().item() < 1e-10, name
    # q(W) is the BLR posterior given the fitted offset (uncentred Gram matrix) ...
    cov, mean = blr(phi, y - head.bias.detach(), 0.09, s_p)
    torch.testing.assert_close(head.weights.cov.matrix()[0], cov, rtol=0, atol=1e-10)
    torch.testing.assert_close(head.weights.mean[0], mean, rtol=0, atol=1e-10)
    # ... the offset is the GLS estimate, which maximises N(y - b 1 | 0, C) over b
    c = s_p * phi @ phi.T + 0.09 * torch.eye(N, dtype=DT)
    ones = torch.ones(N, dtype=DT)
    gls = ones @ torch.linalg.solve(c, y) / (ones @ torch.linalg.solve(c, ones))
    torch.testing.assert_close(head.bias.detach()[0], gls, rtol=0, atol=1e-10)
    # ... so the ELBO is the profile evidence (zero gap at fixed b)
    profile = exact_log_evidence(phi, y - gls, 0.09, s_p)
    torch.testing.assert_close(head.elbo(phi, y).detach(), profile, rtol=1e-8, atol=0)
    # the returned log_evidence integrates the offset out (flat prior)
    ref = restricted_log_evidence(phi, y, 0.09, s_p)
    torch.testing.assert_close(out["log_evidence"][0], ref, rtol=1e-8, atol=0)
    # and with learn_noise=True the noise is stationary for that restricted evidence
    out = head.fit_closed_form(phi, y, learn_noise=True)
    log_var = out["noise_variance"][0].log().clone().requires_grad_(True)
    ev = restricted_log_evidence(phi, y, log_var.exp(), s_p)
    (grad,) = torch.autograd.grad(ev, log_var)
    assert abs(grad.item()) < 1e-6
    torch.testing.assert_close(out["log_evidence"][0], ev.detach(), rtol=1e-8, atol=0)


def test_learn_noise_buffer_is_not_a_parameter():
    head = make_head(learn_noise=False)
    assert all(p is not head.log_noise_std for p in head.parameters())
    head2 = make_head(learn_noise=True)
    assert any(p is head2.log_noise_std for p in head2.parameters())


def test_noise_prior_enters_the_loss():
    phi, y = make_data()
    head = make_head(learn_noise=True, wishart_scale=0.5, dof=2.0)
    with torch.no_grad():
        sd = head.log_noise_std.exp()
        nu = 0.5 * (2.0 + 1 + 1)
        log_prior = -2.0 * nu * sd.log().sum() - 0.5 * 0.5 * sd.pow(-2).sum()
        expected = -head.elbo(phi, y) / N - log_prior / N
        torch.testing.assert_close(head.loss(phi, y), expected, rtol=1e-12, atol=0)


def test_regression_training_smoke():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(200, 3, generator=g)
    w = torch.tensor([[1.0, -2.0, 0.5]])
    y = x @ w.T + 1.5 + 0.1 * torch.randn(200, 1, generator=g)
    head = VBLLRegression(3, 1, num_data=200)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = head.loss(x, y).item()
    for _ in range(300):
        opt.zero_grad()
        loss = head.loss(x, y)
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0
    rmse = (head(x) - y).pow(2).mean().sqrt().item()
    assert rmse < 0.15
    assert 0.05 < head.noise_variance.sqrt().item() < 0.2
    assert math.isfinite(head.posterior(x).variance.sum().item())

"""Generative VBLL classification (G-VBLL): GDA limit, bound and predictive.

Tolerances
----------
- With ``S_k -> 0`` (variances ``exp(-80)`` ~ 1e-35 against a feature noise ~1) the model *is*
  Gaussian discriminant analysis with shared diagonal covariance, and both the predictive and
  the bound equal the GDA class posterior up to float64 round-off (``1e-10``).
- The bound is ``E_q log rho_y N(phi | mu_y, Sigma)`` (exact) minus Jensen's upper bound
  ``log sum_k rho_k E_q N(phi | mu_k, Sigma)`` on ``E_q log sum_k ...``, hence below the exact
  ``E_q log p(y | phi)``; a Monte-Carlo estimate over ``mu_k ~ q`` may only exceed it by MC
  error: 4 standard errors of the mean (per-point false-alarm probability ~3e-5, fixed seed).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, Normal

from bdl.lastlayer import GenerativeVBLLClassification
from bdl.lastlayer.generative import diagonal_gaussian_log_density

DT = torch.float64


def gda_log_posterior(phi, means, sigma, log_prior):
    """``log softmax_k [log rho_k + log N(phi | mu_k, diag(sigma^2))]`` by torch.distributions."""
    dist = Independent(Normal(means, sigma), 1)  # batch (C,), event (d,)
    scores = dist.log_prob(phi.unsqueeze(-2)) + log_prior  # (B, C)
    return torch.log_softmax(scores, -1)


def make_head(d=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = GenerativeVBLLClassification(d, c, num_data=20, wishart_scale=1.0).to(DT)
    with torch.no_grad():
        head.class_means.mean.copy_(torch.randn(c, d, generator=g, dtype=DT))
        head.log_noise_std.copy_(0.3 * torch.randn(d, generator=g, dtype=DT))
    return head, g


def test_diagonal_gaussian_log_density():
    g = torch.Generator().manual_seed(9)
    phi = torch.randn(6, 4, generator=g, dtype=DT)
    means = torch.randn(3, 4, generator=g, dtype=DT)
    var = torch.rand(3, 4, generator=g, dtype=DT) + 0.1
    ref = Independent(Normal(means, var.sqrt()), 1).log_prob(phi.unsqueeze(-2))
    torch.testing.assert_close(diagonal_gaussian_log_density(phi, means, var), ref)


def test_zero_mean_uncertainty_is_gda():
    head, g = make_head()
    with torch.no_grad():
        head.class_means.cov.log_diag.fill_(-40.0)
    head.set_class_prior(torch.tensor([5.0, 1.0, 2.0]))
    phi = torch.randn(10, 4, generator=g, dtype=DT)
    y = torch.randint(3, (10,), generator=g)
    log_rho = torch.tensor([5.0, 1.0, 2.0], dtype=DT).div(8.0).log()
    ref = gda_log_posterior(phi, head.class_means.mean, head.log_noise_std.exp(), log_rho)
    torch.testing.assert_close(head.posterior(phi).probs, ref.exp(), rtol=0, atol=1e-10)
    torch.testing.assert_close(head(phi), ref, rtol=0, atol=1e-10)
    # without mean uncertainty Jensen is tight: the bound is the GDA log posterior itself
    picked = ref.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(head.log_likelihood_bound(phi, y), picked, rtol=0, atol=1e-10)


def test_set_class_prior():
    head, g = make_head()
    phi = torch.randn(5, 4, generator=g, dtype=DT)
    uniform = head.posterior(phi).probs
    torch.testing.assert_close(head.log_class_prior.exp(), torch.full((3,), 1 / 3, dtype=DT))
    head.set_class_prior(torch.tensor([0.2, 0.3, 0.5]))
    torch.testing.assert_close(head.log_class_prior.exp(), torch.tensor([0.2, 0.3, 0.5], dtype=DT))
    # counts and probabilities are interchangeable
    head.set_class_prior([20, 30, 50])
    torch.testing.assert_close(head.log_class_prior.exp(), torch.tensor([0.2, 0.3, 0.5], dtype=DT))
    # Bayes' rule: posterior odds scale by the prior odds
    new = head.posterior(phi).probs
    ratio = (new / uniform) / (new / uniform)[:, :1]
    torch.testing.assert_close(ratio, torch.tensor([[1.0, 1.5, 2.5]], dtype=DT).expand(5, 3))
    with pytest.raises(ValueError, match="counts_or_probs"):
        head.set_class_prior(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="counts_or_probs"):
        head.set_class_prior(torch.tensor([1.0, 0.0, 2.0]))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="counts_or_probs"):
            head.set_class_prior(torch.tensor([1.0, bad, 2.0]))
    # a failed call leaves the prior unchanged
    torch.testing.assert_close(head.log_class_prior.exp(), torch.tensor([0.2, 0.3, 0.5], dtype=DT))


def test_bound_below_monte_carlo():
    head, g = make_head(seed=1)
    with torch.no_grad():
        # mean uncertainty comparable to the feature noise: a visible Jensen gap
        head.class_means.cov.log_diag.copy_(0.2 * torch.randn(3, 4, generator=g, dtype=DT))
    head.set_class_prior(torch.tensor([1.0, 2.0, 3.0]))
    phi = torch.randn(8, 4, generator=g, dtype=DT)
    y = torch.randint(3, (8,), generator=g)
    bound = head.log_likelihood_bound(phi, y).detach()
    s = 100_000
    with torch.no_grad():
        sd = head.class_means.cov.log_diag.exp()
        mus = head.class_means.mean + sd * torch.randn(s, 3, 4, generator=g, dtype=DT)
        sigma = head.log_noise_std.exp()
        # log p(y | phi, mu) for every draw, vectorised: (S, B, C)
        scores = (
            Independent(Normal(mus.unsqueeze(1), sigma), 1).log_prob(phi.unsqueeze(-2))
            + head.log_class_prior
        )
        vals = torch.log_softmax(scores, -1).gather(-1, y.expand(s, 8).unsqueeze(-1)).squeeze(-1)
        mc, se = vals.mean(0), vals.std(0) / math.sqrt(s)
    assert bool((bound <= mc + 4 * se).all()), (bound, mc, se)
    assert bool((bound < mc - 4 * se).any())  # the gap is real: the check is not vacuous


def test_expected_log_joint_term_is_exact():
    # bound + log sum_k rho_k N(phi | mubar_k, Sigma + S_k) = E_q log rho_y N(phi | mu_y, Sigma)
    head, g = make_head(seed=2)
    with torch.no_grad():
        head.class_means.cov.log_diag.copy_(0.3 * torch.randn(3, 4, generator=g, dtype=DT))
    phi = torch.randn(4, 4, generator=g, dtype=DT)
    y = torch.randint(3, (4,), generator=g)
    with torch.no_grad():
        noise = head.log_noise_std.exp().pow(2)
        total = noise + head.class_means.cov.variances()
        norm = torch.logsumexp(
            head.log_class_prior + diagonal_gaussian_log_density(phi, head.class_means.mean, total),
            -1,
        )
        joint = head.log_likelihood_bound(phi, y) + norm - head.log_class_prior[y]
        # E_{mu ~ N(m, S)} log N(phi | mu, Sigma) = log N(phi | m, Sigma) - tr(Sigma^-1 S) / 2
        mean_y = head.class_means.mean[y]
        var_y = head.class_means.cov.variances()[y]
        ref = Independent(Normal(mean_y, noise.sqrt()), 1).log_prob(phi)
        ref = ref - 0.5 * (var_y / noise).sum(-1)
    torch.testing.assert_close(joint, ref, rtol=1e-12, atol=1e-12)


def test_loss_and_noise_prior():
    head, g = make_head(seed=3)
    phi = torch.randn(6, 4, generator=g, dtype=DT)
    y = torch.randint(3, (6,), generator=g)
    sd = head.log_noise_std.detach()
    nu = 0.5 * (1.0 + 4 + 1)
    log_prior = -2 * nu * sd.sum() - 0.5 * 1.0 * torch.exp(-2 * sd).sum()
    expected = -head.log_likelihood_bound(phi, y).mean() + (head.kl_divergence() - log_prior) / 20
    torch.testing.assert_close(head.loss(phi, y), expected, rtol=1e-13, atol=0)
    head_np = GenerativeVBLLClassification(4, 3, num_data=20, wishart_scale=None).to(DT)
    head_np.load_state_dict(head.state_dict())
    expected = -head.log_likelihood_bound(phi, y).mean() + head.kl_divergence() / 20
    torch.testing.assert_close(head_np.loss(phi, y), expected, rtol=1e-13, atol=0)


def test_generative_training_smoke():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    centers = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.5]])
    y = torch.arange(3).repeat_interleave(40)
    x = centers[y] + 0.5 * torch.randn(120, 2, generator=g)
    head = GenerativeVBLLClassification(2, 3, num_data=120)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = head.loss(x, y).item()
    for _ in range(300):
        opt.zero_grad()
        loss = head.loss(x, y)
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.5
    acc = (head.posterior(x).probs.argmax(-1) == y).double().mean().item()
    assert acc > 0.95
    # the objective is the conditional p(y | phi), not p(phi | y): class means are shrunk by
    # the prior and need not sit on the centres, but each is closest to its own centre
    dist = torch.cdist(head.class_means.mean.detach(), centers)
    assert dist.argmin(-1).tolist() == [0, 1, 2]
    assert math.isfinite(head.loss(x, y).item())

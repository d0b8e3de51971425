"""Tests for the common predictive-distribution interface in :mod:`bdl.posterior`.

Statistical tolerances
----------------------
Every Monte-Carlo check uses ``K = 5`` standard errors of the estimator being checked. Under the
normal approximation a two-sided 5-sigma deviation has probability about 5.7e-7 per compared
number, so even a few hundred compared numbers fail with probability < 1e-3 for an arbitrary
seed; all seeds are fixed, so the tests are deterministic anyway. The standard errors used:

- sample mean of ``S`` draws:      ``sigma / sqrt(S)``
- sample variance (Gaussian):      ``sigma^2 * sqrt(2 / (S - 1))``
- sample variance (any law):       ``sqrt((mu_4 - sigma^4) / S)`` with ``mu_4`` the fourth
  central moment
- sample covariance (Gaussian):    ``sqrt((Sigma_ij^2 + Sigma_ii Sigma_jj) / (S - 1))`` (Wishart)
- label frequency:                 ``sqrt(p (1 - p) / S)`` (binomial)
- empirical q-quantile of N(0, 1): ``sqrt(q (1 - q) / S) / phi(z_q)``
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.distributions import (
    Categorical,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from bdl.core.linalg import JitterWarning, psd_safe_cholesky
from bdl.core.posterior import (
    CategoricalPosterior,
    GaussianPosterior,
    Posterior,
    SamplePosterior,
)

K = 5.0  # number of standard errors allowed in every Monte-Carlo comparison
Z95 = 1.959963984540054  # two-sided 95 % standard-normal quantile
BATCH = (2, 3)
N = 4
SAMPLE_SHAPES = [(), (5,), (2, 3)]

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])


def _tol(dtype: torch.dtype) -> dict[str, float]:
    """Tolerances for comparisons against torch.distributions (same maths, other code path)."""
    if dtype == torch.float64:
        return {"rtol": 1e-9, "atol": 1e-9}
    return {"rtol": 1e-4, "atol": 1e-4}


def _spd(batch: tuple[int, ...], k: int, dtype: torch.dtype, jitter: float = 0.5) -> torch.Tensor:
    """Random well-conditioned SPD matrices of shape (*batch, k, k)."""
    a = torch.randn(*batch, k, k, dtype=torch.float64)
    cov = a @ a.mT / k + jitter * torch.eye(k, dtype=torch.float64)
    return cov.to(dtype)


def _gaussian(kind: str, m: int, dtype: torch.dtype, batch=BATCH, n: int = N):
    mean = torch.randn(*batch, n, m, dtype=dtype)
    if kind == "diag":
        return GaussianPosterior(mean, variance=torch.rand(*batch, n, m, dtype=dtype) + 0.5)
    return GaussianPosterior(mean, covariance=_spd(batch, n * m, dtype))


def _blocks(cov: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per-point m x m diagonal blocks of an interleaved (..., n*m, n*m) covariance, by hand."""
    return torch.stack([cov[..., i * m : (i + 1) * m, i * m : (i + 1) * m] for i in range(n)], -3)


# ------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("kind", ["diag", "joint"])
def test_gaussian_shapes(kind, m, dtype):
    torch.manual_seed(0)
    post = _gaussian(kind, m, dtype)
    assert isinstance(post, Posterior)
    assert post.is_joint == (kind == "joint")
    assert post.mean.shape == (*BATCH, N, m)
    assert post.variance.shape == (*BATCH, N, m)
    assert post.stddev.shape == (*BATCH, N, m)
    assert post.covariance_matrix.shape == (*BATCH, N * m, N * m)
    assert post.scale_tril.shape == (*BATCH, N * m, N * m)
    assert post.batch_shape == BATCH
    assert post.base_sample_shape == (*BATCH, N, m)
    assert post.dtype == dtype and post.device == torch.device("cpu")
    for s in SAMPLE_SHAPES:
        draws = post.rsample(torch.Size(s))
        assert draws.shape == (*s, *BATCH, N, m) and draws.dtype == dtype
        assert post.sample(s).shape == (*s, *BATCH, N, m)
    assert post.rsample(3).shape == (3, *BATCH, N, m)  # int sample_shape
    y = torch.randn(*BATCH, N, m, dtype=dtype)
    assert post.log_prob(y).shape == (*BATCH, N)
    assert post.joint_log_prob(y).shape == BATCH
    # extra leading batch dims of y broadcast against the posterior
    y5 = torch.randn(5, *BATCH, N, m, dtype=dtype)
    assert post.log_prob(y5).shape == (5, *BATCH, N)
    assert post.joint_log_prob(y5).shape == (5, *BATCH)
    lower, upper = post.confidence_region()
    assert lower.shape == upper.shape == (*BATCH, N, m)
    assert bool((lower < upper).all())
    if m == 1:  # y of shape (..., n) is read as (..., n, 1)
        torch.testing.assert_close(post.log_prob(y.squeeze(-1)), post.log_prob(y))
        torch.testing.assert_close(post.joint_log_prob(y.squeeze(-1)), post.joint_log_prob(y))
    else:
        with pytest.raises(ValueError):
            post.log_prob(y[..., 0])
    with pytest.raises(ValueError):
        post.log_prob(torch.randn(*BATCH, N + 1, m, dtype=dtype))
    with pytest.raises(ValueError):
        post.log_prob(torch.randn(4, N, m, dtype=dtype))  # batch dim 4 vs 3
    assert "GaussianPosterior" in repr(post)


@DTYPES
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("noise", [False, True])
def test_sample_posterior_shapes(noise, m, dtype):
    torch.manual_seed(0)
    S = 7
    post = SamplePosterior(
        torch.randn(S, *BATCH, N, m, dtype=dtype), noise_variance=0.3 if noise else None
    )
    assert post.num_samples == S
    assert post.mean.shape == post.variance.shape == (*BATCH, N, m)
    assert post.batch_shape == BATCH
    assert post.base_sample_shape == (*BATCH, N, m)
    for s in SAMPLE_SHAPES:
        assert post.rsample(s).shape == (*s, *BATCH, N, m)
        assert post.sample(s).shape == (*s, *BATCH, N, m)
        base = torch.randn(*s, *BATCH, N, m, dtype=dtype)
        assert post.rsample_from_base_samples(torch.Size(s), base).shape == (*s, *BATCH, N, m)
    y = torch.randn(*BATCH, N, m, dtype=dtype)
    assert post.log_prob(y).shape == (*BATCH, N)
    assert post.joint_log_prob(y).shape == BATCH
    lower, upper = post.confidence_region()
    assert lower.shape == upper.shape == (*BATCH, N, m)
    # extra leading batch dims of y, including one of size S (must not be read as the draw axis)
    for lead in (5, S):
        y_lead = torch.randn(lead, *BATCH, N, m, dtype=dtype)
        lp = post.log_prob(y_lead)
        assert lp.shape == (lead, *BATCH, N)
        torch.testing.assert_close(lp[1], post.log_prob(y_lead[1]))
        jl = post.joint_log_prob(y_lead)
        assert jl.shape == (lead, *BATCH)
        torch.testing.assert_close(jl[1], post.joint_log_prob(y_lead[1]))
    if m == 1:
        torch.testing.assert_close(post.log_prob(y.squeeze(-1)), post.log_prob(y))
        torch.testing.assert_close(post.joint_log_prob(y.squeeze(-1)), post.joint_log_prob(y))
    assert "SamplePosterior" in repr(post)


@DTYPES
def test_categorical_shapes(dtype):
    torch.manual_seed(0)
    C, S = 3, 6
    prob_samples = torch.softmax(torch.randn(S, *BATCH, N, C, dtype=dtype), -1)
    post = CategoricalPosterior(prob_samples.mean(0), prob_samples=prob_samples)
    assert post.num_classes == C
    assert post.mean.shape == post.variance.shape == post.probs.shape == (*BATCH, N, C)
    assert post.batch_shape == BATCH
    assert post.base_sample_shape == (*BATCH, N)
    for s in SAMPLE_SHAPES:
        labels = post.rsample(s)
        assert labels.shape == (*s, *BATCH, N) and labels.dtype == torch.long
        assert bool(((labels >= 0) & (labels < C)).all())
        assert post.sample(s).shape == (*s, *BATCH, N)
    y = torch.randint(C, (*BATCH, N))
    assert post.log_prob(y).shape == (*BATCH, N)
    assert post.joint_log_prob(y).shape == BATCH
    assert post.entropy().shape == post.mutual_information().shape == (*BATCH, N)
    ps = post.prediction_set(0.9)
    assert ps.shape == (*BATCH, N, C) and ps.dtype == torch.bool
    assert "draws=6" in repr(post)


def test_constructor_validation():
    mean = torch.zeros(3, 2)
    with pytest.raises(ValueError):
        GaussianPosterior(torch.zeros(3), variance=torch.ones(3))
    with pytest.raises(ValueError):
        GaussianPosterior(mean)
    with pytest.raises(ValueError):
        GaussianPosterior(mean, variance=torch.ones(3, 2), covariance=torch.eye(6))
    with pytest.raises(ValueError):
        GaussianPosterior(mean, variance=torch.ones(3, 1))
    with pytest.raises(ValueError):
        GaussianPosterior(mean, covariance=torch.eye(3))
    with pytest.raises(ValueError):
        GaussianPosterior(mean, covariance=torch.eye(6).expand(2, 6, 6))
    with pytest.raises(ValueError):
        CategoricalPosterior(torch.ones(3) / 3)
    with pytest.raises(ValueError):
        CategoricalPosterior(torch.ones(2, 3) / 3, prob_samples=torch.ones(4, 2, 2) / 2)
    with pytest.raises(ValueError):
        SamplePosterior(torch.zeros(4, 3))
    with pytest.raises(ValueError):
        SamplePosterior(torch.zeros(4, 3, 1), noise_variance=-1.0)


# ------------------------------------------------------------------------------------------------
# sample moments
# ------------------------------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("kind", ["diag", "joint"])
def test_gaussian_sample_moments(kind, m, dtype):
    torch.manual_seed(1)
    S = 20_000
    post = _gaussian(kind, m, dtype)
    draws = post.rsample((S,)).double()
    mean, var = post.mean.double(), post.variance.double()
    # sample mean: standard error sigma / sqrt(S)
    assert bool(((draws.mean(0) - mean).abs() < K * var.sqrt() / math.sqrt(S)).all())
    # sample variance of a Gaussian: standard error sigma^2 sqrt(2 / (S - 1))
    assert bool(((draws.var(0) - var).abs() < K * var * math.sqrt(2.0 / (S - 1))).all())


@DTYPES
@pytest.mark.parametrize("m", [1, 2])
def test_gaussian_joint_sample_covariance(m, dtype):
    """Sample covariance of a 3-point joint (3m x 3m) against the given covariance."""
    torch.manual_seed(2)
    S, n = 20_000, 3
    mean = torch.randn(n, m, dtype=dtype)
    a = torch.randn(n * m, n * m, dtype=torch.float64)
    cov = (a @ a.mT + 0.1 * torch.eye(n * m, dtype=torch.float64)).to(dtype)  # correlated
    post = GaussianPosterior(mean, covariance=cov)
    draws = post.rsample((S,)).double().flatten(-2)  # interleaved (S, n*m)
    centred = draws - draws.mean(0)
    sample_cov = centred.mT @ centred / (S - 1)
    c = cov.double()
    d = c.diagonal()
    # Wishart: Var(sample_cov_ij) = (Sigma_ij^2 + Sigma_ii Sigma_jj) / (S - 1)
    se = ((c**2 + d[:, None] * d[None, :]) / (S - 1)).sqrt()
    assert bool(((sample_cov - c).abs() < K * se).all())


@DTYPES
@pytest.mark.parametrize("noise", [False, True])
def test_sample_posterior_mixture_moments(noise, dtype):
    torch.manual_seed(3)
    S, n, m = 5, 3, 2
    f = 2.0 * torch.randn(S, n, m, dtype=dtype)
    nv = (torch.rand(S, n, m, dtype=dtype) + 0.1) if noise else None
    post = SamplePosterior(f, noise_variance=nv)
    # exact mixture moments, by hand
    mix_mean = f.double().mean(0)
    mix_var = ((f.double() - mix_mean) ** 2).mean(0)
    if noise:
        mix_var = mix_var + nv.double().mean(0)
    torch.testing.assert_close(post.mean.double(), mix_mean, **_tol(dtype))
    torch.testing.assert_close(post.variance.double(), mix_var, **_tol(dtype))

    # Monte-Carlo draws from the mixture
    T = 40_000
    draws = post.rsample((T,)).double()
    assert bool(((draws.mean(0) - mix_mean).abs() < K * mix_var.sqrt() / math.sqrt(T)).all())
    # fourth central moment of the mixture: mean_s (d^4 + 6 d^2 v + 3 v^2), d = f_s - mean
    dev = f.double() - mix_mean
    v = nv.double() if noise else torch.zeros_like(dev)
    mu4 = (dev**4 + 6 * dev**2 * v + 3 * v**2).mean(0)
    se_var = ((mu4 - mix_var**2) / T).sqrt()
    assert bool(((draws.var(0) - mix_var).abs() < K * se_var).all())
    if not noise:  # every draw is one of the members
        assert bool((draws[:, None] == f.double()).all(-1).all(-1).any(1).all())

    # rsample_from_base_samples over a multiple of S uses every member equally often
    base = torch.randn(4 * S, n, m, dtype=dtype)
    det = post.rsample_from_base_samples(torch.Size([4 * S]), base)
    if not noise:
        torch.testing.assert_close(det.mean(0), post.mean)
        torch.testing.assert_close(det.var(0, unbiased=False), post.variance)


@DTYPES
def test_categorical_label_frequencies(dtype):
    torch.manual_seed(4)
    S, C = 20_000, 4
    probs = torch.softmax(0.5 * torch.randn(*BATCH, N, C, dtype=dtype), -1)
    post = CategoricalPosterior(probs)
    labels = post.sample((S,))
    freq = torch.nn.functional.one_hot(labels, C).double().mean(0)
    p = probs.double()
    # binomial: standard error sqrt(p (1 - p) / S)
    assert bool(((freq - p).abs() < K * (p * (1 - p) / S).sqrt()).all())
    torch.testing.assert_close(post.variance, probs * (1 - probs))


# ------------------------------------------------------------------------------------------------
# densities against torch.distributions
# ------------------------------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("m", [1, 2])
def test_gaussian_diag_log_prob(m, dtype):
    torch.manual_seed(5)
    post = _gaussian("diag", m, dtype)
    y = torch.randn(*BATCH, N, m, dtype=dtype)
    ref = Normal(post.mean, post.variance.sqrt()).log_prob(y).sum(-1)
    torch.testing.assert_close(post.log_prob(y), ref, **_tol(dtype))
    torch.testing.assert_close(post.joint_log_prob(y), ref.sum(-1), **_tol(dtype))


@DTYPES
def test_gaussian_joint_log_prob_m1(dtype):
    torch.manual_seed(6)
    post = _gaussian("joint", 1, dtype)
    y = torch.randn(*BATCH, N, 1, dtype=dtype)
    cov = post.covariance_matrix
    marg = Normal(post.mean.squeeze(-1), cov.diagonal(dim1=-2, dim2=-1).sqrt())
    torch.testing.assert_close(post.log_prob(y), marg.log_prob(y.squeeze(-1)), **_tol(dtype))
    joint = MultivariateNormal(post.mean.squeeze(-1), covariance_matrix=cov)
    torch.testing.assert_close(post.joint_log_prob(y), joint.log_prob(y.squeeze(-1)), **_tol(dtype))
    torch.testing.assert_close(post.variance.squeeze(-1), cov.diagonal(dim1=-2, dim2=-1))


@DTYPES
def test_gaussian_joint_log_prob_m2(dtype):
    torch.manual_seed(7)
    m = 2
    post = _gaussian("joint", m, dtype)
    cov = post.covariance_matrix
    y = torch.randn(*BATCH, N, m, dtype=dtype)
    # per point: the m x m diagonal block of the interleaved covariance
    per_point = MultivariateNormal(post.mean, covariance_matrix=_blocks(cov, N, m))
    torch.testing.assert_close(post.log_prob(y), per_point.log_prob(y), **_tol(dtype))
    # joint: one MVN over the n*m interleaved coordinates
    joint = MultivariateNormal(post.mean.flatten(-2), covariance_matrix=cov)
    torch.testing.assert_close(post.joint_log_prob(y), joint.log_prob(y.flatten(-2)), **_tol(dtype))
    # marginal variances read off the interleaved diagonal
    torch.testing.assert_close(post.variance, cov.diagonal(dim1=-2, dim2=-1).unflatten(-1, (N, m)))


@DTYPES
@pytest.mark.parametrize("m", [1, 2])
def test_sample_posterior_log_prob_with_noise(m, dtype):
    torch.manual_seed(8)
    S = 6
    f = torch.randn(S, *BATCH, N, m, dtype=dtype)
    nv = torch.rand(S, *BATCH, N, m, dtype=dtype) + 0.2
    post = SamplePosterior(f, noise_variance=nv)
    y = torch.randn(*BATCH, N, m, dtype=dtype)
    # mixture over the S components; components live on the last batch dim
    comp = Independent(Normal(f.movedim(0, -2), nv.sqrt().movedim(0, -2)), 1)
    mix = MixtureSameFamily(Categorical(logits=torch.zeros(*BATCH, N, S, dtype=dtype)), comp)
    torch.testing.assert_close(post.log_prob(y), mix.log_prob(y), **_tol(dtype))
    # joint: log mean_s prod_{i, j} N(y_ij | f_sij, v_sij)
    per_draw = Normal(f, nv.sqrt()).log_prob(y).sum((-1, -2))  # (S, *BATCH)
    ref = torch.logsumexp(per_draw, 0) - math.log(S)
    torch.testing.assert_close(post.joint_log_prob(y), ref, **_tol(dtype))
    # scalar noise is broadcast to every draw
    scalar = SamplePosterior(f, noise_variance=0.5)
    ref = MixtureSameFamily(
        Categorical(logits=torch.zeros(*BATCH, N, S, dtype=dtype)),
        Independent(Normal(f.movedim(0, -2), math.sqrt(0.5)), 1),
    ).log_prob(y)
    torch.testing.assert_close(scalar.log_prob(y), ref, **_tol(dtype))


@DTYPES
def test_sample_posterior_log_prob_without_noise_is_moment_matched(dtype):
    torch.manual_seed(9)
    f = torch.randn(8, *BATCH, N, 2, dtype=dtype)
    post = SamplePosterior(f)
    y = torch.randn(*BATCH, N, 2, dtype=dtype)
    ref = Normal(f.mean(0), f.var(0, unbiased=False).sqrt()).log_prob(y).sum(-1)
    torch.testing.assert_close(post.log_prob(y), ref, **_tol(dtype))
    torch.testing.assert_close(post.joint_log_prob(y), ref.sum(-1), **_tol(dtype))


@DTYPES
def test_categorical_log_prob(dtype):
    torch.manual_seed(10)
    C, S = 5, 4
    prob_samples = torch.softmax(2 * torch.randn(S, *BATCH, N, C, dtype=dtype), -1)
    probs = prob_samples.mean(0)
    y = torch.randint(C, (*BATCH, N))
    ref = Categorical(probs=probs).log_prob(y)
    plain = CategoricalPosterior(probs)
    torch.testing.assert_close(plain.log_prob(y), ref, **_tol(dtype))
    torch.testing.assert_close(plain.joint_log_prob(y), ref.sum(-1), **_tol(dtype))
    # mixture joint: log (1/S) sum_s prod_i p_s(y_i), by hand with explicit loops over s
    post = CategoricalPosterior(probs, prob_samples=prob_samples)
    torch.testing.assert_close(post.log_prob(y), ref, **_tol(dtype))
    terms = []
    for s in range(S):
        p_s = prob_samples[s].gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (*BATCH, N)
        terms.append(p_s.log().sum(-1))
    hand = torch.logsumexp(torch.stack(terms), 0) - math.log(S)
    torch.testing.assert_close(post.joint_log_prob(y), hand, **_tol(dtype))
    # the shared draw makes points dependent: the mixture joint differs from the product
    assert not torch.allclose(post.joint_log_prob(y), ref.sum(-1))


def test_categorical_log_prob_rejects_bad_labels():
    post = CategoricalPosterior(
        torch.full((2, 3), 1 / 3), prob_samples=torch.full((4, 2, 3), 1 / 3)
    )
    for bad in (
        torch.tensor([0.0, 1.0]),  # float labels
        torch.tensor([0, 3]),  # out of range
        torch.tensor([-1, 0]),  # negative
        torch.tensor([[0, 1]]),  # wrong shape
    ):
        with pytest.raises(ValueError):
            post.log_prob(bad)
        with pytest.raises(ValueError):
            post.joint_log_prob(bad)
    assert torch.isfinite(post.log_prob(torch.tensor([0, 2]))).all()


# ------------------------------------------------------------------------------------------------
# base samples, determinism and gradients
# ------------------------------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("kind", ["diag", "joint"])
def test_gaussian_base_samples(kind, m, dtype):
    torch.manual_seed(11)
    post = _gaussian(kind, m, dtype)
    for s in SAMPLE_SHAPES:
        base = torch.randn(*s, *post.base_sample_shape, dtype=dtype)
        a = post.rsample_from_base_samples(torch.Size(s), base)
        b = post.rsample_from_base_samples(torch.Size(s), base.clone())
        assert torch.equal(a, b)
    base = torch.randn(3, *post.base_sample_shape, dtype=dtype)
    draws = post.rsample_from_base_samples(torch.Size([3]), base)
    expected = post.mean + (post.scale_tril @ base.flatten(-2).unsqueeze(-1)).squeeze(-1).reshape(
        base.shape
    )
    torch.testing.assert_close(draws, expected, **_tol(dtype))
    if kind == "diag":
        torch.testing.assert_close(draws, post.mean + post.stddev * base)
    # zero base samples give the mean
    zero = post.rsample_from_base_samples(torch.Size([1]), torch.zeros(1, *post.base_sample_shape))
    torch.testing.assert_close(zero[0], post.mean)
    for bad_shape in [(3, *BATCH, N, m + 1), (3, *BATCH, N), (*BATCH, N, m)]:
        with pytest.raises(ValueError):
            post.rsample_from_base_samples(torch.Size([3]), torch.randn(bad_shape, dtype=dtype))


@DTYPES
@pytest.mark.parametrize("noise", [False, True])
def test_sample_posterior_base_samples(noise, dtype):
    torch.manual_seed(12)
    S, m = 3, 2
    f = torch.randn(S, *BATCH, N, m, dtype=dtype)
    nv = torch.rand(S, *BATCH, N, m, dtype=dtype) + 0.1
    post = SamplePosterior(f, noise_variance=nv if noise else None)
    base = torch.randn(2, 3, *BATCH, N, m, dtype=dtype)
    a = post.rsample_from_base_samples(torch.Size([2, 3]), base)
    b = post.rsample_from_base_samples(torch.Size([2, 3]), base.clone())
    assert torch.equal(a, b)
    # draw j (flattened over sample_shape) is member j mod S, plus sqrt(noise) * base
    flat_a, flat_base = a.flatten(0, 1), base.flatten(0, 1)
    for j in range(6):
        expected = f[j % S] + (nv[j % S].sqrt() * flat_base[j] if noise else 0.0)
        torch.testing.assert_close(flat_a[j], expected, **_tol(dtype))
    single = post.rsample_from_base_samples(torch.Size(), base[0, 0])
    assert single.shape == (*BATCH, N, m)
    with pytest.raises(ValueError):
        post.rsample_from_base_samples(torch.Size([2, 3]), base[0])
    with pytest.raises(ValueError):
        post.rsample_from_base_samples(torch.Size([6]), base)


@DTYPES
def test_categorical_base_samples(dtype):
    torch.manual_seed(13)
    probs = torch.softmax(torch.randn(*BATCH, N, 4, dtype=dtype), -1)
    post = CategoricalPosterior(probs)
    base = torch.randn(5, *BATCH, N, dtype=dtype)
    a = post.rsample_from_base_samples(torch.Size([5]), base)
    assert torch.equal(a, post.rsample_from_base_samples(torch.Size([5]), base.clone()))
    # inverse CDF of Phi(base): probs (0.2, 0.3, 0.5) have CDF (0.2, 0.5, 1.0)
    known = CategoricalPosterior(torch.tensor([[0.2, 0.3, 0.5]], dtype=dtype))
    u = torch.tensor([0.1, 0.25, 0.45, 0.6, 0.99], dtype=dtype)
    base = torch.special.ndtri(u).view(5, 1)
    labels = known.rsample_from_base_samples(torch.Size([5]), base)
    assert labels.view(-1).tolist() == [0, 1, 1, 2, 2]
    extreme = torch.tensor([[-40.0], [40.0]], dtype=dtype)  # Phi = 0 and 1 exactly
    assert known.rsample_from_base_samples(torch.Size([2]), extreme).view(-1).tolist() == [0, 2]
    with pytest.raises(ValueError):
        post.rsample_from_base_samples(torch.Size([5]), torch.randn(5, *BATCH, N, 4, dtype=dtype))


@DTYPES
@pytest.mark.parametrize("kind", ["diag", "joint"])
def test_gaussian_rsample_gradients(kind, dtype):
    torch.manual_seed(14)
    m = 2
    mean = torch.randn(2, N, m, dtype=dtype, requires_grad=True)
    if kind == "diag":
        scale = (torch.rand(2, N, m, dtype=dtype) + 0.5).requires_grad_()
        post = GaussianPosterior(mean, variance=scale)
    else:
        scale = _spd((2,), N * m, dtype).requires_grad_()
        post = GaussianPosterior(mean, covariance=scale)
    draws = post.rsample((7,))
    assert draws.requires_grad
    draws.sum().backward()
    # d/d mean of the sum of 7 draws is 7 everywhere
    torch.testing.assert_close(mean.grad, torch.full_like(mean, 7.0))
    assert scale.grad is not None and torch.isfinite(scale.grad).all()
    assert scale.grad.abs().sum() > 0
    # log-densities are differentiable too
    mean.grad, scale.grad = None, None
    post.joint_log_prob(torch.zeros(2, N, m, dtype=dtype)).sum().backward()
    assert mean.grad is not None and scale.grad is not None


@DTYPES
def test_gaussian_gradients_survive_cached_factor(dtype):
    """A factor computed without grad (sample()) must not cut later rsample gradients, and a
    second backward through a fresh rsample must work (no freed cached graph)."""
    torch.manual_seed(15)
    cov = _spd((), 3, dtype).requires_grad_()
    post = GaussianPosterior(torch.zeros(3, 1, dtype=dtype), covariance=cov)
    post.sample((2,))  # computes the Cholesky factor under no_grad
    with torch.no_grad():
        post.joint_log_prob(torch.zeros(3, 1, dtype=dtype))
    for _ in range(2):
        cov.grad = None
        draws = post.rsample((4,))
        assert draws.requires_grad
        (draws**2).sum().backward()
        assert cov.grad is not None and cov.grad.abs().sum() > 0
    # the factor itself is unchanged
    torch.testing.assert_close(post.scale_tril @ post.scale_tril.mT, cov.detach())


def test_sample_posterior_rsample_gradients():
    torch.manual_seed(16)
    f = torch.randn(4, 3, 1, requires_grad=True)
    post = SamplePosterior(f, noise_variance=0.1)
    post.rsample_from_base_samples(torch.Size([8]), torch.randn(8, 3, 1)).sum().backward()
    torch.testing.assert_close(f.grad, torch.full_like(f, 2.0))  # each member used twice


# ------------------------------------------------------------------------------------------------
# confidence regions
# ------------------------------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("kind", ["diag", "joint"])
def test_gaussian_confidence_region(kind, dtype):
    torch.manual_seed(17)
    post = _gaussian(kind, 2, dtype)
    lower, upper = post.confidence_region(0.95)
    std = post.variance.sqrt()
    torch.testing.assert_close(lower, post.mean - 1.959964 * std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(upper, post.mean + 1.959964 * std, rtol=1e-5, atol=1e-5)
    lo68, hi68 = post.confidence_region(0.6826894921370859)  # one sigma
    torch.testing.assert_close(hi68 - post.mean, std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post.mean - lo68, std, rtol=1e-5, atol=1e-5)
    for level in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            post.confidence_region(level)


@DTYPES
def test_sample_posterior_confidence_region_without_noise(dtype):
    torch.manual_seed(18)
    S = 20_000
    post = SamplePosterior(torch.randn(S, 3, 2, dtype=dtype))
    lower, upper = post.confidence_region(0.95)
    # empirical q-quantile of N(0,1): standard error sqrt(q (1-q) / S) / phi(z_q)
    q = 0.025
    phi = math.exp(-0.5 * Z95**2) / math.sqrt(2 * math.pi)
    se = math.sqrt(q * (1 - q) / S) / phi  # ~0.019 for S = 20000
    assert bool(((lower.double() + Z95).abs() < K * se).all())
    assert bool(((upper.double() - Z95).abs() < K * se).all())
    for level in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            post.confidence_region(level)


@DTYPES
@pytest.mark.parametrize("level", [0.5, 0.9, 0.95, 0.99])
def test_sample_posterior_confidence_region_with_noise(level, dtype):
    """With noise the interval holds exactly ``level`` of the mixture's mass."""
    torch.manual_seed(19)
    S = 5
    f = torch.randn(S, 3, 2, dtype=dtype)
    nv = torch.rand(S, 3, 2, dtype=dtype) + 0.1
    post = SamplePosterior(f, noise_variance=nv)
    lower, upper = post.confidence_region(level)

    def cdf(x):
        return torch.special.ndtr((x.double() - f.double()) / nv.double().sqrt()).mean(0)

    atol = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(
        cdf(lower), torch.full_like(cdf(lower), (1 - level) / 2), atol=atol, rtol=0
    )
    torch.testing.assert_close(
        cdf(upper), torch.full_like(cdf(upper), (1 + level) / 2), atol=atol, rtol=0
    )
    # a single member with noise 1 around 0 gives the normal quantile
    one = SamplePosterior(torch.zeros(1, 1, 1, dtype=dtype), noise_variance=1.0)
    lo, hi = one.confidence_region(0.95)
    torch.testing.assert_close(hi.double().item(), Z95, atol=1e-5, rtol=0)
    torch.testing.assert_close(lo.double().item(), -Z95, atol=1e-5, rtol=0)


def test_sample_posterior_confidence_region_zero_noise_member():
    """Members with zero noise are point masses in the mixture CDF."""
    f = torch.tensor([-1.0, 2.0], dtype=torch.float64).view(2, 1, 1)
    nv = torch.zeros(2, 1, 1, dtype=torch.float64)
    lower, upper = SamplePosterior(f, noise_variance=nv).confidence_region(0.5)
    assert lower.item() == pytest.approx(-1.0) and upper.item() == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------------
# categorical summaries
# ------------------------------------------------------------------------------------------------
@DTYPES
def test_categorical_entropy_and_mutual_information(dtype):
    torch.manual_seed(20)
    S, C = 8, 4
    prob_samples = torch.softmax(2 * torch.randn(S, *BATCH, N, C, dtype=dtype), -1)
    probs = prob_samples.mean(0)
    post = CategoricalPosterior(probs, prob_samples=prob_samples)
    torch.testing.assert_close(post.entropy(), Categorical(probs=probs).entropy(), **_tol(dtype))
    mi = post.mutual_information()
    assert bool((mi >= 0).all()) and bool((mi > 0).any())
    expected_ent = Categorical(probs=prob_samples).entropy().mean(0)
    torch.testing.assert_close(mi, post.entropy() - expected_ent, **_tol(dtype))
    assert bool((mi <= post.entropy() + 1e-6).all())
    # all draws equal: no epistemic uncertainty
    same = prob_samples[:1].expand(S, *prob_samples.shape[1:])
    equal = CategoricalPosterior(same[0], prob_samples=same)
    # (exactly zero up to rounding in the mean over identical draws: a few eps times log C)
    mi_equal = equal.mutual_information()
    assert bool((mi_equal >= 0).all())
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(mi_equal, torch.zeros_like(mi_equal), atol=16 * eps, rtol=0)
    # entropy of a one-hot is zero, of the uniform is log C
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 2]), C).to(dtype)
    torch.testing.assert_close(CategoricalPosterior(onehot).entropy(), torch.zeros(2, dtype=dtype))
    uniform = CategoricalPosterior(torch.full((1, C), 1 / C, dtype=dtype))
    torch.testing.assert_close(uniform.entropy(), torch.tensor([math.log(C)], dtype=dtype))
    with pytest.raises(ValueError):
        CategoricalPosterior(probs).mutual_information()


@DTYPES
@pytest.mark.parametrize("level", [0.3, 0.5, 0.8, 0.95, 0.999])
def test_categorical_prediction_set(level, dtype):
    torch.manual_seed(21)
    probs = torch.softmax(2 * torch.randn(*BATCH, N, 6, dtype=dtype), -1)
    sets = CategoricalPosterior(probs).prediction_set(level)
    mass = (probs * sets).sum(-1)
    size = sets.sum(-1)
    assert bool((mass >= level).all())  # covers at least `level`
    assert bool((size >= 1).all())
    # minimal: no smaller set reaches `level` (the `size - 1` largest classes fall short)
    top = probs.sort(-1, descending=True).values.cumsum(-1)
    below = torch.where(size > 1, top.gather(-1, (size - 2).clamp_min(0).unsqueeze(-1))[..., 0], 0)
    assert bool((below < level).all())
    # and it holds the most probable classes: every kept class beats every dropped one
    kept_min = torch.where(sets, probs, torch.inf).amin(-1)
    dropped_max = torch.where(sets, -torch.inf, probs).amax(-1)
    assert bool((kept_min >= dropped_max).all())


def test_categorical_prediction_set_known():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    post = CategoricalPosterior(probs)
    assert post.prediction_set(0.5).tolist() == [[False, True, False], [True, False, False]]
    assert post.prediction_set(0.85).tolist() == [[False, True, True], [True, True, True]]
    assert post.prediction_set(1.0).all()
    for level in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError):
            post.prediction_set(level)


# ------------------------------------------------------------------------------------------------
# observation noise
# ------------------------------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("kind", ["diag", "joint"])
def test_add_observation_noise(kind, dtype):
    torch.manual_seed(22)
    m = 2
    post = _gaussian(kind, m, dtype)
    noisy = post.add_observation_noise(0.25)
    assert isinstance(noisy, GaussianPosterior) and noisy.is_joint == post.is_joint
    torch.testing.assert_close(noisy.mean, post.mean)
    torch.testing.assert_close(noisy.variance, post.variance + 0.25)
    eye = torch.eye(N * m, dtype=dtype)
    torch.testing.assert_close(noisy.covariance_matrix, post.covariance_matrix + 0.25 * eye)
    # per-point, per-output noise lands on the interleaved diagonal
    nv = torch.rand(*BATCH, N, m, dtype=dtype)
    noisy = post.add_observation_noise(nv)
    torch.testing.assert_close(noisy.variance, post.variance + nv)
    expected = post.covariance_matrix + torch.diag_embed(nv.flatten(-2))
    torch.testing.assert_close(noisy.covariance_matrix, expected)
    # the original is untouched
    torch.testing.assert_close(
        post.add_observation_noise(0.0).covariance_matrix, post.covariance_matrix
    )
    with pytest.raises(ValueError):
        post.add_observation_noise(-0.1)


# ------------------------------------------------------------------------------------------------
# psd_safe_cholesky
# ------------------------------------------------------------------------------------------------
@DTYPES
def test_psd_safe_cholesky(dtype):
    torch.manual_seed(23)
    spd = _spd((2,), 5, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no jitter warning for a well-conditioned matrix
        factor = psd_safe_cholesky(spd)
    torch.testing.assert_close(factor, torch.linalg.cholesky(spd))

    # exactly singular PSD matrices (in floating point too): rank one with v[0] = 1 leaves an
    # exact zero pivot, and a zero row/column; a random v @ v.T may round to definite
    v = torch.tensor([[1.0], [2.0], [-1.0], [3.0]], dtype=dtype)
    zero_row = torch.diag(torch.tensor([2.0, 0.0, 1.0], dtype=dtype))
    for singular in (v @ v.mT, zero_row):
        with pytest.warns(JitterWarning):
            factor = psd_safe_cholesky(singular)
        assert torch.isfinite(factor).all()
        assert torch.equal(factor, factor.tril())
        scale = singular.diagonal().mean().item()
        torch.testing.assert_close(factor @ factor.mT, singular, atol=1e-3 * scale, rtol=0)

    indefinite = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=dtype))
    with pytest.raises(torch.linalg.LinAlgError):
        psd_safe_cholesky(indefinite)

    for bad in (float("nan"), float("inf")):
        for i, j in ((0, 0), (1, 0), (0, 1)):
            m = torch.eye(3, dtype=dtype)
            m[i, j] = bad
            with pytest.raises(ValueError):
                psd_safe_cholesky(m)


@DTYPES
def test_gaussian_with_singular_covariance_warns_and_samples(dtype):
    torch.manual_seed(24)
    v = torch.tensor([[1.0], [2.0], [-1.0], [3.0]], dtype=dtype)  # exactly rank one
    post = GaussianPosterior(torch.zeros(4, 1, dtype=dtype), covariance=v @ v.mT)
    with pytest.warns(JitterWarning):
        draws = post.rsample((3,))
    assert torch.isfinite(draws).all()

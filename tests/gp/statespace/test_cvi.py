"""CVI for non-Gaussian state-space GPs against an independent dense Gaussian-VI reference.

At its fixed point CVI reaches the exact Gaussian-VI optimum ``q(f) = N(m, S)`` of the dense
GP (the Kalman/RTS smoother on the pseudo-data is exact), so ELBO and marginals must agree
with a dense solver to the convergence tolerance. The dense reference here builds the Matérn
Gram matrix with gpytorch, computes ``ELBO = sum_i E_q[log p(y_i | f_i)] - KL(q || p)``
directly (Cholesky of K and S) and finds the optimum by its own damped dense fixed-point
iteration; the optimum is also checked through the Opper–Archambeau conditions
``m = K g_m`` and ``S^{-1} = K^{-1} + diag(-2 g_v)``.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from gpytorch.kernels import MaternKernel, ScaleKernel
from gpytorch.likelihoods import BernoulliLikelihood, GaussianLikelihood, StudentTLikelihood
from scipy import integrate, stats

import gp
from gp.statespace import (
    BernoulliLogitLikelihood,
    CVIConfig,
    CVISites,
    PoissonLikelihood,
    StateSpaceGP,
    cvi_elbo,
    expected_log_lik,
    expected_log_lik_grads,
    kernel_to_sde,
    make_grid,
    predictive_moments,
    run_cvi,
)

DT = torch.float64
TIGHT = CVIConfig(tol=1e-12)
N_QUAD = 20  # Gauss–Hermite points, as in CVIConfig's default


# ---------------------------------------------------------------------- data and reference
def _kernel(lengthscale: float = 2.0, outputscale: float = 1.5) -> ScaleKernel:
    kernel = ScaleKernel(MaternKernel(nu=1.5)).to(DT)
    kernel.base_kernel.lengthscale = lengthscale
    kernel.outputscale = outputscale
    return kernel


def _data(kind: str, n: int = 200, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Irregular, unsorted times on [0, 40] and labels/counts drawn from the GP prior."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 40, n, dtype=DT) + 0.1 * torch.rand(n, generator=g, dtype=DT)
    t = t[torch.randperm(n, generator=g)]
    with torch.no_grad():
        K = _kernel()(t).to_dense()
    f = torch.linalg.cholesky(K) @ torch.randn(n, generator=g, dtype=DT)
    if kind == "poisson":
        return t, torch.poisson(f.exp(), generator=g)
    return t, (torch.rand(n, generator=g, dtype=DT) < torch.special.ndtr(f)).to(DT)


def _likelihood(kind: str):
    return PoissonLikelihood() if kind == "poisson" else BernoulliLikelihood()


def _model(kind: str, method: str = "parallel", **kernel_args: float) -> StateSpaceGP:
    lik = _likelihood(kind)
    return StateSpaceGP(_kernel(**kernel_args), likelihood=lik, method=method, cvi=TIGHT).to(DT)


def _dense_expected(kind: str, y: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """E_{N(m, v)}[log p(y | f)]: closed form (Poisson) or physicists' Gauss–Hermite."""
    if kind == "poisson":
        return y * m - torch.exp(m + v / 2) - torch.lgamma(y + 1)
    x, w = (torch.as_tensor(a, dtype=DT) for a in np.polynomial.hermite.hermgauss(N_QUAD))
    f = m[:, None] + torch.sqrt(2 * v)[:, None] * x
    return (torch.special.log_ndtr((2 * y[:, None] - 1) * f) * w).sum(-1) / math.sqrt(math.pi)


def _dense_grads(kind: str, y: torch.Tensor, m: torch.Tensor, v: torch.Tensor):
    m, v = m.detach().requires_grad_(True), v.detach().requires_grad_(True)
    return torch.autograd.grad(_dense_expected(kind, y, m, v).sum(), (m, v))


def _gauss_kl(m: torch.Tensor, S: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """KL(N(m, S) || N(0, K)) by Cholesky factors."""
    LK, LS = torch.linalg.cholesky(K), torch.linalg.cholesky(S)
    A = torch.linalg.solve_triangular(LK, LS, upper=False)
    a = torch.linalg.solve_triangular(LK, m[:, None], upper=False)
    logdet = 2 * (LK.diagonal().log().sum() - LS.diagonal().log().sum())
    return 0.5 * (A.pow(2).sum() + a.pow(2).sum() - m.shape[0] + logdet)


def _q_from_sites(K: torch.Tensor, lam1: torch.Tensor, lam2: torch.Tensor):
    """m, S of q ∝ N(0, K) prod exp(lam1 f - lam2 f^2 / 2): S = (K^-1 + diag lam2)^-1."""
    d = lam2.sqrt()
    B = torch.eye(K.shape[0], dtype=DT) + d[:, None] * K * d[None, :]
    C = torch.linalg.solve_triangular(torch.linalg.cholesky(B), d[:, None] * K, upper=False)
    S = K - C.mT @ C
    return S @ lam1, 0.5 * (S + S.mT)


def _dense_elbo(kind, y, K, m, S) -> torch.Tensor:
    return _dense_expected(kind, y, m, S.diagonal()).sum() - _gauss_kl(m, S, K)


def _dense_vi(kind: str, y: torch.Tensor, K: torch.Tensor):
    """Dense Gaussian VI by damped fixed-point (natural-gradient) updates of (lam1, lam2)."""
    v0 = K.diagonal()
    g_m, g_v = _dense_grads(kind, y, torch.zeros_like(y), v0)
    lam2 = -2 * g_v
    lam1 = g_m.clone()
    for _ in range(2000):
        m, S = _q_from_sites(K, lam1, lam2)
        g_m, g_v = _dense_grads(kind, y, m, S.diagonal())
        t2, t1 = -2 * g_v, g_m - 2 * g_v * m
        change = max(float(((t1 - lam1).abs() / (t1.abs() + t2.sqrt())).max()),
                     float(((t2 - lam2).abs() / t2).max()))  # fmt: skip
        if change < 1e-13:
            return m, S, lam1, lam2
        lam1, lam2 = 0.5 * (lam1 + t1), 0.5 * (lam2 + t2)
    raise AssertionError("dense reference did not converge")


@pytest.fixture(scope="module", params=["poisson", "bernoulli"])
def fitted(request):
    torch.set_num_threads(1)  # module-scoped: runs before conftest's per-test thread setting
    kind = request.param
    t, y = _data(kind)
    with torch.no_grad():
        K = _kernel()(t).to_dense()
    m, S, lam1, lam2 = _dense_vi(kind, y, K)
    model = _model(kind).set_data(t, y)
    elbo = model.log_marginal_likelihood().detach()  # the differentiable path's value
    return {"kind": kind, "t": t, "y": y, "K": K, "m": m, "S": S, "lam1": lam1,
            "lam2": lam2, "model": model, "elbo": elbo}  # fmt: skip


# ------------------------------------------------------------------ exactness vs the dense GP
def test_elbo_and_marginals_match_dense_vi(fitted) -> None:
    kind, y, K, m, S = (fitted[k] for k in ("kind", "y", "K", "m", "S"))
    dense = _dense_elbo(kind, y, K, m, S)
    # both sides converged to 1e-12 / 1e-13 relative site change: agreement to ~1e-10
    assert float(fitted["elbo"]) == pytest.approx(float(dense), rel=1e-9)
    with torch.no_grad():
        post = fitted["model"].posterior(fitted["t"])
    torch.testing.assert_close(post.mean.squeeze(-1), m, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(post.variance.squeeze(-1), S.diagonal(), rtol=1e-8, atol=1e-10)


def test_sites_match_dense_and_satisfy_optimality(fitted) -> None:
    kind, y, K = fitted["kind"], fitted["y"], fitted["K"]
    sites = fitted["model"].sites
    torch.testing.assert_close(sites.nat2, fitted["lam2"], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(sites.nat1, fitted["lam1"], rtol=1e-8, atol=1e-9)
    # Opper–Archambeau fixed point: m = K g_m and site precisions = -2 g_v at q's marginals
    m, S = _q_from_sites(K, sites.nat1, sites.nat2)
    g_m, g_v = _dense_grads(kind, y, m, S.diagonal())
    torch.testing.assert_close(K @ g_m, m, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(-2 * g_v, sites.nat2, rtol=1e-8, atol=1e-10)
    # the pseudo-data identity log Z + E - E[log t] equals E - KL(q || p) at these sites
    dense = _dense_elbo(kind, y, K, m, S)
    assert float(fitted["elbo"]) == pytest.approx(float(dense), rel=1e-9)


def test_posterior_at_new_times_matches_dense(fitted) -> None:
    t, K, model = fitted["t"], fitted["K"], fitted["model"]
    kernel = _kernel()
    t_new = torch.tensor([-3.0, 0.05, 7.31, 22.2, 39.99, 45.0], dtype=DT)
    lam1, lam2 = model.sites.nat1, model.sites.nat2
    with torch.no_grad():
        k_new = kernel(t_new, t).to_dense()
        k_nn = kernel(t_new, diag=True)
        # q(f*) = N(k*^T K^-1 m, k** - k*^T (K + Lam^-1)^-1 k*), m = (K^-1 + Lam)^-1 lam1
        m, _ = _q_from_sites(K, lam1, lam2)
        mean = k_new @ torch.linalg.solve(K, m)
        var = k_nn - (k_new * torch.linalg.solve(K + torch.diag(1 / lam2), k_new.mT).mT).sum(-1)
        k_full = kernel(t_new, t_new).to_dense()
        cov = k_full - k_new @ torch.linalg.solve(K + torch.diag(1 / lam2), k_new.mT)
        post = model.posterior(t_new)
        joint = post.covariance_matrix  # the joint q(f(t_new)), also what FFBS draws from
    assert isinstance(post, gp.GaussianPosterior) and post.mean.shape == (6, 1)
    torch.testing.assert_close(post.mean.squeeze(-1), mean, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(post.variance.squeeze(-1), var, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(joint, cov, rtol=1e-8, atol=1e-9)
    draws = post.rsample(torch.Size([3]))
    assert draws.shape == (3, 6, 1) and bool(torch.isfinite(draws).all())


def test_elbo_gradient_matches_dense_and_finite_differences(fitted) -> None:
    kind, t, y, m, S = (fitted[k] for k in ("kind", "t", "y", "m", "S"))
    model = fitted["model"]
    params = [model.kernel.raw_outputscale, model.kernel.base_kernel.raw_lengthscale]
    model.zero_grad()
    model.log_marginal_likelihood().backward()
    grads = torch.stack([p.grad.reshape(()) for p in params])
    # envelope theorem: d ELBO*/d theta = -d KL(q || p_theta)/d theta at the optimal q (fixed)
    kernel = _kernel()
    dense = -_gauss_kl(m, S, kernel(t).to_dense())
    dense_params = [kernel.raw_outputscale, kernel.base_kernel.raw_lengthscale]
    dense_grads = torch.stack([g.reshape(()) for g in torch.autograd.grad(dense, dense_params)])
    torch.testing.assert_close(grads, dense_grads, rtol=1e-8, atol=1e-8)
    # central differences of the converged ELBO (h = 1e-5: truncation ~h^2, rounding ~1e-7)
    h, fd = 1e-5, []
    for p in params:
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                p.add_(sign * h)
                values.append(float(model.log_marginal_likelihood()))
                p.sub_(sign * h)
        fd.append((values[0] - values[1]) / (2 * h))
    torch.testing.assert_close(grads, torch.tensor(fd, dtype=DT), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- CVI properties
def test_gaussian_likelihood_is_exact_in_one_step() -> None:
    t, _ = _data("poisson", n=60)
    y = torch.sin(t) + 0.3 * torch.randn(60, dtype=DT)
    exact = StateSpaceGP(_kernel(), noise=0.3).to(DT)
    lik = GaussianLikelihood().to(DT)
    lik.noise = exact.noise.detach()  # the same float64 variance on both sides
    sde = kernel_to_sde(_kernel(), dtype=DT)
    grid = make_grid(t, y)
    start = (torch.zeros(60, dtype=DT), torch.full((60,), 7.0, dtype=DT))  # arbitrary sites
    one = CVIConfig(step_size=1.0, max_iter=1)
    with torch.no_grad():
        res = run_cvi(lik, sde, grid, y, grid.train_index, *start, config=one)
        lml = exact.log_marginal_likelihood(t, y)
        post = exact.set_data(t, y).posterior(t)
    assert res.iterations == 1 and res.converged
    assert float(res.elbo) == pytest.approx(float(lml), rel=1e-12)
    torch.testing.assert_close(res.mean, post.mean.squeeze(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.var, post.variance.squeeze(-1), rtol=1e-10, atol=1e-12)
    # at sites other than the optimum the ELBO is a strict lower bound
    with pytest.warns(RuntimeWarning, match="did not converge"), torch.no_grad():
        zero = run_cvi(lik, sde, grid, y, grid.train_index, *start, config=CVIConfig(max_iter=0))
    assert float(zero.elbo) < float(lml) - 1.0


def test_gaussian_likelihood_object_selects_the_exact_path() -> None:
    t, _ = _data("poisson", n=30)
    y = torch.cos(t)
    lik = GaussianLikelihood()
    lik.noise = 0.2
    model = StateSpaceGP(_kernel(), likelihood=lik).to(DT)
    assert model.likelihood is None and model.sites is None
    assert model.noise.item() == pytest.approx(0.2, rel=1e-6)
    reference = StateSpaceGP(_kernel(), noise=float(model.noise.detach())).to(DT)
    with torch.no_grad():
        assert float(model.log_marginal_likelihood(t, y)) == pytest.approx(
            float(reference.log_marginal_likelihood(t, y)), rel=1e-12
        )


@pytest.mark.parametrize("kind", ["poisson", "bernoulli"])
def test_elbo_is_below_the_exact_evidence(kind: str) -> None:
    """n = 2: log p(y) by a 2-D Gauss–Hermite product rule (80^2 points) over f = L z."""
    t = torch.tensor([0.0, 1.3], dtype=DT)
    y = torch.tensor([3.0, 0.0] if kind == "poisson" else [1.0, 0.0], dtype=DT)
    with torch.no_grad():
        L = torch.linalg.cholesky(_kernel()(t).to_dense())
        elbo = float(_model(kind).log_marginal_likelihood(t, y))
    x, w = np.polynomial.hermite_e.hermegauss(80)
    z = torch.as_tensor(np.stack(np.meshgrid(x, x, indexing="ij"), -1).reshape(-1, 2))
    wz = torch.as_tensor(np.outer(w, w).reshape(-1) / (2 * math.pi))
    f = z @ L.mT
    if kind == "poisson":
        log_lik = (y * f - f.exp() - torch.lgamma(y + 1)).sum(-1)
    else:
        log_lik = torch.special.log_ndtr((2 * y - 1) * f).sum(-1)
    log_evidence = float(torch.logsumexp(log_lik + wz.log(), 0))
    assert elbo < log_evidence
    assert log_evidence - elbo < 0.2  # a Gaussian q is close on two points


def test_sequential_equals_parallel_and_warm_start() -> None:
    t, y = _data("poisson", n=60)
    seq, par = _model("poisson", "sequential"), _model("poisson", "parallel")
    with torch.no_grad():
        e_seq = seq.log_marginal_likelihood(t, y)
        e_par = par.log_marginal_likelihood(t, y)
    assert float(e_seq) == pytest.approx(float(e_par), rel=1e-10)
    torch.testing.assert_close(seq.sites.nat1, par.sites.nat1, rtol=1e-8, atol=1e-10)
    # stored sites are the fixed point: a warm restart needs no update
    sde = kernel_to_sde(seq.kernel, dtype=DT)
    grid = make_grid(t, y)
    with torch.no_grad():
        res = run_cvi(PoissonLikelihood(), sde, grid, y, grid.train_index,
                      seq.sites.nat1, seq.sites.nat2, config=TIGHT)  # fmt: skip
    assert res.iterations == 0 and res.converged


def test_logit_likelihood_and_damping_reach_the_same_optimum() -> None:
    t, y = _data("bernoulli", n=60)
    sde = kernel_to_sde(_kernel(), dtype=DT)
    grid = make_grid(t, y)
    lik = BernoulliLogitLikelihood()
    with torch.no_grad():
        full = run_cvi(lik, sde, grid, y, grid.train_index, config=TIGHT, method="parallel")
        damped = run_cvi(lik, sde, grid, y, grid.train_index,
                         config=CVIConfig(step_size=0.3, tol=1e-12), method="parallel")  # fmt: skip
    assert full.converged and damped.converged and damped.iterations > full.iterations
    assert float(full.elbo) == pytest.approx(float(damped.elbo), rel=1e-10)
    torch.testing.assert_close(full.mean, damped.mean, rtol=1e-8, atol=1e-9)
    # at the optimum the ELBO is stationary in (m, v): the sites equal their CVI targets
    _, g_m, g_v = expected_log_lik_grads(lik, y, full.mean, full.var)
    torch.testing.assert_close(-2 * g_v, full.nat2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_m - 2 * g_v * full.mean, full.nat1, rtol=1e-9, atol=1e-10)


def test_missing_values_are_skipped() -> None:
    t, y = _data("poisson", n=50)
    y_nan = y.clone()
    y_nan[[3, 17, 40]] = float("nan")
    keep = ~torch.isnan(y_nan)
    with torch.no_grad():
        full = _model("poisson").log_marginal_likelihood(t, y_nan)
        sub = _model("poisson").log_marginal_likelihood(t[keep], y[keep])
    assert float(full) == pytest.approx(float(sub), rel=1e-10)
    # nothing observed: ELBO = log p(empty) = 0 and q(f) is the prior
    model = _model("poisson").set_data(t, torch.full_like(y, float("nan")))
    with torch.no_grad():
        assert float(model.log_marginal_likelihood()) == 0.0
        post = model.posterior(torch.tensor([1.0, 20.0], dtype=DT))
    torch.testing.assert_close(post.mean, torch.zeros(2, 1, dtype=DT))
    torch.testing.assert_close(post.variance, torch.full((2, 1), 1.5, dtype=DT))


# ---------------------------------------------------------------------- likelihood pieces
@pytest.mark.parametrize(
    "lik", [PoissonLikelihood(), BernoulliLikelihood(), BernoulliLogitLikelihood()]
)
def test_expected_log_lik_and_grads(lik) -> None:
    y = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=DT)
    if isinstance(lik, PoissonLikelihood):
        y = torch.tensor([0.0, 1.0, 4.0, 12.0], dtype=DT)
    m = torch.tensor([-1.0, 0.2, 1.5, 2.4], dtype=DT)
    v = torch.tensor([0.3, 1.1, 0.05, 2.0], dtype=DT)
    value, g_m, g_v = expected_log_lik_grads(lik, y, m, v)
    # against 1-D adaptive integration of log p(y | f) N(f; m, v)
    for i in range(4):
        yi, mi, si = float(y[i]), float(m[i]), math.sqrt(float(v[i]))
        if isinstance(lik, PoissonLikelihood):
            logp = lambda f, yi=yi: stats.poisson.logpmf(yi, math.exp(f))  # noqa: E731
        elif isinstance(lik, BernoulliLikelihood):
            logp = lambda f, yi=yi: stats.norm.logcdf((2 * yi - 1) * f)  # noqa: E731
        else:
            logp = lambda f, yi=yi: -math.log1p(math.exp(-(2 * yi - 1) * f))  # noqa: E731
        ref, _ = integrate.quad(
            lambda f, mi=mi, si=si, logp=logp: logp(f) * stats.norm.pdf(f, mi, si),
            mi - 12 * si, mi + 12 * si, epsabs=1e-13, epsrel=1e-12,
        )  # fmt: skip
        assert float(value[i]) == pytest.approx(ref, rel=1e-7, abs=1e-9)
    # derivatives: central differences of expected_log_lik
    h = 1e-6
    for grad, dm, dv in ((g_m, h, 0.0), (g_v, 0.0, h)):
        up = expected_log_lik(lik, y, m + dm, v + dv)
        down = expected_log_lik(lik, y, m - dm, v - dv)
        torch.testing.assert_close(grad, (up - down) / (2 * h), rtol=1e-6, atol=1e-8)


def test_predictive_moments() -> None:
    m = torch.tensor([-0.7, 0.4, 1.9], dtype=DT)
    v = torch.tensor([0.2, 1.5, 0.6], dtype=DT)
    for lik in (PoissonLikelihood(), BernoulliLikelihood(), BernoulliLogitLikelihood()):
        mean, var = predictive_moments(lik, m, v)
        for i in range(3):
            mi, si = float(m[i]), math.sqrt(float(v[i]))
            if isinstance(lik, PoissonLikelihood):
                e1 = lambda f: math.exp(f)  # noqa: E731
                e2 = lambda f: math.exp(f) + math.exp(2 * f)  # E[y^2 | f]  # noqa: E731
            else:
                cdf = stats.norm.cdf if isinstance(lik, BernoulliLikelihood) else _sigmoid
                e1 = e2 = cdf
            p1, p2 = _normal_expectation(e1, mi, si), _normal_expectation(e2, mi, si)
            # 20-point Gauss–Hermite for the logit mean: accurate to ~1e-8 here
            assert float(mean[i]) == pytest.approx(p1, rel=1e-7)
            assert float(var[i]) == pytest.approx(p2 - p1**2, rel=1e-7)


def _normal_expectation(fn, mean: float, std: float) -> float:
    """E_{N(mean, std^2)}[fn(f)] by adaptive quadrature over mean +- 12 std."""
    pdf = stats.norm(mean, std).pdf
    lo, hi = mean - 12 * std, mean + 12 * std
    return integrate.quad(lambda f: fn(f) * pdf(f), lo, hi, epsabs=1e-13, epsrel=1e-12)[0]


def _sigmoid(f: float) -> float:
    return 1.0 / (1.0 + math.exp(-f))


# ---------------------------------------------------------------------- model API
def test_state_dict_round_trip() -> None:
    t, y = _data("poisson", n=40)
    model = _model("poisson", lengthscale=3.0)
    with torch.no_grad():
        elbo = model.log_marginal_likelihood(t, y)
    assert set(model.state_dict()) >= {"sites.nat1", "sites.nat2"}
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = _model("poisson")  # other hyperparameters, no sites yet
    assert clone.sites.nat1.shape == (0,)
    clone.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(clone.sites.nat1, model.sites.nat1, rtol=0, atol=0)
    assert float(clone.kernel.base_kernel.lengthscale.detach()) == pytest.approx(3.0)
    with torch.no_grad():
        assert float(clone.log_marginal_likelihood(t, y)) == float(elbo)
        a = model.set_data(t, y).posterior(t[:5])
        b = clone.set_data(t, y).posterior(t[:5])
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)


def test_non_gaussian_model_parameters() -> None:
    model = StateSpaceGP(_kernel(), likelihood=PoissonLikelihood())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"kernel.raw_outputscale", "kernel.base_kernel.raw_lengthscale"}


@pytest.mark.parametrize(
    ("kind", "y", "pattern"),
    [
        ("poisson", [1.0, -1.0, 2.0], "non-negative integer counts"),
        ("poisson", [1.0, 0.5, 2.0], "non-negative integer counts"),
        ("bernoulli", [1.0, 0.0, 2.0], "labels 0 or 1"),
        ("bernoulli", [1.0, -1.0, 0.0], "labels 0 or 1"),
        ("poisson", [1.0, float("inf"), 2.0], "y contains inf"),
    ],
)
def test_bad_targets_raise(kind: str, y: list[float], pattern: str) -> None:
    t = torch.tensor([0.0, 1.0, 2.0], dtype=DT)
    with pytest.raises(ValueError, match=pattern):
        _model(kind).log_marginal_likelihood(t, torch.tensor(y, dtype=DT))
    with pytest.raises(ValueError, match=pattern):
        _model(kind).set_data(t, torch.tensor(y, dtype=DT)).posterior(t)


def test_bad_arguments_raise() -> None:
    t = torch.tensor([0.0, 1.0, float("nan")], dtype=DT)
    with pytest.raises(ValueError, match="t contains NaN"):
        _model("poisson").log_marginal_likelihood(t, torch.ones(3, dtype=DT))
    with pytest.raises(TypeError, match="likelihood must be None or one of"):
        StateSpaceGP(_kernel(), likelihood=StudentTLikelihood())
    with pytest.raises(ValueError, match="step_size"):
        CVIConfig(step_size=1.5)
    with pytest.raises(ValueError, match="max_iter"):
        CVIConfig(max_iter=-1)
    model = _model("poisson").set_data(torch.arange(3.0, dtype=DT), torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="observation_noise=True needs a Gaussian"):
        model.posterior(torch.zeros(1, dtype=DT), observation_noise=True)
    sde = kernel_to_sde(_kernel(), dtype=DT)
    with pytest.raises(ValueError, match=r"y must have shape \(n,\)"):
        cvi_elbo(PoissonLikelihood(), sde, torch.arange(3.0, dtype=DT),
                 torch.ones(2, 3, dtype=DT), CVISites())  # fmt: skip


# ---------------------------------------------------------------------- hyperparameters
@pytest.mark.slow
def test_fit_recovers_lengthscale_of_a_poisson_series() -> None:
    """Type-II ML on the ELBO via gp.fit_hyperparameters (L-BFGS; CVI runs inside every call).

    Counts from a Matérn-3/2 GP (lengthscale 3, outputscale 1) on 500 points over [0, 250]:
    starting from lengthscale 0.5, the fitted lengthscale must land within a factor 2 of 3
    (loose: one series of counts pins it only to tens of percent; the ELBO's maximiser over
    a lengthscale grid lay in [2, 4] for each of five seeds tried at this size).
    """
    g = torch.Generator().manual_seed(3)
    n = 500
    t = torch.linspace(0, 250, n, dtype=DT)
    with torch.no_grad():
        K = _kernel(lengthscale=3.0, outputscale=1.0)(t).to_dense()
    f = torch.linalg.cholesky(K) @ torch.randn(n, generator=g, dtype=DT)
    y = torch.poisson(f.exp(), generator=g)
    model = _model("poisson", lengthscale=0.5, outputscale=1.0).set_data(t, y)
    history = gp.fit_hyperparameters(model, max_iter=20)
    assert history[-1] < history[0]
    assert 1.5 < float(model.kernel.base_kernel.lengthscale.detach()) < 6.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    t, y = _data("poisson", n=80)
    cpu = _model("poisson", method="sequential")
    gpu = _model("poisson", method="auto").cuda()  # "auto" is the parallel scan on CUDA
    with torch.no_grad():
        e_cpu = cpu.log_marginal_likelihood(t, y)
        e_gpu = gpu.log_marginal_likelihood(t.cuda(), y.cuda())
        post = gpu.set_data(t.cuda(), y.cuda()).posterior(t[:4].cuda())
    assert float(e_gpu) == pytest.approx(float(e_cpu), rel=1e-9)
    assert post.mean.device.type == "cuda"

"""SVGP against independent references: gpytorch's VariationalELBO, Titsias' collapsed bound,
the exact GP posterior; non-Gaussian likelihoods, float32, batches, state_dict, bad inputs."""

from __future__ import annotations

import copy
import math

import gpytorch
import pytest
import torch
from gpytorch.kernels import RBFKernel, ScaleKernel
from gpytorch.likelihoods import GaussianLikelihood

from gp import SVGP, ExactGP, GaussianPosterior, PoissonLikelihood, select_inducing_points
from gp.sparse import nearest_neighbour_noise_variance
from gp.sparse._whitened import _WhitenedMarginals

DT = torch.float64


def _kernel(batch_shape: tuple[int, ...] = (), lengthscale: float = 0.6) -> ScaleKernel:
    k = ScaleKernel(RBFKernel(batch_shape=batch_shape), batch_shape=batch_shape).to(DT)
    k.base_kernel.lengthscale = lengthscale
    k.outputscale = 1.3
    return k


def _data(n: int = 60, d: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=g, dtype=DT) * 3
    f = torch.sin(2 * X[:, 0]) + 0.5 * X[:, -1]
    return X, f + 0.1 * torch.randn(n, generator=g, dtype=DT)


def _perturb_q(model: SVGP, seed: int = 0) -> None:
    """Move q(v) away from the prior to a random valid distribution."""
    g = torch.Generator().manual_seed(seed)
    dist = model.gp.variational_strategy._variational_distribution
    M = model.num_inducing
    with torch.no_grad():
        if model.natural_gradients:  # theta_1 = S^-1 m, theta_2 = -S^-1 / 2
            B = torch.randn(M, M, generator=g, dtype=DT) / M
            prec = torch.eye(M, dtype=DT) + B @ B.mT
            dist.natural_mat.copy_(-0.5 * prec)
            dist.natural_vec.copy_(prec @ torch.randn(M, generator=g, dtype=DT))
        else:
            dist.variational_mean.copy_(torch.randn(M, generator=g, dtype=DT))
            tril = torch.randn(M, M, generator=g, dtype=DT).tril() * 0.2
            dist.chol_variational_covar.copy_(tril + torch.eye(M, dtype=DT))


def _titsias_bound(K, X, Z, y, noise: float, mean: float = 0.0) -> float:
    """Collapsed bound log N(y; mu, Q + s2 I) - tr(K - Q) / (2 s2), Q = K_xz K_zz^-1 K_zx."""
    with torch.no_grad():
        Kzz, Kxz = K(Z).to_dense(), K(X, Z).to_dense()
        Q = Kxz @ torch.linalg.solve(Kzz, Kxz.mT)
        n = X.shape[0]
        cov = Q + noise * torch.eye(n, dtype=DT)
        r = y - mean
        log_n = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=DT), cov).log_prob(r)
        trace = (K(X, diag=True) - Q.diagonal()).sum()
    return float(log_n - trace / (2 * noise))


def _optimal_q_step(model: SVGP, X: torch.Tensor, y: torch.Tensor) -> None:
    """One full-batch natural-gradient step with lr 1 on q(v), hyperparameters frozen."""
    for p in model.hyperparameters():
        p.requires_grad_(False)
    model.fit((X, y), epochs=1, batch_size=X.shape[0], ngd_lr=1.0, seed=0)


# ------------------------------------------------------------------ against gpytorch itself


@pytest.mark.parametrize("natural", [True, False])
def test_elbo_and_gradients_equal_gpytorch_variational_elbo(natural):
    X, y = _data()
    Z = X[:12].clone()
    model = SVGP(_kernel(), Z, natural_gradients=natural, noise=0.05).to(DT)
    with torch.no_grad():
        model.gp.mean_module.constant.fill_(0.2)
    _perturb_q(model)
    ref = copy.deepcopy(model)
    n = X.shape[0]
    idx = torch.arange(0, n, 3)  # a minibatch of 20 of the 60 points
    ours = model.elbo(X[idx], y[idx], num_data=n) * n  # elbo is per datum: ELBO / N
    mll = gpytorch.mlls.VariationalELBO(ref.likelihood, ref.gp, num_data=n)
    theirs = mll(ref.gp(X[idx]), y[idx]) * n
    assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-10)
    ours.backward()
    theirs.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-8, atol=1e-10), name


def test_whitened_marginals_gradcheck():
    g = torch.Generator().manual_seed(0)
    M, B = 5, 7
    A0 = torch.randn(M, M, generator=g, dtype=DT)
    Kzz = (A0 @ A0.mT + M * torch.eye(M, dtype=DT)).requires_grad_()
    Kzx = torch.randn(M, B, generator=g, dtype=DT, requires_grad=True)
    R = torch.randn(M, M, generator=g, dtype=DT)
    middle = (R @ R.mT - torch.eye(M, dtype=DT)).requires_grad_()
    m = torch.randn(M, generator=g, dtype=DT, requires_grad=True)

    def f(K, Kzx, P, m):  # symmetric arguments, as the function assumes
        sym = lambda B: 0.5 * (B + B.mT)  # noqa: E731
        return _WhitenedMarginals.apply(sym(K), Kzx, sym(P), m, 0.01)

    assert torch.autograd.gradcheck(f, (Kzz, Kzx, middle, m))


# ------------------------------------------------------------- Titsias and the exact GP


def test_optimal_q_elbo_equals_titsias_collapsed_bound():
    X, y = _data(n=50)
    Z = X[::5].clone()  # M = 10
    noise, c = 0.05, 0.3
    model = SVGP(_kernel(), Z, noise=noise, jitter=0.0).to(DT)
    with torch.no_grad():
        model.gp.mean_module.constant.fill_(c)
    _optimal_q_step(model, X, y)
    bound = _titsias_bound(model.kernel, X, Z, y, float(model.noise), c)
    elbo = X.shape[0] * model.elbo(X, y).item()  # elbo is per datum: ELBO / N
    assert abs(elbo - bound) < 1e-8 * max(1.0, abs(bound))
    # the step landed on the analytic optimum S = (I + A A^T / s2)^-1, m = S A (y - c) / s2
    with torch.no_grad():
        L = torch.linalg.cholesky(model.kernel(Z).to_dense())
        A = torch.linalg.solve_triangular(L, model.kernel(Z, X).to_dense(), upper=False)
        s2 = float(model.noise)
        S = torch.linalg.inv(torch.eye(10, dtype=DT) + A @ A.mT / s2)
        mean = S @ A @ (y - c) / s2
        m, R = model._q_moments()
    assert torch.allclose(m, mean, atol=1e-9)
    assert torch.allclose(R @ R.mT, S, atol=1e-9)
    # any other q(v) gives a lower ELBO
    _perturb_q(model, seed=3)
    assert X.shape[0] * model.elbo(X, y).item() < bound


def test_inducing_points_at_data_recover_exact_gp_posterior():
    g = torch.Generator().manual_seed(2)
    X = torch.linspace(0, 5, 25, dtype=DT).unsqueeze(-1)
    y = torch.sin(2 * X[:, 0]) + 0.1 * torch.randn(25, generator=g, dtype=DT)
    Xs = torch.linspace(-0.5, 5.5, 13, dtype=DT).unsqueeze(-1)
    noise = 0.04
    model = SVGP(_kernel(lengthscale=0.7), X, mean="zero", noise=noise, jitter=0.0).to(DT)
    _optimal_q_step(model, X, y)
    exact = ExactGP(_kernel(lengthscale=0.7), noise=torch.tensor(noise, dtype=DT), mean="zero")
    exact = exact.to(DT).set_data(X, y)
    with torch.no_grad():
        ours, ref = model.posterior(Xs, joint=True), exact.posterior(Xs, joint=True)
        marg = model.posterior(Xs)
        noisy, ref_noisy = (
            model.posterior(Xs, observation_noise=True),
            exact.posterior(Xs, observation_noise=True, joint=False),
        )
    assert isinstance(ours, GaussianPosterior)
    assert ours.mean.shape == (13, 1) and ours.covariance_matrix.shape == (13, 13)
    assert torch.allclose(ours.mean, ref.mean, atol=1e-6)
    assert torch.allclose(ours.covariance_matrix, ref.covariance_matrix, atol=1e-6)
    assert torch.allclose(marg.variance, ref.variance, atol=1e-6)
    assert torch.allclose(noisy.variance, ref_noisy.variance, atol=1e-6)
    # the collapsed bound at Z = X is the exact log marginal likelihood minus 0 trace term
    with torch.no_grad():
        elbo = X.shape[0] * model.elbo(X, y).item()  # elbo is per datum: ELBO / N
        assert abs(elbo - float(exact.log_marginal_likelihood())) < 1e-6


# ------------------------------------------------------------------ other likelihoods


def _classification_data(n: int = 240, classes: int = 2):
    g = torch.Generator().manual_seed(4)
    X = torch.rand(n, 2, generator=g, dtype=DT) * 4 - 2
    if classes == 2:
        return X, (X[:, 0] + 0.5 * X[:, 1] > 0).to(DT)
    angle = torch.atan2(X[:, 1], X[:, 0])
    return X, ((angle + math.pi) / (2 * math.pi) * classes).long().clamp(max=classes - 1)


def _fit_and_check_elbo(model: SVGP, X, y, epochs: int = 20) -> None:
    with gpytorch.settings.num_likelihood_samples(256):
        torch.manual_seed(0)
        before = model.elbo(X, y).item()
        model.fit((X, y), epochs=epochs, batch_size=80, lr=0.05, seed=0)
        torch.manual_seed(0)
        after = model.elbo(X, y).item()
    assert math.isfinite(before) and math.isfinite(after)
    assert after > before + 0.1 * abs(before)


def test_bernoulli_classifies():
    X, y = _classification_data()
    model = SVGP.from_data(X, y, 16, likelihood="bernoulli")
    _fit_and_check_elbo(model, X, y)
    proba = model.predict_proba(X).detach()
    assert proba.shape == (240, 2)
    assert torch.allclose(proba.sum(-1), torch.ones(240, dtype=DT))
    assert (proba.argmax(-1) == y.long()).double().mean() > 0.9
    far = torch.tensor([[2.0, 2.0], [-2.0, -2.0]], dtype=DT)  # deep inside each class
    p = model.predict_proba(far).detach()[:, 1]
    assert p[0] > 0.8 and p[1] < 0.2


def test_softmax_classifies_and_joint_posterior_is_block_diagonal():
    X, y = _classification_data(classes=3)
    model = SVGP.from_data(X, y, 16, likelihood="softmax", num_classes=3)
    assert model.inducing_points.shape == (3, 16, 2)
    _fit_and_check_elbo(model, X, y)
    proba = model.predict_proba(X, num_samples=64).detach()
    assert proba.shape == (240, 3)
    assert torch.allclose(proba.sum(-1), torch.ones(240, dtype=DT))
    assert (proba.argmax(-1) == y).double().mean() > 0.85
    with torch.no_grad():
        marg, joint = model.posterior(X[:4]), model.posterior(X[:4], joint=True)
    assert marg.mean.shape == (4, 3) and joint.covariance_matrix.shape == (12, 12)
    assert torch.allclose(joint.mean, marg.mean)
    assert torch.allclose(joint.variance, marg.variance, atol=1e-10)
    cov = joint.covariance_matrix.reshape(4, 3, 4, 3)
    other_class = ~torch.eye(3, dtype=torch.bool)
    assert cov.permute(1, 3, 0, 2)[other_class].abs().max() == 0


def test_softmax_elbo_and_posterior_agree_with_gpytorch_model():
    X, y = _classification_data(n=50, classes=3)
    model = SVGP.from_data(X, y, 8, likelihood="softmax", num_classes=3)
    strategy = model.gp.variational_strategy.base_variational_strategy
    with torch.no_grad():  # a non-prior q(v) per class
        strategy._variational_distribution.natural_vec.normal_()
    out = model.gp(X)  # gpytorch's MultitaskMultivariateNormal, (n, C)
    post = model.posterior(X)
    assert torch.allclose(post.mean, out.mean, atol=1e-10)
    assert torch.allclose(post.variance, out.variance, atol=1e-10)
    with gpytorch.settings.num_likelihood_samples(2000):  # Monte Carlo sd of the sum ~0.05
        torch.manual_seed(1)
        mll = gpytorch.mlls.VariationalELBO(model.likelihood, model.gp, num_data=50)
        theirs = (mll(model.gp(X), y) * 50).item()
        torch.manual_seed(2)
        ours = 50 * model.elbo(X, y).item()  # elbo is per datum: ELBO / N
    assert abs(ours - theirs) < 0.5


def test_poisson_recovers_rates_and_closed_form_matches_quadrature():
    g = torch.Generator().manual_seed(5)
    X = torch.rand(300, 1, generator=g, dtype=DT) * 4
    rate = torch.exp(1.0 + torch.sin(2 * X[:, 0]))
    y = torch.poisson(rate, generator=g)
    model = SVGP.from_data(X, y, 12, likelihood="poisson")
    _fit_and_check_elbo(model, X, y, epochs=30)
    pred = model.predict_mean(X).detach()
    assert pred.shape == (300,)
    assert ((pred - rate).abs() / rate).mean() < 0.2
    # closed-form expected log-likelihood equals gpytorch's Gauss-Hermite quadrature
    lik = PoissonLikelihood().to(DT)
    mean = torch.linspace(-1, 2, 7, dtype=DT)
    var = torch.linspace(0.01, 0.5, 7, dtype=DT)
    counts = torch.arange(7, dtype=DT)
    dist = gpytorch.distributions.MultivariateNormal(mean, torch.diag(var))
    closed = lik.expected_log_prob(counts, dist)
    quad = lik.quadrature(lambda f: lik.forward(f).log_prob(counts), dist)
    assert torch.allclose(closed, quad, atol=1e-8)


def test_gpytorch_likelihood_object_is_accepted():
    X, y = _data()
    lik = GaussianLikelihood()
    model = SVGP(_kernel(), X[:8], likelihood=lik).to(DT)
    assert model.likelihood is lik and model.kind == "gaussian"
    assert torch.isfinite(model.elbo(X, y))


# ---------------------------------------------------------------------- float32, batches


def test_float32_is_finite_and_close_to_float64():
    X, y = _data(n=200, d=3)
    model64 = SVGP.from_data(X, y, 32, jitter=1e-6)  # same jitter in both dtypes
    model64.fit((X, y), epochs=3, batch_size=50, seed=0)
    model32 = copy.deepcopy(model64).float()
    X32, y32 = X.float(), y.float()
    with torch.no_grad():
        e64, e32 = model64.elbo(X, y).item(), model32.elbo(X32, y32).item()
        p64, p32 = model64.posterior(X[:20]), model32.posterior(X32[:20])
    assert math.isfinite(e32) and abs(e32 - e64) < 1e-3 * abs(e64)
    assert p32.mean.dtype == torch.float32
    assert torch.allclose(p32.mean.double(), p64.mean, atol=1e-3)
    assert torch.allclose(p32.variance.double(), p64.variance, atol=1e-3)
    history = model32.fit((X32, y32), epochs=2, batch_size=50, seed=0).history_
    assert all(math.isfinite(h) for h in history)


@pytest.mark.parametrize("likelihood", ["gaussian", "softmax"])
def test_float32_model_answers_float64_inputs_in_float64(likelihood):
    # A float64 query of a float32 model computes with the parameters cast to float64: the
    # same values as a float64 copy of the model (same jitter), gradients in X as accurate.
    X, y = _data(n=90, d=2)
    if likelihood == "softmax":
        y = (X[:, 0] > 1.5).to(DT) + (X[:, 1] > 1.5).to(DT)
    classes = 3 if likelihood == "softmax" else None
    model32 = SVGP.from_data(X.float(), y.float(), 12, likelihood=likelihood, num_classes=classes)
    model32.fit((X.float(), y.float()), epochs=2, batch_size=30, seed=0)
    model64 = copy.deepcopy(model32).double()
    Xq = torch.rand(2, 3, 2, generator=torch.Generator().manual_seed(5), dtype=DT) * 3
    for joint in (False, True):
        a, b = model32.posterior(Xq, joint=joint), model64.posterior(Xq, joint=joint)
        assert a.mean.dtype == DT
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.covariance_matrix, b.covariance_matrix, rtol=1e-9, atol=1e-12)
    assert all(p.dtype == torch.float32 for p in model32.parameters())  # left as they were
    Xg = Xq.clone().requires_grad_(True)

    def moments(x):
        post = model32.posterior(x)
        return post.mean, post.variance

    assert torch.autograd.gradcheck(moments, (Xg,), eps=1e-6, atol=1e-7, rtol=1e-6)
    model32.posterior(Xq).mean.sum().backward()  # the casts pass gradients to the parameters
    assert model32.kernel.raw_outputscale.grad is not None


def _slice_model(batched: SVGP, b: int, make) -> SVGP:
    single = make()
    state = {k: (v[b] if v.dim() > 0 else v) for k, v in batched.state_dict().items()}
    single.load_state_dict(state)
    return single


def test_batch_equals_separate_models():
    X0, y0 = _data(n=40, seed=1)
    X1, y1 = _data(n=40, seed=2)
    X, y = torch.stack([X0, X1]), torch.stack([y0, y1])
    batched = SVGP.from_data(X, y, 8)
    assert batched.batch_shape == (2,) and batched.inducing_points.shape == (2, 8, 2)

    def make() -> SVGP:
        k = ScaleKernel(RBFKernel(ard_num_dims=2))
        return SVGP(k, torch.zeros(8, 2, dtype=DT)).to(DT)

    singles = [_slice_model(batched, b, make) for b in range(2)]
    for model, Xb, yb in zip(singles, (X0, X1), (y0, y1), strict=True):
        model.fit((Xb, yb), epochs=3, batch_size=16, seed=0)
    batched.fit((X, y), epochs=3, batch_size=16, seed=0)
    with torch.no_grad():
        elbo = batched.elbo(X, y)
        post = batched.posterior(X[:, :5], joint=True)
        for b, (model, Xb, yb) in enumerate(zip(singles, (X0, X1), (y0, y1), strict=True)):
            assert torch.allclose(elbo[b], model.elbo(Xb, yb), rtol=1e-8)
            single = model.posterior(Xb[:5], joint=True)
            assert torch.allclose(post.mean[b], single.mean, atol=1e-8)
            assert torch.allclose(post.covariance_matrix[b], single.covariance_matrix, atol=1e-8)


# ------------------------------------------------------------------ state and bad inputs


def test_state_dict_round_trip():
    X, y = _data()
    model = SVGP.from_data(X, y, 10)
    model.fit((X, y), epochs=2, batch_size=20, seed=0)
    clone = SVGP(ScaleKernel(RBFKernel(ard_num_dims=2)), torch.zeros(10, 2, dtype=DT))
    assert all(p.dtype == DT for p in clone.parameters())  # follows the inducing points
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(clone.elbo(X, y), model.elbo(X, y))
        a, b = clone.posterior(X[:7], joint=True), model.posterior(X[:7], joint=True)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.covariance_matrix, b.covariance_matrix)


def test_chunked_predictions_equal_unchunked(monkeypatch):
    X, y = _data()
    model = SVGP.from_data(X, y, 10)
    model.fit((X, y), epochs=1, batch_size=20, seed=0)
    with torch.no_grad():
        whole = model.posterior(X)
        monkeypatch.setattr("gp.sparse._svgp_moments.PREDICT_CHUNK", 7)
        chunked = model.posterior(X)
    assert torch.allclose(chunked.mean, whole.mean, atol=1e-12)
    assert torch.allclose(chunked.variance, whole.variance, atol=1e-12)


def test_select_inducing_points_returns_distinct_data_rows():
    X, _ = _data(n=100)
    for method in ("kmeans++", "random"):
        Z = select_inducing_points(X, 20, method, seed=3)
        assert Z.shape == (20, 2)
        assert torch.unique(Z, dim=0).shape[0] == 20
        assert all(bool((X == z).all(-1).any()) for z in Z)


def test_nearest_neighbour_noise_estimate_and_data_scaled_initialisation():
    g = torch.Generator().manual_seed(6)
    X = torch.rand(2, 4000, 2, generator=g, dtype=DT)
    sd = torch.tensor([0.1, 0.2], dtype=DT)
    y = torch.sin(3 * X[..., 0]) * X[..., 1] + sd[:, None] * torch.randn(2, 4000, generator=g)
    estimate = nearest_neighbour_noise_variance(X, y)
    assert estimate.shape == (2,)
    # 2,000 squared differences: relative sd of the estimate about sqrt(2 / 2000) = 3%
    assert torch.allclose(estimate.sqrt(), sd, rtol=0.1)
    model = SVGP.from_data(X, y, 16)
    assert torch.allclose(model.noise.squeeze(-1), estimate)
    assert torch.allclose(model.gp.mean_module.constant, y.mean(-1))
    lengthscale = model.kernel.base_kernel.lengthscale  # (2, 1, 2): per-dimension sd of X
    assert torch.allclose(lengthscale.squeeze(-2), X.std(-2).to(lengthscale.dtype), rtol=1e-5)
    fixed = SVGP.from_data(X, y, 16, noise_fraction=0.2)
    assert torch.allclose(fixed.noise.squeeze(-1), 0.2 * y.var(-1))
    pure_noise = torch.randn(4000, generator=g, dtype=DT)  # estimate ~ Var(y): clamped
    clamped = SVGP.from_data(X[0], pure_noise, 16)
    assert torch.allclose(clamped.noise, 0.5 * pure_noise.var())


def test_bad_inputs_raise_clear_errors():
    X, y = _data()
    model = SVGP(_kernel(), X[:8]).to(DT)
    bad = X.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="X contains NaN"):
        model.elbo(bad, y)
    with pytest.raises(ValueError, match="y contains NaN"):
        model.elbo(X, torch.where(torch.arange(60) == 2, float("nan"), y))
    with pytest.raises(ValueError, match="one target per row"):
        model.elbo(X, y[:-1])
    with pytest.raises(ValueError, match="d = 2"):
        model.posterior(torch.zeros(4, 3, dtype=DT))
    with pytest.raises(ValueError, match="exceeds the number of data points"):
        SVGP.from_data(X[:5], y[:5], num_inducing=6)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        SVGP(_kernel(), X[:8], likelihood="student-t")
    with pytest.raises(ValueError, match="num_classes"):
        SVGP(_kernel(), X[:8], likelihood="softmax")
    with pytest.raises(TypeError, match="kernel must be a gpytorch Kernel"):
        SVGP("rbf", X[:8])
    with pytest.raises(ValueError, match="inducing_points contains NaN"):
        SVGP(_kernel(), bad[:8])
    with pytest.raises(ValueError, match="init must be one of"):
        SVGP.from_data(X, y, 5, init="grid")
    clf = SVGP(_kernel(), X[:8], likelihood="bernoulli").to(DT)
    with pytest.raises(ValueError, match="labels 0 and 1"):
        clf.elbo(X, y)
    with pytest.raises(ValueError, match="observation_noise"):
        clf.posterior(X, observation_noise=True)
    with pytest.raises(ValueError, match="ngd_lr"):
        model.fit((X, y), ngd_lr=2.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    X, y = _data()
    model = SVGP.from_data(X, y, 10)
    model.fit((X, y), epochs=2, batch_size=20, seed=0)
    gpu = copy.deepcopy(model).cuda()
    with torch.no_grad():
        cpu_post, gpu_post = model.posterior(X[:5]), gpu.posterior(X[:5].cuda())
        assert torch.allclose(gpu.elbo(X.cuda(), y.cuda()).cpu(), model.elbo(X, y), rtol=1e-8)
    assert torch.allclose(gpu_post.mean.cpu(), cpu_post.mean, atol=1e-8)
    assert torch.allclose(gpu_post.variance.cpu(), cpu_post.variance, atol=1e-8)
    history = gpu.fit((X.cuda(), y.cuda()), epochs=1, batch_size=20, seed=0).history_
    assert all(math.isfinite(h) for h in history)

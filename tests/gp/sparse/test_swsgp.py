"""Tests of the sparse-within-sparse GP (gp.sparse.swsgp).

Exactness checks are in float64 against plain dense torch formulas written here: with
``H = M`` every point's neighbour set is all of ``Z``, so SWSGP must reproduce SVGP (Hensman
et al. 2013, unwhitened) with the same ``q(u) = N(m, diag(s) + W W^T)``, and at the optimal
``q(u)`` (representable with ``r = M``) the ELBO must equal Titsias' collapsed bound.
"""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from gpytorch.kernels import MaternKernel, RBFKernel, ScaleKernel

from bdl.core.posterior import GaussianPosterior
from gp.sparse._swsgp_kernel import block_covariance
from gp.sparse._swsgp_local import diag_lowrank_logdet, local_moments_and_kl
from gp.sparse._swsgp_neighbors import nearest_inducing
from gp.sparse.swsgp import SWSGP

F64 = torch.float64
HAS_NUMBA = importlib.util.find_spec("numba") is not None
METHODS = ["brute", "kdtree"] + (["grid"] if HAS_NUMBA else [])


def _kernel(dtype=F64, lengthscale=0.4, outputscale=1.3) -> ScaleKernel:
    k = ScaleKernel(RBFKernel()).to(dtype)
    k.base_kernel.lengthscale = lengthscale
    k.outputscale = outputscale
    return k


def _model(M=12, d=2, H=None, r=3, seed=0, dtype=F64, **kwargs) -> SWSGP:
    gen = torch.Generator().manual_seed(seed)
    Z = torch.rand(M, d, generator=gen, dtype=dtype)
    model = SWSGP(_kernel(dtype), Z, num_neighbors=H or M, rank=r, **kwargs)
    with torch.no_grad():  # a generic q(u), away from the initialisation
        model.variational_mean.copy_(torch.randn(M, generator=gen, dtype=dtype))
        model.raw_variational_diag.copy_(torch.randn(M, generator=gen, dtype=dtype) - 1.0)
        model.variational_factor.copy_(0.5 * torch.randn(M, r, generator=gen, dtype=dtype))
        model.likelihood.noise = 0.05
    return model


def _data(n=20, d=2, seed=1, dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=gen, dtype=dtype) * 1.2 - 0.1
    y = torch.sin(4 * X.sum(-1)) + 0.1 * torch.randn(n, generator=gen, dtype=dtype)
    return X, y


def _dense_svgp(model: SWSGP, X: torch.Tensor, y: torch.Tensor, num_data: int):
    """Unwhitened SVGP with the full M-dim q(u) = N(m, S), plain dense torch (autograd)."""
    Z, kern = model.inducing_points, model.kernel
    M = Z.shape[0]
    K = kern(Z, Z).to_dense() + model._jitter_value() * torch.eye(M, dtype=Z.dtype)
    Kxz = kern(X, Z).to_dense()
    kxx = kern(X, X, diag=True)
    m, S = model.variational_mean, model.variational_covariance()
    A = torch.linalg.solve(K, Kxz.mT)  # K^-1 K_zx, (M, n)
    mean = Kxz @ torch.linalg.solve(K, m)
    var = kxx - (Kxz * A.mT).sum(-1) + (A * (S @ A)).sum(0)
    kl = 0.5 * (
        torch.trace(torch.linalg.solve(K, S))
        + m @ torch.linalg.solve(K, m)
        - M
        + torch.logdet(K)
        - torch.logdet(S)
    )
    noise = model.likelihood.noise.squeeze()
    ell = -0.5 * (torch.log(2 * math.pi * noise) + ((y - mean) ** 2 + var) / noise)
    return ell.mean() - kl / num_data, mean, var, kl


# ------------------------------------------------------------------------- neighbours


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_nearest_inducing_equals_cdist_topk(method, d):
    gen = torch.Generator().manual_seed(d)
    Z = torch.rand(300, d, generator=gen, dtype=F64)
    X = torch.rand(57, d, generator=gen, dtype=F64) * 1.6 - 0.3  # some queries outside Z's box
    ref = torch.cdist(X, Z).topk(9, dim=-1, largest=False).indices
    idx = nearest_inducing(X, Z, 9, method=method, tile_size=8)
    assert idx.shape == (57, 9) and idx.dtype == torch.long
    assert torch.equal(idx, ref)


@pytest.mark.skipif(not HAS_NUMBA, reason="grid search needs numba")
def test_grid_search_degenerate_inputs():
    # Duplicated inducing inputs on a line in 3-D (two zero-extent axes): compare distances,
    # since exact ties may be ordered differently.
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(40, 1, generator=gen, dtype=F64)
    Z = torch.cat([t, t], 0) * torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    X = torch.randn(25, 3, generator=gen, dtype=F64)
    idx = nearest_inducing(X, Z, 7, method="grid")
    dist = (X.unsqueeze(1) - Z[idx]).norm(dim=-1)
    ref = torch.cdist(X, Z).topk(7, dim=-1, largest=False).values
    torch.testing.assert_close(dist, ref, rtol=0, atol=1e-12)


def test_nearest_inducing_bad_arguments():
    Z = torch.rand(10, 2)
    with pytest.raises(ValueError, match="k must"):
        nearest_inducing(torch.rand(3, 2), Z, 11)
    with pytest.raises(ValueError, match="shapes"):
        nearest_inducing(torch.rand(3, 3), Z, 2)
    with pytest.raises(ValueError, match="neighbor_method"):
        nearest_inducing(torch.rand(3, 2), Z, 2, method="faiss")


# --------------------------------------------------------------------- local algebra


@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("ard", [None, 3])
def test_rbf_block_covariance_equals_gpytorch(scaled, ard):
    # The analytic RBF block path: values and gradients (Z, lengthscale, outputscale).
    base = RBFKernel(ard_num_dims=ard).double()
    base.lengthscale = torch.tensor([0.3, 0.5, 0.7][: ard or 1], dtype=F64)
    kern = ScaleKernel(base).double() if scaled else base
    if scaled:
        kern.outputscale = 1.7
    gen = torch.Generator().manual_seed(0)
    Z = torch.rand(40, 3, generator=gen, dtype=F64).requires_grad_()
    idx = torch.randint(0, 40, (5, 6), generator=gen)
    weights = torch.randn(5, 6, 6, generator=gen, dtype=F64)
    ours = block_covariance(kern, Z[idx], 1e-3)
    ref = kern(Z[idx], Z[idx]).to_dense() + 1e-3 * torch.eye(6, dtype=F64)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-13)
    params = [Z, *kern.parameters()]
    g_ours = torch.autograd.grad((ours * weights).sum(), params)
    g_ref = torch.autograd.grad((ref * weights).sum(), params)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("r", [0, 2, 5, 7])
def test_diag_lowrank_logdet(r):
    gen = torch.Generator().manual_seed(r)
    s = torch.rand(4, 5, generator=gen, dtype=F64) + 0.1
    W = torch.randn(4, 5, r, generator=gen, dtype=F64)
    ref = torch.logdet(torch.diag_embed(s) + W @ W.mT)
    torch.testing.assert_close(diag_lowrank_logdet(s, W), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("r", [0, 2, 6])
def test_local_moments_gradcheck(r):
    # The analytic backward pass against finite differences (float64).
    gen = torch.Generator().manual_seed(r)
    B, H = 3, 4
    A = torch.randn(B, H, H, generator=gen, dtype=F64)
    K = (A @ A.mT + H * torch.eye(H, dtype=F64)).requires_grad_()
    args = [
        torch.randn(B, H, generator=gen, dtype=F64),
        torch.rand(B, generator=gen, dtype=F64) + 5.0,
        torch.randn(B, H, generator=gen, dtype=F64),
        torch.rand(B, H, generator=gen, dtype=F64) + 0.5,
        torch.randn(B, H, r, generator=gen, dtype=F64),
    ]
    args = [a.requires_grad_() for a in args]
    rows = torch.tensor([2, 0])

    def fn(K, k, kxx, m, s, W):
        K = 0.5 * (K + K.mT)  # the function is defined on symmetric matrices
        mean, var, kl = local_moments_and_kl(K, k, kxx, m, s, W, kl_rows=rows)
        return mean, var, kl

    assert torch.autograd.gradcheck(fn, (K, *args), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------ H = M equals SVGP


@pytest.mark.parametrize("kl_subsample", [None, 5])
def test_full_neighbourhood_equals_dense_svgp(kl_subsample):
    model = _model(M=12, r=3, kl_subsample=kl_subsample)
    X, y = _data(n=20)
    elbo = model.elbo(X, y, num_data=500)
    ref_elbo, ref_mean, ref_var, _ = _dense_svgp(model, X, y, 500)
    # All per-point KLs equal the global KL when H = M, so a KL subsample is exact too.
    torch.testing.assert_close(elbo, ref_elbo, rtol=1e-8, atol=1e-8)
    post = model.posterior(X)
    assert isinstance(post, GaussianPosterior) and post.mean.shape == (20, 1)
    torch.testing.assert_close(post.mean.squeeze(-1), ref_mean, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(post.variance.squeeze(-1), ref_var, rtol=1e-8, atol=1e-8)
    noisy = model.posterior(X, observation_noise=True)
    torch.testing.assert_close(
        noisy.variance.squeeze(-1), ref_var + model.likelihood.noise.squeeze(), rtol=1e-8, atol=0
    )


def test_full_neighbourhood_gradients_equal_dense_svgp():
    model = _model(M=10, r=2, kl_subsample=None)
    X, y = _data(n=15)
    params = [p for p in model.parameters() if p.requires_grad]
    assert any(p is model.inducing_points for p in params)
    grads = torch.autograd.grad(model.elbo(X, y, 300), params)
    ref = torch.autograd.grad(_dense_svgp(model, X, y, 300)[0], params)
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9)


def _titsias_bound(model: SWSGP, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    Z, kern = model.inducing_points, model.kernel
    K = kern(Z, Z).to_dense() + model._jitter_value() * torch.eye(Z.shape[0], dtype=Z.dtype)
    Kxz = kern(X, Z).to_dense()
    Q = Kxz @ torch.linalg.solve(K, Kxz.mT)
    noise = model.likelihood.noise.squeeze()
    cov = Q + noise * torch.eye(X.shape[0], dtype=X.dtype)
    log_n = torch.distributions.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y)
    return log_n - (kern(X, X, diag=True) - Q.diagonal()).sum() / (2 * noise)


def test_elbo_bounded_by_titsias_and_equal_at_the_optimum():
    # Gaussian likelihood, H = M, full batch (B = N): N * elbo is the SVGP ELBO, which is
    # <= Titsias' collapsed bound for every q(u) and equal to it at the optimal
    # q*(u) = N(sigma^-2 K Sigma K_zx y, K Sigma K), Sigma = (K + sigma^-2 K_zx K_xz)^-1.
    # With rank r = M, S* = eps I + W W^T (eps = half the smallest eigenvalue of S*) is exact.
    M, N = 8, 30
    model = _model(M=M, r=M, kl_subsample=None)
    X, y = _data(n=N)
    bound = _titsias_bound(model, X, y).detach()
    with torch.no_grad():
        assert N * model.elbo(X, y, N) < bound  # the generic q(u)
        Z, kern = model.inducing_points, model.kernel
        K = kern(Z, Z).to_dense() + model._jitter_value() * torch.eye(M, dtype=F64)
        Kzx = kern(Z, X).to_dense()
        noise = model.likelihood.noise.squeeze()
        Sigma = torch.linalg.inv(K + Kzx @ Kzx.mT / noise)
        m_opt = K @ Sigma @ Kzx @ y / noise
        S_opt = K @ Sigma @ K
        S_opt = 0.5 * (S_opt + S_opt.mT)
        eps = 0.5 * torch.linalg.eigvalsh(S_opt).min()
        model.variational_mean.copy_(m_opt)
        model.raw_variational_diag.copy_(eps.expm1().log().expand(M))
        model.variational_factor.copy_(torch.linalg.cholesky(S_opt - eps * torch.eye(M, dtype=F64)))
        torch.testing.assert_close(model.variational_covariance(), S_opt, rtol=1e-9, atol=1e-12)
        at_opt = N * model.elbo(X, y, N)
        torch.testing.assert_close(at_opt, bound, rtol=1e-8, atol=1e-8)
        model.variational_mean.add_(0.01)  # any other q is strictly worse
        assert N * model.elbo(X, y, N) < bound


# ------------------------------------------------------------------------- behaviour


def test_local_neighbourhoods_and_chunking():
    model = _model(M=40, H=6, r=2)
    X, y = _data(n=33)
    idx = model.neighbors(X)
    assert idx.shape == (33, 6)
    ref = torch.cdist(X, model.inducing_points).topk(6, largest=False).indices
    assert torch.equal(idx, ref)
    full = model.posterior(X)
    model.chunk_size = 7
    chunked = model.posterior(X)
    torch.testing.assert_close(chunked.mean, full.mean, rtol=0, atol=1e-13)
    torch.testing.assert_close(chunked.variance, full.variance, rtol=0, atol=1e-13)
    assert bool((full.variance > 0).all())
    elbo = model.elbo(X, y, 1000)
    assert elbo.shape == () and torch.isfinite(elbo)


def test_training_fits_a_small_1d_problem():
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(300, 1, generator=gen, dtype=F64) * 2 - 1
    f = lambda x: torch.sin(3 * x[:, 0])  # noqa: E731
    y = f(X) + 0.1 * torch.randn(300, generator=gen, dtype=F64)
    Z = torch.linspace(-1, 1, 40, dtype=F64).unsqueeze(-1)
    model = SWSGP(ScaleKernel(RBFKernel()).double(), Z, num_neighbors=8, rank=2)
    losses = model.fit((X, y), epochs=40, batch_size=50, seed=0).step_losses_
    assert len(losses) == 40 * 6
    assert sum(losses[-12:]) / 12 < sum(losses[:12]) / 12 - 0.5
    Xt = torch.linspace(-0.95, 0.95, 101, dtype=F64).unsqueeze(-1)
    post = model.posterior(Xt)
    # Loose: noise sd 0.1 and 300 points; a good fit has RMSE to the truth well below 0.1.
    rmse = (post.mean.squeeze(-1) - f(Xt)).pow(2).mean().sqrt()
    assert rmse < 0.1
    assert 0.05 < model.likelihood.noise.sqrt().item() < 0.2


def test_bernoulli_likelihood():
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(200, 1, generator=gen, dtype=F64) * 2 - 1
    y = (X[:, 0] > 0).to(F64)
    Z = torch.linspace(-1, 1, 10, dtype=F64).unsqueeze(-1)
    kern = _kernel(lengthscale=0.3, outputscale=1.0)
    model = SWSGP(kern, Z, num_neighbors=4, likelihood="bernoulli")
    losses = model.fit((X, y), epochs=30, batch_size=50, seed=0).step_losses_
    assert sum(losses[-8:]) / 8 < 0.5 * sum(losses[:8]) / 8
    post = model.posterior(X)
    accuracy = ((post.mean.squeeze(-1) > 0).to(F64) == y).to(F64).mean()
    assert accuracy > 0.95
    with pytest.raises(ValueError, match="observation_noise"):
        model.posterior(X, observation_noise=True)


def test_state_dict_round_trip():
    model = _model(M=15, H=5, r=2)
    X, _ = _data(n=9)
    clone = _model(M=15, H=5, r=2, seed=7)
    clone.load_state_dict(model.state_dict())
    a, b = model.posterior(X, observation_noise=True), clone.posterior(X, observation_noise=True)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.variance, b.variance)


def test_float32_finite_and_close_to_float64():
    model64 = _model(M=30, H=8, r=2, d=3)
    X, y = _data(n=40, d=3)
    model32 = _model(M=30, H=8, r=2, d=3, dtype=torch.float32)
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    p32, p64 = model32.posterior(X.float()), model64.posterior(X)
    assert bool(torch.isfinite(p32.mean).all() and torch.isfinite(p32.variance).all())
    assert bool((p32.variance >= 0).all())
    # Forward error of the K_aa solves: about cond(K_aa) * eps_float32 * max |m|.
    Z_a = model64.inducing_points[model64.neighbors(X)]
    with torch.no_grad():
        cond = torch.linalg.cond(block_covariance(model64.kernel, Z_a, 1e-4)).max()
        tol = float(cond * torch.finfo(torch.float32).eps * model64.variational_mean.abs().max())
    torch.testing.assert_close(p32.mean.double(), p64.mean, rtol=0, atol=tol)
    elbo = model32.elbo(X.float(), y.float(), 1000)
    assert torch.isfinite(elbo)
    model32.fit((X.float(), y.float()), epochs=2, batch_size=16, seed=0)
    assert all(torch.isfinite(p).all() for p in model32.parameters())


def test_float32_model_answers_float64_inputs_in_float64():
    # A float64 query of a float32 model computes with the parameters cast to float64: the
    # same values as a float64 copy of the model, gradients in X as accurate.
    model32 = _model(M=30, H=8, r=2, d=3, dtype=torch.float32)
    model64 = copy.deepcopy(model32).double()
    X, _ = _data(n=6, d=3)
    for joint in (False, True):
        a = model32.posterior(X, joint=joint, observation_noise=True)
        b = model64.posterior(X, joint=joint, observation_noise=True)
        assert a.mean.dtype == F64
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.covariance_matrix, b.covariance_matrix, rtol=1e-9, atol=1e-12)
    assert all(p.dtype == torch.float32 for p in model32.parameters())
    Xg = X[:3].clone().requires_grad_(True)

    def moments(x):
        post = model32.posterior(x)
        return post.mean, post.variance

    assert torch.autograd.gradcheck(moments, (Xg,), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_bad_inputs():
    Z = torch.rand(10, 2, dtype=F64)
    k = _kernel()
    with pytest.raises(ValueError, match="num_neighbors"):
        SWSGP(k, Z, num_neighbors=11)
    with pytest.raises(ValueError, match="rank"):
        SWSGP(k, Z, num_neighbors=3, rank=-1)
    with pytest.raises(ValueError, match="inducing_points"):
        SWSGP(k, torch.full((4, 2), float("nan")), num_neighbors=2)
    with pytest.raises(ValueError, match="inducing_points"):
        SWSGP(k, torch.rand(10), num_neighbors=2)
    with pytest.raises(TypeError, match="kernel"):
        SWSGP("rbf", Z, num_neighbors=2)
    with pytest.raises(ValueError, match="likelihood"):
        SWSGP(k, Z, num_neighbors=2, likelihood="poisson")
    with pytest.raises(ValueError, match="neighbor_method"):
        SWSGP(k, Z, num_neighbors=2, neighbor_method="ball")
    model = SWSGP(k, Z, num_neighbors=3)
    X, y = _data(n=6)
    with pytest.raises(ValueError, match="NaN"):
        model.posterior(torch.full((3, 2), float("nan"), dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        model.posterior(torch.rand(3, 3, dtype=F64))
    with pytest.raises(ValueError, match="y has shape"):
        model.elbo(X, y[:4], 10)
    with pytest.raises(ValueError, match="NaN"):
        model.elbo(X, torch.full_like(y, float("nan")), 10)
    # inputs of another dtype are computed in the model's and returned in theirs
    assert model.posterior(X.float()).mean.dtype == torch.float32
    with pytest.raises(ValueError, match="num_data"):
        model.elbo(X, y, 0)
    with pytest.raises(ValueError, match="epochs"):
        model.fit((X, y), epochs=0)
    with pytest.raises(ValueError, match="lr"):
        model.fit((X, y), epochs=1, lr=-1.0)


def test_other_gpytorch_kernel():
    # Any gpytorch kernel works (here Matern-5/2 with ARD), still matching the dense SVGP.
    gen = torch.Generator().manual_seed(3)
    Z = torch.rand(9, 2, generator=gen, dtype=F64)
    kern = ScaleKernel(MaternKernel(nu=2.5, ard_num_dims=2)).double()
    model = SWSGP(kern, Z, num_neighbors=9, rank=2, kl_subsample=None)
    X, y = _data(n=11)
    torch.testing.assert_close(
        model.elbo(X, y, 100), _dense_svgp(model, X, y, 100)[0], rtol=1e-8, atol=1e-8
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = _model(M=30, H=8, r=2, d=3)
    X, y = _data(n=40, d=3)
    cpu = model.posterior(X)
    gpu_model = model.to("cuda")
    assert gpu_model.neighbors(X.cuda()).device.type == "cuda"  # brute force on the GPU
    gpu = gpu_model.posterior(X.cuda())
    torch.testing.assert_close(gpu.mean.cpu(), cpu.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gpu.variance.cpu(), cpu.variance, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(gpu_model.elbo(X.cuda(), y.cuda(), 100))


# ------------------------------------------------------------- batches of independent GPs


def _batch_kernel(kind: str, batch_shape=torch.Size()):
    base = (
        RBFKernel(batch_shape=batch_shape)
        if kind == "rbf"
        else MaternKernel(nu=2.5, batch_shape=batch_shape)
    )
    return ScaleKernel(base, batch_shape=batch_shape).double()


def _separate_and_batched(kind="rbf", M=14, H=5, r=2, **kwargs):
    """Two unbatched models with their own hyperparameters and q(u), and one batch-of-2 model
    holding the same values (parameters stacked by name)."""
    models = []
    for g in range(2):
        gen = torch.Generator().manual_seed(10 + g)
        kern = _batch_kernel(kind)
        kern.base_kernel.lengthscale = 0.3 + 0.2 * g
        kern.outputscale = 1.1 + 0.5 * g
        Z = torch.rand(M, 2, generator=gen, dtype=F64)
        model = SWSGP(kern, Z, num_neighbors=H, rank=r, kl_subsample=None, **kwargs)
        with torch.no_grad():
            model.variational_mean.copy_(torch.randn(M, generator=gen, dtype=F64))
            model.raw_variational_diag.copy_(torch.randn(M, generator=gen, dtype=F64) - 1.0)
            model.variational_factor.copy_(0.5 * torch.randn(M, r, generator=gen, dtype=F64))
            model.likelihood.noise = 0.05 + 0.03 * g
        models.append(model)
    bs = torch.Size([2])
    batched = SWSGP(
        _batch_kernel(kind, bs),
        torch.stack([m.inducing_points.detach() for m in models]),
        num_neighbors=H,
        rank=r,
        kl_subsample=None,
        batch_shape=bs,
        **kwargs,
    )
    single = [dict(m.named_parameters()) for m in models]
    with torch.no_grad():
        for name, p in batched.named_parameters():
            p.copy_(torch.stack([s[name] for s in single]).reshape(p.shape))
    return models, batched


def _assert_params_match(models, batched, rtol, atol, grads=False):
    single = [dict(m.named_parameters()) for m in models]
    for name, p in batched.named_parameters():
        ref = torch.stack([s[name].grad if grads else s[name] for s in single])
        got = p.grad if grads else p
        torch.testing.assert_close(got, ref.reshape(p.shape), rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("method", ["auto", "brute"])
@pytest.mark.parametrize("kind", ["rbf", "matern"])
@pytest.mark.parametrize("shared_X", [True, False])
def test_batch_equals_separate_models(kind, shared_X, method):
    # float64: the batched computation is the same arithmetic, so agreement is to rounding.
    models, batched = _separate_and_batched(kind, neighbor_method=method)
    gen = torch.Generator().manual_seed(3)
    Xs = torch.rand(2, 17, 2, generator=gen, dtype=F64)
    if shared_X:
        Xs = Xs[:1].expand(2, -1, -1)
    ys = torch.randn(2, 17, generator=gen, dtype=F64)
    X_in = Xs[0] if shared_X else Xs
    elbo = batched.elbo(X_in, ys, 300)
    assert elbo.shape == (2,)
    refs = torch.stack([m.elbo(Xs[g], ys[g], 300) for g, m in enumerate(models)])
    torch.testing.assert_close(elbo, refs, rtol=1e-10, atol=1e-10)
    elbo.sum().backward()
    refs.sum().backward()
    _assert_params_match(models, batched, rtol=1e-10, atol=1e-10, grads=True)
    for joint in (False, True):
        post = batched.posterior(X_in, joint=joint, observation_noise=True)
        assert post.mean.shape == (2, 17, 1) and post.is_joint == joint
        for g, m in enumerate(models):
            ref = m.posterior(Xs[g], joint=joint, observation_noise=True)
            torch.testing.assert_close(post.mean[g], ref.mean, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(post.variance[g], ref.variance, rtol=1e-10, atol=1e-10)
            if joint:
                torch.testing.assert_close(
                    post.covariance_matrix[g], ref.covariance_matrix, rtol=1e-10, atol=1e-10
                )
    nb = batched.neighbors(X_in)
    assert nb.shape == (2, 17, 5)
    for g, m in enumerate(models):
        assert torch.equal(nb[g], m.neighbors(Xs[g]))


def test_batch_training_equals_separate_training():
    # Adam is elementwise, the loss a sum over GPs: a few steps with the same minibatch order
    # (same seed) leave the batch exactly where the separately trained models are.
    models, batched = _separate_and_batched("rbf", neighbor_method="brute")
    gen = torch.Generator().manual_seed(4)
    Xs = torch.rand(2, 24, 2, generator=gen, dtype=F64)
    ys = torch.sin(3 * Xs.sum(-1)) + 0.1 * torch.randn(2, 24, generator=gen, dtype=F64)
    kw = {"epochs": 2, "batch_size": 8, "lr": 0.02}
    start = {name: p.detach().clone() for name, p in batched.named_parameters()}
    losses = batched.fit((Xs, ys), seed=5, **kw).step_losses_
    refs = [m.fit((Xs[g], ys[g]), seed=5, **kw).step_losses_ for g, m in enumerate(models)]
    assert len(losses) == 6
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(refs).sum(0), rtol=1e-10, atol=1e-10
    )
    _assert_params_match(models, batched, rtol=1e-10, atol=1e-10)
    for name, p in batched.named_parameters():  # every parameter of every GP has moved
        moved = (p.detach() - start[name]).abs().reshape(2, -1).amax(-1)
        assert bool((moved > 1e-4).all()), name
    post = batched.posterior(Xs)
    for g, m in enumerate(models):
        ref = m.posterior(Xs[g])
        torch.testing.assert_close(post.mean[g], ref.mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(post.variance[g], ref.variance, rtol=1e-10, atol=1e-10)


def test_batch_shapes_and_initialisation():
    bs = torch.Size([2, 3])
    gen = torch.Generator().manual_seed(0)
    Z = torch.rand(10, 2, generator=gen, dtype=F64)  # shared start, copied per GP
    model = SWSGP(_batch_kernel("rbf", bs), Z, num_neighbors=4, rank=2, batch_shape=bs)
    assert model.inducing_points.shape == (2, 3, 10, 2)
    assert model.variational_mean.shape == (2, 3, 10)
    assert model.variational_factor.shape == (2, 3, 10, 2)
    assert model.likelihood.noise.shape == (2, 3, 1)
    # Same Z and kernel for all GPs: the default diagonal start is the same for each of them.
    s = model.variational_diag
    torch.testing.assert_close(s, s[:1, :1].expand_as(s), rtol=1e-12, atol=0)
    X = torch.rand(7, 2, generator=gen, dtype=F64)
    y = torch.randn(7, generator=gen, dtype=F64)
    assert model.elbo(X, y, 50).shape == bs
    assert model.elbo(X.expand(2, 3, 7, 2), y.expand(2, 3, 7), 50).shape == bs
    assert model.elbo(X.expand(3, 7, 2), y.unsqueeze(-1), 50).shape == bs  # broadcast dims
    post = model.posterior(X)
    assert post.mean.shape == (2, 3, 7, 1) and post.variance.shape == (2, 3, 7, 1)
    joint = model.posterior(X, joint=True)
    assert joint.covariance_matrix.shape == (2, 3, 7, 7)
    assert model.variational_covariance().shape == (2, 3, 10, 10)


def test_batch_bad_shapes():
    bs = torch.Size([2])
    Z = torch.rand(2, 10, 2, dtype=F64)
    with pytest.raises(ValueError, match="inducing_points"):
        SWSGP(_batch_kernel("rbf", bs), torch.rand(3, 10, 2, dtype=F64), 3, batch_shape=bs)
    with pytest.raises(ValueError, match="kernel has batch_shape"):
        SWSGP(_batch_kernel("rbf", torch.Size([3])), Z, 3, batch_shape=bs)
    with pytest.raises(ValueError, match="batch_shape"):
        SWSGP(_batch_kernel("rbf"), Z, 3, batch_shape=(0,))
    with pytest.raises(ValueError, match="inducing_points"):
        SWSGP(_batch_kernel("rbf"), Z, 3)  # batched Z for an unbatched model
    model = SWSGP(_batch_kernel("rbf", bs), Z, 3, batch_shape=bs)
    X, y = _data(n=6)
    with pytest.raises(ValueError, match="X must have shape"):
        model.posterior(X.expand(3, 6, 2))
    with pytest.raises(ValueError, match="X must have shape"):
        model.elbo(X.expand(2, 2, 6, 2), y, 10)
    with pytest.raises(ValueError, match="y has shape"):
        model.elbo(X, y.expand(3, 6), 10)
    with pytest.raises(ValueError, match="y has shape"):
        model.elbo(X, y[:5], 10)
    unbatched = SWSGP(_batch_kernel("rbf"), Z[0], 3)
    # leading dims of X are a batch of queries (b, q, d) for the model protocol
    queries = unbatched.posterior(X.expand(2, 6, 2))
    assert queries.mean.shape == (2, 6, 1)
    torch.testing.assert_close(queries.mean[1], unbatched.posterior(X).mean)
    with pytest.raises(ValueError, match="y has shape"):
        unbatched.elbo(X, y.expand(2, 6), 10)


@pytest.mark.parametrize("method", METHODS)
def test_nearest_inducing_batched_equals_per_gp(method):
    gen = torch.Generator().manual_seed(5)
    Z = torch.rand(2, 3, 40, 2, generator=gen, dtype=F64)
    X = torch.rand(2, 3, 11, 2, generator=gen, dtype=F64)
    idx = nearest_inducing(X, Z, 6, method=method, tile_size=4)
    assert idx.shape == (2, 3, 11, 6)
    ref = torch.cdist(X, Z).topk(6, dim=-1, largest=False).indices
    assert torch.equal(idx, ref)
    with pytest.raises(ValueError, match="same batch"):
        nearest_inducing(X, Z[:1], 6)


def test_rbf_block_covariance_batched_kernel():
    # The analytic RBF block path with one set of hyperparameters per GP: values and gradients
    # against gpytorch evaluated GP by GP.
    bs = torch.Size([3])
    kern = ScaleKernel(RBFKernel(ard_num_dims=2, batch_shape=bs), batch_shape=bs).double()
    kern.base_kernel.lengthscale = torch.tensor([[[0.3, 0.5]], [[0.7, 0.2]], [[1.0, 0.4]]])
    kern.outputscale = torch.tensor([0.5, 1.0, 2.0])
    gen = torch.Generator().manual_seed(2)
    Z_a = torch.rand(3, 4, 5, 2, generator=gen, dtype=F64).requires_grad_()
    weights = torch.randn(3, 4, 5, 5, generator=gen, dtype=F64)
    ours = block_covariance(kern, Z_a, 1e-3)
    ref = torch.stack(
        [
            ScaleKernel(RBFKernel(ard_num_dims=2))
            .double()
            .initialize(**{"base_kernel.lengthscale": kern.base_kernel.lengthscale[g]})
            .initialize(outputscale=kern.outputscale[g])(Z_a[g], Z_a[g])
            .to_dense()
            for g in range(3)
        ]
    ) + 1e-3 * torch.eye(5, dtype=F64)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-13)
    params = [Z_a, kern.base_kernel.raw_lengthscale, kern.raw_outputscale]
    g_ours = torch.autograd.grad((ours * weights).sum(), params)
    dense = kern(Z_a.movedim(1, 0), Z_a.movedim(1, 0)).to_dense().movedim(0, 1)
    g_ref = torch.autograd.grad((dense * weights).sum(), params)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ joint posterior


def _union_joint(model: SWSGP, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint of f(X) under q(u_U), U = union of the H-nearest sets, in plain dense torch."""
    Z, kern = model.inducing_points, model.kernel
    nearest = torch.cdist(X, Z).topk(model.num_neighbors, largest=False).indices
    U = torch.unique(nearest)
    Z_U = Z[U]
    K = kern(Z_U, Z_U).to_dense() + model._jitter_value() * torch.eye(len(U), dtype=Z.dtype)
    Kxu = kern(X, Z_U).to_dense()
    A = torch.linalg.solve(K, Kxu.mT).mT
    S = model.variational_covariance()[U][:, U]
    cov = kern(X, X).to_dense() - A @ Kxu.mT + A @ S @ A.mT
    return A @ model.variational_mean[U], cov


def test_joint_equals_dense_svgp_at_full_neighbourhood():
    # H = M: the joint is SVGP's, K_xx - K_xz K^-1 K_zx + A S A^T (Hensman et al. 2013).
    model = _model(M=12, r=3)
    X, _ = _data(n=9)
    Z, kern = model.inducing_points, model.kernel
    with torch.no_grad():
        K = kern(Z, Z).to_dense() + model._jitter_value() * torch.eye(12, dtype=F64)
        Kxz = kern(X, Z).to_dense()
        A = torch.linalg.solve(K, Kxz.mT).mT
        ref_cov = kern(X, X).to_dense() - A @ Kxz.mT + A @ model.variational_covariance() @ A.mT
        ref_mean = A @ model.variational_mean
        post = model.posterior(X, joint=True)
    assert post.is_joint and post.covariance_matrix.shape == (9, 9)
    torch.testing.assert_close(post.mean.squeeze(-1), ref_mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(post.covariance_matrix, ref_cov, rtol=1e-9, atol=1e-10)
    marginal = model.posterior(X)  # with H = M both use all of Z
    torch.testing.assert_close(post.variance, marginal.variance, rtol=1e-9, atol=1e-10)
    noisy = model.posterior(X, joint=True, observation_noise=True)
    noise = model.likelihood.noise.squeeze() * torch.eye(9, dtype=F64)
    torch.testing.assert_close(
        noisy.covariance_matrix, post.covariance_matrix + noise, rtol=1e-12, atol=1e-14
    )


def test_joint_has_the_marginals_and_the_union_correlations():
    # H < M: mean and variances are the points' own (H-neighbour) marginals; the correlations
    # are those of the joint over the union U of the neighbour sets, which conditions each
    # point on all of U and so has other means and variances of its own.
    model = _model(M=40, H=5, r=2)
    X, _ = _data(n=6)
    with torch.no_grad():
        post = model.posterior(X, joint=True)
        marginal = model.posterior(X)
        union_mean, union_cov = _union_joint(model, X)
    torch.testing.assert_close(post.mean, marginal.mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(post.variance, marginal.variance, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(union_mean, marginal.mean.squeeze(-1), rtol=1e-3)  # H < M
    union_sd = union_cov.diagonal().sqrt()
    sd = marginal.variance.squeeze(-1).sqrt()
    ref = union_cov / torch.outer(union_sd, union_sd) * torch.outer(sd, sd)
    torch.testing.assert_close(post.covariance_matrix, ref, rtol=1e-9, atol=1e-10)
    eig = torch.linalg.eigvalsh(post.covariance_matrix)
    assert bool((eig > -1e-10 * eig.max()).all())  # PSD by construction
    # One point: the union is its own neighbour set, so the joint is the marginal.
    one = model.posterior(X[:1], joint=True)
    torch.testing.assert_close(one.variance, model.posterior(X[:1]).variance, rtol=1e-9, atol=0)
    torch.testing.assert_close(one.mean, model.posterior(X[:1]).mean, rtol=1e-9, atol=1e-12)
    noisy = model.posterior(X, joint=True, observation_noise=True)
    noise = model.likelihood.noise.squeeze() * torch.eye(6, dtype=F64)
    torch.testing.assert_close(noisy.covariance_matrix, post.covariance_matrix + noise)


def test_joint_draws_have_the_marginal_spread():
    # M = 32, H = 8: joint draws (as sample_y takes them) have the marginals' mean and variance.
    model = _model(M=32, H=8, r=2)
    X, _ = _data(n=12, seed=4)
    with torch.no_grad():
        joint = model.posterior(X, joint=True, observation_noise=True)
        marginal = model.posterior(X, observation_noise=True)
    S = 20000
    base = torch.randn(S, *joint.base_sample_shape, generator=torch.Generator().manual_seed(0),
                       dtype=F64)  # fmt: skip
    draws = joint.rsample_from_base_samples(torch.Size([S]), base)[..., 0]  # (S, n)
    mean, var = marginal.mean.squeeze(-1), marginal.variance.squeeze(-1)
    assert bool(((draws.mean(0) - mean).abs() < 5 * (var / S).sqrt()).all())
    assert bool(((draws.var(0) - var).abs() < 5 * var * math.sqrt(2 / S)).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_matches_cpu():
    _, batched = _separate_and_batched("rbf", neighbor_method="brute")
    X = torch.rand(2, 19, 2, dtype=F64)
    y = torch.randn(2, 19, dtype=F64)
    cpu = batched.posterior(X, joint=True)
    elbo = batched.elbo(X, y, 100)
    gpu_model = batched.to("cuda")
    gpu = gpu_model.posterior(X.cuda(), joint=True)
    torch.testing.assert_close(gpu.mean.cpu(), cpu.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        gpu.covariance_matrix.cpu(), cpu.covariance_matrix, rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(gpu_model.elbo(X.cuda(), y.cuda(), 100).cpu(), elbo.detach())

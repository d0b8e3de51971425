"""Joint posterior draws by forward-filtering backward-sampling (``StateSpacePosterior``).

Reference: the dense GP posterior ``K** - K*x (Kxx + noise I)^{-1} Kx*`` on the observed
points. Exact quantities (the dense covariance the backward gains imply, zero-noise draws)
are compared in float64 to 1e-8 (observed ~1e-15). Monte Carlo checks use S draws and
Gaussian standard errors: a sample mean has s.e. ``sqrt(c_ii / S)``, a sample covariance
``sqrt((c_ii c_jj + c_ij^2) / S)``; every entry must lie within 5 s.e. (a false alarm
probability of 6e-7 per entry; the seeds are fixed anyway).
"""

from __future__ import annotations

import gpytorch
import pytest
import torch
from gpytorch.kernels import CosineKernel, MaternKernel, ScaleKernel

from gp.statespace import StateSpaceGP, StateSpacePosterior, backward_sample, psd_factor

DT = torch.float64
NOISE = 0.05
S = 20000
METHODS = ["sequential", "parallel"]


def _matern_sum() -> gpytorch.kernels.Kernel:
    k1 = ScaleKernel(MaternKernel(nu=1.5))
    k1.base_kernel.lengthscale = 1.2
    k1.outputscale = 0.9
    k2 = ScaleKernel(MaternKernel(nu=0.5))
    k2.base_kernel.lengthscale = 3.0
    k2.outputscale = 0.2
    return (k1 + k2).to(DT)


def _quasi_periodic() -> gpytorch.kernels.Kernel:
    """Matérn-3/2 x cosine: the cosine part has Q = 0, so backward covariances are singular."""
    k = ScaleKernel(MaternKernel(nu=1.5)) * CosineKernel()
    k.kernels[0].base_kernel.lengthscale = 2.0
    k.kernels[1].period_length = 1.7
    return k.to(DT)


def _data(n: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Irregular unsorted times in [0, 5] with a repeat and two missing values."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=DT) * 5
    t[3] = t[8]
    y = torch.sin(1.4 * t) + 0.2 * torch.randn(n, generator=g, dtype=DT)
    y[[5, 11]] = float("nan")
    return t, y


# between data, at a training time, repeated, and outside the data on both sides
T_NEW = torch.tensor([1.0, 1.15, 2.5, 2.5, -0.7, 6.0], dtype=DT)


def _dense(model: StateSpaceGP, t: torch.Tensor, y: torch.Tensor, t_new: torch.Tensor):
    keep = ~torch.isnan(y)
    t, y = t[keep], y[keep]
    with torch.no_grad():
        k = model.kernel
        Kxx = k(t[:, None]).to_dense() + model.noise * torch.eye(len(t), dtype=DT)
        Ksx = k(t_new[:, None], t[:, None]).to_dense()
        Kss = k(t_new[:, None]).to_dense()
        mean = Ksx @ torch.linalg.solve(Kxx, y)
        cov = Kss - Ksx @ torch.linalg.solve(Kxx, Ksx.mT)
    return mean, cov


def _assert_moments(draws: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> None:
    """Sample mean and covariance of ``draws`` (S, n) within 5 standard errors."""
    n_draws = draws.shape[0]
    var = cov.diagonal()
    z_mean = (draws.mean(0) - mean) / (var / n_draws).sqrt()
    emp = torch.cov(draws.T)
    se = ((var[:, None] * var[None, :] + cov**2) / n_draws).sqrt()
    z_cov = (emp - cov) / se
    assert z_mean.abs().max() < 5, f"mean off by {z_mean.abs().max():.2f} s.e."
    assert z_cov.abs().max() < 5, f"covariance off by {z_cov.abs().max():.2f} s.e."


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kernel", [_matern_sum, _quasi_periodic])
def test_implied_covariance_equals_the_dense_posterior(kernel, method: str) -> None:
    model = StateSpaceGP(kernel(), noise=NOISE, method=method).to(DT)
    t, y = _data()
    post = model.set_data(t, y).posterior(T_NEW)
    mean, cov = _dense(model, t, y, T_NEW)
    torch.testing.assert_close(post.mean[:, 0], mean, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(post.covariance_matrix, cov, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(post.variance[:, 0], cov.diagonal(), rtol=1e-8, atol=1e-8)
    noisy = model.posterior(T_NEW, observation_noise=True)
    noise = model.noise.detach()  # NOISE rounded through the float32 raw parameter
    noisy_cov = cov + noise * torch.eye(len(T_NEW), dtype=DT)
    torch.testing.assert_close(noisy.covariance_matrix, noisy_cov, rtol=1e-8, atol=1e-8)
    y_new = torch.linspace(-1, 1, len(T_NEW), dtype=DT)[:, None]
    reference = torch.distributions.MultivariateNormal(mean, noisy_cov).log_prob(y_new[:, 0])
    torch.testing.assert_close(noisy.joint_log_prob(y_new), reference, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kernel", [_matern_sum, _quasi_periodic])
def test_draws_have_the_dense_posterior_moments(kernel, method: str) -> None:
    model = StateSpaceGP(kernel(), noise=NOISE, method=method).to(DT)
    t, y = _data()
    post = model.set_data(t, y).posterior(T_NEW)
    mean, cov = _dense(model, t, y, T_NEW)
    draws = post.rsample(torch.Size([S]), generator=torch.Generator().manual_seed(1))
    assert draws.shape == (S, len(T_NEW), 1)
    _assert_moments(draws[..., 0], mean, cov)
    # the joint part is exercised: strongly correlated neighbours
    corr = cov[0, 1] / (cov[0, 0] * cov[1, 1]).sqrt()
    assert corr > 0.5
    # repeated prediction times get the same latent value in every draw (the scan's
    # rounding differs between the two positions; the loop's does not)
    torch.testing.assert_close(draws[:, 2], draws[:, 3], rtol=0, atol=1e-12)
    # with observation noise: Cov + noise I
    noisy = model.posterior(T_NEW, observation_noise=True)
    noisy_draws = noisy.rsample(torch.Size([S]), generator=torch.Generator().manual_seed(2))
    noisy_cov = cov + model.noise.detach() * torch.eye(len(T_NEW), dtype=DT)
    _assert_moments(noisy_draws[..., 0], mean, noisy_cov)


@pytest.mark.parametrize("method", METHODS)
def test_batched_draws_match_each_series(method: str) -> None:
    model = StateSpaceGP(_matern_sum(), noise=NOISE, method=method).to(DT)
    (t0, y0), (t1, y1) = _data(seed=0), _data(seed=1)
    t, y = torch.stack([t0, t1]), torch.stack([y0, y1])  # per-series times
    t_new = torch.stack([T_NEW, T_NEW.flip(0) + 0.3]).unsqueeze(-1)  # (2, n_new, 1)
    post = model.set_data(t, y).posterior(t_new)
    assert post.base_sample_shape == (2, 20 + len(T_NEW), 3 + 1)
    draws = post.rsample(torch.Size([S]), generator=torch.Generator().manual_seed(3))
    assert draws.shape == (S, 2, len(T_NEW), 1)
    for b, (tb, yb) in enumerate([(t0, y0), (t1, y1)]):
        mean, cov = _dense(model, tb, yb, t_new[b, :, 0])
        _assert_moments(draws[:, b, :, 0], mean, cov)
        torch.testing.assert_close(post.covariance_matrix[b], cov, rtol=1e-8, atol=1e-8)
        # per-time marginals of the draws are the RTS smoother's
        var = post.variance[b, :, 0]
        z = (draws[:, b, :, 0].var(0) - var) / (var * (2.0 / S) ** 0.5)
        assert z.abs().max() < 5


def test_zero_base_samples_give_the_smoother_mean_and_methods_agree() -> None:
    t, y = _data()
    posts = [
        StateSpaceGP(_quasi_periodic(), noise=NOISE, method=m)
        .to(DT)
        .set_data(t, y)
        .posterior(T_NEW)
        for m in METHODS
    ]
    zero = torch.zeros(1, *posts[0].base_sample_shape, dtype=DT)
    torch.testing.assert_close(
        posts[0].rsample_from_base_samples(torch.Size([1]), zero)[0],
        posts[0].mean,
        rtol=1e-10,
        atol=1e-10,
    )
    base = torch.randn(7, *posts[0].base_sample_shape, dtype=DT)
    seq, par = (p.rsample_from_base_samples(torch.Size([7]), base) for p in posts)
    torch.testing.assert_close(par, seq, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="base_samples has shape"):
        posts[0].rsample_from_base_samples(torch.Size([7]), base[..., :3])


def test_generator_reproducibility_and_affine_map() -> None:
    t, y = _data()
    post = StateSpaceGP(_matern_sum(), noise=NOISE).to(DT).set_data(t, y).posterior(T_NEW)
    a = post.rsample(torch.Size([4]), generator=torch.Generator().manual_seed(9))
    b = post.rsample(torch.Size([4]), generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    mapped = post.affine(2.0, 3.0)
    c = mapped.rsample(torch.Size([4]), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(c, 3.0 + 2.0 * a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mapped.covariance_matrix, 4.0 * post.covariance_matrix)
    torch.testing.assert_close(mapped.mean, 3.0 + 2.0 * post.mean)


def test_draws_are_differentiable() -> None:
    model = StateSpaceGP(_matern_sum(), noise=NOISE).to(DT)
    t, y = _data()
    post = model.set_data(t, y).posterior(T_NEW)
    draws = post.rsample(torch.Size([8]), generator=torch.Generator().manual_seed(0))
    draws.pow(2).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_psd_factor_handles_singular_matrices() -> None:
    v = torch.tensor([[1.0], [2.0], [0.5]], dtype=DT)
    L = torch.stack([v @ v.mT, torch.zeros(3, 3, dtype=DT)])  # rank one, and exactly zero
    U = psd_factor(L, scale=1.0)
    torch.testing.assert_close(U @ U.mT, L, rtol=0, atol=1e-12)
    assert torch.equal(U[1], torch.zeros(3, 3, dtype=DT))


@pytest.mark.parametrize("n", [1, 2, 5, 13])
def test_backward_sample_scan_matches_loop(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    E = 0.5 * torch.randn(2, n, 3, 3, generator=g, dtype=DT)
    c = torch.randn(4, 2, n, 3, generator=g, dtype=DT)
    loop = backward_sample(E, c, "sequential")
    torch.testing.assert_close(backward_sample(E, c, "parallel"), loop, rtol=1e-12, atol=1e-12)
    x = c[:, :, -1]
    for k in range(n - 2, -1, -1):  # definition: x_k = E_k x_{k+1} + c_k
        x = (E[:, k] @ x.unsqueeze(-1)).squeeze(-1) + c[:, :, k]
        torch.testing.assert_close(loop[:, :, k], x, rtol=1e-12, atol=1e-12)


def test_posterior_type_and_repr() -> None:
    t, y = _data()
    post = StateSpaceGP(_matern_sum(), noise=NOISE).to(DT).set_data(t, y).posterior(T_NEW)
    assert isinstance(post, StateSpacePosterior) and post.is_joint
    assert post.grid_size == len(t) + len(T_NEW)
    assert "ffbs" in repr(post)
    with pytest.raises(ValueError, match="noise_variance"):
        post.add_observation_noise(-1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batched_draws_match_cpu() -> None:
    (t0, y0), (t1, y1) = _data(seed=0), _data(seed=1)
    t, y = torch.stack([t0, t1]), torch.stack([y0, y1])
    model = StateSpaceGP(_matern_sum(), noise=NOISE).to(DT)  # "auto": parallel on CUDA
    cpu = model.set_data(t, y).posterior(T_NEW, method="parallel")
    base = torch.randn(5, *cpu.base_sample_shape, dtype=DT)
    cuda = torch.device("cuda")
    gpu = model.to(cuda).set_data(t.to(cuda), y.to(cuda)).posterior(T_NEW.to(cuda))
    draws = gpu.rsample_from_base_samples(torch.Size([5]), base.to(cuda))
    expected = cpu.rsample_from_base_samples(torch.Size([5]), base)
    torch.testing.assert_close(draws.cpu(), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gpu.covariance_matrix.cpu(), cpu.covariance_matrix)


@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_draws_are_right_for_short_lengthscales(method: str) -> None:
    # diag(Pinf) of a Matérn-5/2 spans lambda^4 ~ 1e9 here: a jitter scaled by its largest
    # entry would swamp the tiny posterior variance of f (it did: 5x too large at ell = 1e-2).
    kernel = ScaleKernel(MaternKernel(nu=2.5)).to(DT)
    kernel.base_kernel.lengthscale = 1e-2
    g = torch.Generator().manual_seed(4)
    t = torch.sort(torch.rand(60, generator=g, dtype=DT)).values
    y = torch.sin(20 * t) + 0.01 * torch.randn(60, generator=g, dtype=DT)
    model = StateSpaceGP(kernel, noise=1e-4, method=method).to(DT).set_data(t, y)
    t_new = torch.linspace(0.1, 0.9, 7, dtype=DT)
    post = model.posterior(t_new)
    S = 4000
    draws = post.rsample(torch.Size([S]), generator=torch.Generator().manual_seed(0))[..., 0]
    exact = post.variance[:, 0]
    # sample variance / exact: mean 1, sd sqrt(2 / S) per point; 5 sd
    assert bool(((draws.var(0) / exact - 1).abs() < 5 * (2 / S) ** 0.5).all())

"""Kalman filter / RTS smoother against the dense GP (LML, posterior moments, gradients).

Everything exact is compared in float64: the Kalman recursions and the Cholesky-based dense
GP agree to rounding (observed ~1e-13 relative), so the tests claim 1e-8 relative (1e-8
absolute floor for posterior moments of size O(1)) and 1e-6 relative on gradients. The
float32 check bounds the per-point LML error by 1e-4 (float32 resolution 6e-8 per operation,
amplified by the conditioning of the O(d^3) updates; observed 1.3e-7).
"""

from __future__ import annotations

import gpytorch
import pytest
import torch
from gpytorch.kernels import MaternKernel, ScaleKernel
from torch.distributions import MultivariateNormal

from gp.statespace import StateSpaceGP, discretise, kalman_filter, kernel_to_sde, rts_smoother

DT = torch.float64
NOISE = 0.05


def _matern(nu: float, ell: float, scale: float) -> gpytorch.kernels.Kernel:
    k = ScaleKernel(MaternKernel(nu=nu))
    k.base_kernel.lengthscale = ell
    k.outputscale = scale
    return k


KERNELS = {
    "matern12": lambda: _matern(0.5, 0.7, 1.3),
    "matern32": lambda: _matern(1.5, 1.1, 0.8),
    "matern52": lambda: _matern(2.5, 1.5, 2.0),
    "sum_12_52": lambda: _matern(0.5, 0.9, 0.6) + _matern(2.5, 2.0, 1.1),
    "constant_plus_32": lambda: _constant(3.0) + _matern(1.5, 0.6, 1.3),
}


def _constant(c: float) -> gpytorch.kernels.Kernel:
    k = gpytorch.kernels.ConstantKernel()
    k.constant = torch.tensor(c)
    return k


def _model(name: str, noise: float = NOISE) -> StateSpaceGP:
    return StateSpaceGP(KERNELS[name](), noise=noise).to(DT)


def _data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Irregular, unsorted times with duplicated timestamps (for n >= 5) and smooth targets."""
    g = torch.Generator().manual_seed(seed)
    if n < 5:
        t = torch.rand(n, generator=g, dtype=DT) * 8
    else:
        base = torch.rand(n - 4, generator=g, dtype=DT) * 8
        t = torch.cat([base, base[[0, 3, 3, 7]]])  # one pair and one triple of repeats
        t = t[torch.randperm(n, generator=g)]
    y = torch.sin(1.3 * t) + 0.3 * torch.randn(n, generator=g, dtype=DT)
    return t, y


def _dense_lml(model: StateSpaceGP, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    keep = ~torch.isnan(y)
    t, y = t[keep], y[keep]
    K = model.kernel(t[:, None]).to_dense() + model.noise * torch.eye(len(t), dtype=DT)
    return MultivariateNormal(torch.zeros_like(y), covariance_matrix=K).log_prob(y)


def _dense_posterior(
    model: StateSpaceGP, t: torch.Tensor, y: torch.Tensor, t_new: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    keep = ~torch.isnan(y)
    t, y = t[keep], y[keep]
    k = model.kernel
    K = k(t[:, None]).to_dense() + model.noise * torch.eye(len(t), dtype=DT)
    Ks = k(t_new[:, None], t[:, None]).to_dense()
    kss = k(t_new[:, None], diag=True)
    chol = torch.linalg.cholesky(K)
    mean = Ks @ torch.cholesky_solve(y[:, None], chol)
    var = kss - (Ks * torch.cholesky_solve(Ks.mT, chol).mT).sum(-1)
    return mean, var[:, None]


def _assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    err = (actual - expected).abs().max() / expected.abs().max().clamp_min(1.0)
    assert err < rtol, f"relative error {err:.3e} >= {rtol:.0e}"


@pytest.mark.parametrize("n", [1, 2, 37])
@pytest.mark.parametrize("name", list(KERNELS))
def test_lml_equals_dense_gp(name: str, n: int) -> None:
    model = _model(name)
    t, y = _data(n)
    lml = model.log_marginal_likelihood(t, y)
    _assert_rel(lml, _dense_lml(model, t, y), 1e-8)
    assert lml.shape == ()


@pytest.mark.parametrize("name", list(KERNELS))
def test_lml_with_missing_values_equals_dense_on_observed(name: str) -> None:
    model = _model(name)
    t, y = _data(37, seed=2)
    y[[0, 5, 6, 20, 36]] = float("nan")
    _assert_rel(model.log_marginal_likelihood(t, y), _dense_lml(model, t, y), 1e-8)


def test_lml_is_invariant_to_order() -> None:
    model = _model("sum_12_52")
    t, y = _data(37)
    perm = torch.randperm(37)
    a, b = model.log_marginal_likelihood(t, y), model.log_marginal_likelihood(t[perm], y[perm])
    _assert_rel(a, b, 1e-12)


def _test_times(t: torch.Tensor) -> torch.Tensor:
    """Training times, points between them, and forecasts before and after the data."""
    inside = torch.linspace(float(t.min()), float(t.max()), 23, dtype=DT) + 0.0137
    return torch.cat([t[[4, 0, 11]], inside, torch.tensor([-3.0, -0.5, 8.6, 10.0, 15.0], dtype=DT)])


@pytest.mark.parametrize("missing", [False, True])
@pytest.mark.parametrize("name", list(KERNELS))
def test_posterior_equals_dense_gp(name: str, missing: bool) -> None:
    model = _model(name)
    t, y = _data(37, seed=3)
    if missing:
        y[[2, 9, 10, 30]] = float("nan")
    t_new = _test_times(t)
    post = model.set_data(t, y).posterior(t_new)
    mean, var = _dense_posterior(model, t, y, t_new)
    assert post.mean.shape == post.variance.shape == (len(t_new), 1)
    assert post.mean.dtype == DT
    _assert_rel(post.mean, mean, 1e-8)
    _assert_rel(post.variance, var, 1e-8)
    noisy = model.posterior(t_new, observation_noise=True)
    _assert_rel(noisy.variance, var + NOISE, 1e-8)
    torch.testing.assert_close(noisy.mean, post.mean, rtol=0, atol=0)


def test_posterior_with_single_training_point() -> None:
    model = _model("matern32")
    t, y = _data(1)
    t_new = torch.tensor([t.item(), t.item() + 0.5, -2.0], dtype=DT)
    post = model.set_data(t, y).posterior(t_new)
    mean, var = _dense_posterior(model, t, y, t_new)
    _assert_rel(post.mean, mean, 1e-8)
    _assert_rel(post.variance, var, 1e-8)


@pytest.mark.parametrize("name", ["matern32", "sum_12_52"])
def test_lml_gradients_equal_dense_autograd(name: str) -> None:
    model = _model(name)
    t, y = _data(37, seed=4)
    y[[3, 17]] = float("nan")
    params = [p for _, p in sorted(model.named_parameters())]
    assert len(params) == (3 if name == "matern32" else 5)  # includes raw_noise
    grads = torch.autograd.grad(model.log_marginal_likelihood(t, y), params)
    ref = torch.autograd.grad(_dense_lml(model, t, y), params)
    for g, r in zip(grads, ref, strict=True):
        _assert_rel(g, r, 1e-6)
        assert r.abs().max() > 1e-3  # the comparison is not between two zeros


def test_float32_matches_float64_on_long_series() -> None:
    n = 2000
    g = torch.Generator().manual_seed(5)
    t = torch.rand(n, generator=g, dtype=DT) * 400  # mean step 0.2, lengthscale 1.5
    y = torch.sin(0.7 * t) + 0.2 * torch.randn(n, generator=g, dtype=DT)
    model = StateSpaceGP(_matern(1.5, 1.5, 1.0) + _matern(0.5, 5.0, 0.3), noise=0.04)
    lml32 = model.log_marginal_likelihood(t.float(), y.float())
    lml64 = model.to(DT).log_marginal_likelihood(t, y)
    assert lml32.dtype == torch.float32 and torch.isfinite(lml32)
    assert abs(lml32.item() - lml64.item()) / n < 1e-4


def test_float32_posterior_is_finite() -> None:
    t, y = _data(37)
    model = StateSpaceGP(KERNELS["matern52"](), noise=NOISE)
    post = model.set_data(t.float(), y.float()).posterior(_test_times(t).float())
    assert post.dtype == torch.float32
    assert torch.isfinite(post.mean).all() and (post.variance >= 0).all()
    mean, var = _dense_posterior(model.to(DT), t, y, _test_times(t))
    assert (post.mean.double() - mean).abs().max() < 1e-3
    assert (post.variance.double() - var).abs().max() < 1e-3


def test_filter_and_smoother_low_level() -> None:
    """Functional API: filtered last state equals smoothed last state; shapes."""
    sde = kernel_to_sde(KERNELS["matern52"]().to(DT))
    t = torch.sort(_data(37)[0]).values
    y = torch.sin(t)
    A, Q = discretise(sde, t.diff())
    res = kalman_filter(A, Q, sde.H, sde.Pinf, y, torch.tensor(NOISE, dtype=DT))
    assert res.mean.shape == res.pred_mean.shape == (37, 3)
    assert res.cov.shape == res.pred_cov.shape == (37, 3, 3)
    m_s, P_s = rts_smoother(A, res)
    torch.testing.assert_close(m_s[-1], res.mean[-1])
    torch.testing.assert_close(P_s[-1], res.cov[-1])
    # per-point noise of the right shape gives the same result
    res_vec = kalman_filter(A, Q, sde.H, sde.Pinf, y, torch.full((37,), NOISE, dtype=DT))
    torch.testing.assert_close(res_vec.log_likelihood, res.log_likelihood)
    with pytest.raises(ValueError, match="noise must have shape"):
        kalman_filter(A, Q, sde.H, sde.Pinf, y, torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="A must have shape"):
        kalman_filter(A[:-1], Q, sde.H, sde.Pinf, y, torch.tensor(NOISE, dtype=DT))


def test_all_missing_gives_zero_lml_and_prior() -> None:
    model = _model("matern32")
    t = torch.tensor([0.0, 1.0, 2.0], dtype=DT)
    y = torch.full((3,), float("nan"), dtype=DT)
    lml = model.log_marginal_likelihood(t, y)
    assert lml.item() == 0.0 and lml.requires_grad
    post = model.set_data(t, y).posterior(torch.tensor([0.5, 5.0], dtype=DT))
    assert torch.equal(post.mean, torch.zeros(2, 1, dtype=DT))
    torch.testing.assert_close(post.variance, torch.full((2, 1), 0.8, dtype=DT))

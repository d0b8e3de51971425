"""Cosine, periodic (truncated series) and product kernels in state-space form.

Reference for the likelihood tolerance against gpytorch's exact ``PeriodicKernel``: with
``B = K_J + s2 I`` (truncated) and ``E = K - K_J`` (PSD, a product of PSD kernels, with
``||E||_2 <= tr E = n c tail``, ``c`` the product of the other factors' ``k(0)`` and scales),

    0 <= logdet(B + E) - logdet(B) <= tr(E) / s2,
    |y^T B^-1 y - y^T (B + E)^-1 y| <= ||y||^2 ||E||_2 / s2^2,

so ``|LML - LML_J| <= n c tail (1 / s2 + ||y||^2 / s2^2) / 2``.
"""

from __future__ import annotations

import itertools
import math

import gpytorch
import numpy as np
import pytest
import scipy.special
import torch
from gpytorch.kernels import (
    AdditiveKernel,
    CosineKernel,
    Kernel,
    MaternKernel,
    PeriodicKernel,
    ProductKernel,
    ScaleKernel,
)

from gp.statespace import StateSpaceGP, discretise, kernel_to_sde
from gp.statespace.periodic import (
    MAX_PERIODIC_ORDER,
    cosine_sde,
    periodic_sde,
    periodic_series,
    product_sde,
)

DT = torch.float64
TOL = 1e-6  # the default periodic_tol


def _periodic(period: float = 1.3, lengthscale: float = 0.7) -> PeriodicKernel:
    k = PeriodicKernel().to(DT)  # float64 values (a float goes via float32)
    k.period_length = torch.tensor(period, dtype=DT)
    k.lengthscale = torch.tensor(lengthscale, dtype=DT)
    return k


def _cosine(period: float = 0.8) -> CosineKernel:
    k = CosineKernel().to(DT)
    k.period_length = torch.tensor(period, dtype=DT)
    return k


def _matern(nu: float, lengthscale: float) -> MaternKernel:
    k = MaternKernel(nu=nu).to(DT)
    k.lengthscale = torch.tensor(lengthscale, dtype=DT)
    return k


def _scaled(base: Kernel, scale: float) -> ScaleKernel:
    k = ScaleKernel(base).to(DT)
    k.outputscale = torch.tensor(scale, dtype=DT)
    return k


def _kernels() -> dict[str, tuple[Kernel, bool]]:
    """name -> (kernel, exact: no PeriodicKernel inside)."""
    return {
        "cosine": (_scaled(_cosine(), 1.5), True),
        "m12_x_cos": (_matern(0.5, 2.0) * _cosine(0.9), True),
        "m52_x_m32": (_matern(2.5, 1.2) * _matern(1.5, 0.6), True),
        "periodic": (_scaled(_periodic(), 0.9), False),
        "m32_x_per": (_matern(1.5, 3.0) * _periodic(1.1, 0.8), False),
        "m32_x_per_plus_m12": (
            _scaled(_matern(1.5, 3.0) * _periodic(1.1, 0.8), 1.3) + _matern(0.5, 0.4),
            False,
        ),
        "m12_x_cos_plus_per": (_matern(0.5, 2.0) * _cosine(0.9) + _periodic(2.0, 2.5), False),
    }


def _dense_kernel(kernel: Kernel, tau: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Dense ``K[i, j] = k(tau[i, j])`` with every PeriodicKernel replaced by its truncated
    series at the automatic order for TOL (coefficients from ``periodic_series``, checked
    against scipy separately), and the sup-norm bound ``c * tail`` of the replacement."""
    if isinstance(kernel, ScaleKernel):
        K, err = _dense_kernel(kernel.base_kernel, tau)
        scale = kernel.outputscale
        return scale * K, float(scale.detach()) * err
    if isinstance(kernel, (AdditiveKernel, ProductKernel)):
        parts = [_dense_kernel(k, tau) for k in kernel.kernels]
        if isinstance(kernel, AdditiveKernel):
            return sum(K for K, _ in parts), sum(e for _, e in parts)
        zero = tau.new_zeros(1)  # sup |k| = k(0) for these stationary PSD kernels
        sups = [float(_dense_kernel(k, zero)[0].detach()) for k in kernel.kernels]
        (K, err), sup = parts[0], sups[0]
        for (K2, err2), sup2 in zip(parts[1:], sups[1:], strict=True):
            # |k1 k2 - k1' k2'| <= sup|k1'| e2 + e1 sup|k2| with k' the truncated kernels
            err, sup = sup * err2 + err * (sup2 + err2), sup * sup2
            K = K * K2
        return K, err
    if isinstance(kernel, PeriodicKernel):
        q2, tail = periodic_series(kernel.lengthscale.reshape(()), tol=TOL)
        w0 = 2 * math.pi / kernel.period_length.reshape(())
        j = torch.arange(q2.shape[0], dtype=DT)
        return (q2 * torch.cos(j * w0 * tau[..., None])).sum(-1), float(tail)
    x = torch.zeros(1, 1, dtype=DT)
    return kernel(x, tau.reshape(-1, 1)).to_dense().reshape(tau.shape), 0.0


def _exact_dense(kernel: Kernel, t: torch.Tensor) -> torch.Tensor:
    return kernel(t[:, None], t[:, None]).to_dense()


def _dense_lml(K: torch.Tensor, y: torch.Tensor, noise: float) -> torch.Tensor:
    cov = K + noise * torch.eye(K.shape[0], dtype=DT)
    return gpytorch.distributions.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y)


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = torch.cumsum(torch.rand(n, generator=g, dtype=DT) * 0.5 + 0.01, 0)
    t[7] = t[6]  # a repeated timestamp
    y = torch.sin(2.0 * t) + 0.5 * torch.cos(5.3 * t) + 0.2 * torch.randn(n, generator=g, dtype=DT)
    return t, y


# -- building blocks ------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.02, 0.1, 0.7, 1.0, 5.0, 300.0])
def test_series_coefficients_match_scipy(lam: float) -> None:
    q2, tail = periodic_series(torch.tensor(lam, dtype=DT))
    ref = scipy.special.ive(np.arange(q2.shape[0]), 1.0 / lam)
    ref[1:] *= 2.0
    np.testing.assert_allclose(q2.detach().numpy(), ref, rtol=1e-12, atol=1e-300)
    assert 0 <= float(tail) <= TOL
    assert math.isclose(float(q2.sum() + tail), 1.0, abs_tol=1e-13)  # sum_j q_j^2 = k(0) = 1
    if q2.shape[0] > 1:  # the automatic order is the smallest one meeting the tolerance
        q2_less, tail_less = periodic_series(torch.tensor(lam, dtype=DT), order=q2.shape[0] - 2)
        assert float(tail_less) > TOL


def test_series_order_and_tolerance() -> None:
    lam = torch.tensor(0.5, dtype=DT)
    tails = [float(periodic_series(lam, order=J)[1]) for J in range(20)]
    assert all(a > b for a, b in itertools.pairwise(tails))
    for tol in (1e-3, 1e-6, 1e-10):
        q2, tail = periodic_series(lam, tol=tol)
        assert float(tail) <= tol
        assert math.isclose(float(tail), tails[q2.shape[0] - 1], rel_tol=1e-9)
    assert periodic_series(lam, order=0)[0].shape == (1,)


def test_series_derivative_matches_bessel_identity() -> None:
    """d/dz [e^-z I_j(z)] = (ive(j-1) + ive(j+1)) / 2 - ive(j) and dz/dlam = -1/lam^2."""
    lam = torch.tensor(0.3, dtype=DT, requires_grad=True)
    q2, _ = periodic_series(lam, order=8)
    z, j = 1.0 / 0.3, np.arange(9)
    dive = 0.5 * (scipy.special.ive(j - 1, z) + scipy.special.ive(j + 1, z))
    dive -= scipy.special.ive(j, z)
    dive[1:] *= 2.0
    for i in range(9):
        (g,) = torch.autograd.grad(q2[i], lam, retain_graph=True)
        assert math.isclose(float(g), dive[i] * (-1.0 / 0.3**2), rel_tol=1e-9, abs_tol=1e-15)


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: periodic_series(torch.tensor(1.0, dtype=DT), order=-1), "order"),
        (lambda: periodic_series(torch.tensor(1.0, dtype=DT), order=1.5), "order"),
        (lambda: periodic_series(torch.tensor(1.0, dtype=DT), tol=0.0), "tol"),
        (lambda: periodic_series(torch.tensor(-1.0, dtype=DT)), "lengthscale"),
        (lambda: periodic_series(torch.tensor(1e-5, dtype=DT)), str(MAX_PERIODIC_ORDER)),
        (lambda: kernel_to_sde(PeriodicKernel(ard_num_dims=2)), "PeriodicKernel"),
        (lambda: product_sde([]), "sdes"),
    ],
)
def test_bad_arguments_raise(call: object, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        call()


def test_cosine_sde_is_an_undamped_rotation() -> None:
    kernel = _cosine(0.8)
    sde = kernel_to_sde(kernel)
    tau = torch.linspace(-3.0, 7.0, 81, dtype=DT)
    ref = _dense_kernel(kernel, tau)[0]  # gpytorch: cos(pi tau / p)
    torch.testing.assert_close(sde.covariance(tau), ref, atol=1e-13, rtol=0)
    torch.testing.assert_close(ref, torch.cos(math.pi * tau / 0.8), atol=1e-13, rtol=0)
    assert float(sde.lyapunov_residual().abs().max()) == 0.0
    _, Q = discretise(sde, torch.tensor([0.1, 1.0, 30.0], dtype=DT))
    assert float(Q.abs().max()) < 1e-13
    torch.testing.assert_close(
        cosine_sde(torch.tensor(2.0, dtype=DT), torch.tensor(3.0, dtype=DT)).covariance(tau),
        3.0 * torch.cos(2.0 * tau),
    )


@pytest.mark.parametrize("lam", [0.1, 0.7, 4.0])
@pytest.mark.parametrize("order", [None, 3, 12])
def test_periodic_sde_covariance(lam: float, order: int | None) -> None:
    kernel = _periodic(1.7, lam)
    sde = kernel_to_sde(kernel, periodic_order=order)
    q2, tail = periodic_series(kernel.lengthscale.reshape(()), order=order)
    assert sde.state_dim == 2 * q2.shape[0] - 1
    tau = torch.linspace(-2.0, 6.0, 161, dtype=DT)
    harmonics = torch.arange(q2.shape[0], dtype=DT) * 2 * math.pi / 1.7
    series = (q2 * torch.cos(harmonics * tau[:, None])).sum(-1)
    torch.testing.assert_close(sde.covariance(tau), series, atol=1e-10, rtol=0)
    exact = torch.exp(-2.0 * torch.sin(math.pi * tau / 1.7) ** 2 / lam)  # gpytorch convention
    torch.testing.assert_close(_dense_kernel_exact(kernel, tau), exact, atol=1e-13, rtol=0)
    err = (sde.covariance(tau) - exact).abs().max()
    assert float(err) <= float(tail) + 1e-12
    assert float(sde.lyapunov_residual().abs().max()) < 1e-14
    sde2 = periodic_sde(torch.tensor(1.7, dtype=DT), torch.tensor(lam, dtype=DT), order=order)
    torch.testing.assert_close(sde2.F, sde.F)


@pytest.mark.parametrize("name", list(_kernels()))
def test_kernel_reconstruction_and_valid_noise(name: str) -> None:
    kernel, exact = _kernels()[name]
    sde = kernel_to_sde(kernel)
    tau = torch.linspace(0.0, 6.0, 121, dtype=DT)
    K_trunc, err = _dense_kernel(kernel, tau)
    torch.testing.assert_close(sde.covariance(tau), K_trunc, atol=1e-10, rtol=0)
    gap = (sde.covariance(tau) - _dense_kernel_exact(kernel, tau)).abs().max()
    assert float(gap) <= (1e-12 if exact else err + 1e-12)
    resid = sde.lyapunov_residual().abs().max() / sde.Pinf.abs().max()
    assert float(resid) < 1e-12
    _, Q = discretise(sde, torch.tensor([1e-3, 0.2, 1.0, 10.0], dtype=DT))
    assert float(torch.linalg.eigvalsh(Q).min()) > -1e-10


def _dense_kernel_exact(kernel: Kernel, tau: torch.Tensor) -> torch.Tensor:
    x = torch.zeros(1, 1, dtype=DT)
    return kernel(x, tau.reshape(-1, 1)).to_dense().reshape(tau.shape)


def test_product_is_kronecker() -> None:
    a = kernel_to_sde(_matern(1.5, 0.7))
    b = kernel_to_sde(_cosine(1.1))
    p = product_sde([a, b])
    assert p.state_dim == 4
    dt = torch.tensor([0.4], dtype=DT)
    A, _ = discretise(p, dt)
    torch.testing.assert_close(A[0], torch.kron(discretise(a, dt)[0][0], discretise(b, dt)[0][0]))
    triple = kernel_to_sde(_matern(0.5, 1.0) * _matern(1.5, 2.0) * _cosine(0.5))
    assert triple.state_dim == 4


# -- likelihoods ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sequential", "parallel"])
@pytest.mark.parametrize("name", list(_kernels()))
def test_lml_matches_dense(name: str, method: str) -> None:
    kernel, exact = _kernels()[name]
    noise = 0.1
    model = StateSpaceGP(kernel, noise=noise, method=method).to(DT)
    t, y = _data()
    lml = model.log_marginal_likelihood(t, y)
    tau = t[:, None] - t[None, :]
    K_trunc, err = _dense_kernel(kernel, tau)
    torch.testing.assert_close(lml, _dense_lml(K_trunc, y, model.noise.item()), atol=1e-8, rtol=0)
    ref_exact = _dense_lml(_exact_dense(kernel, t), y, model.noise.item())
    if exact:
        torch.testing.assert_close(lml, ref_exact, atol=1e-8, rtol=0)
    else:
        s2, n = model.noise.item(), t.shape[0]
        bound = 0.5 * n * err * (1.0 / s2 + float(y @ y) / s2**2)
        assert abs(float(lml - ref_exact)) <= bound
        assert abs(float(lml - ref_exact)) > 0  # it is an approximation


@pytest.mark.parametrize("method", ["sequential", "parallel"])
@pytest.mark.parametrize("name", ["m32_x_per", "m32_x_per_plus_m12", "m12_x_cos_plus_per"])
def test_lml_gradients_match_dense(name: str, method: str) -> None:
    kernel, _ = _kernels()[name]
    model = StateSpaceGP(kernel, noise=0.1, method=method).to(DT)
    t, y = _data(30)
    params = [p for n, p in model.named_parameters() if "period" in n or "lengthscale" in n]
    assert len(params) >= 2
    grads = torch.autograd.grad(model.log_marginal_likelihood(t, y), params)
    K_trunc, _ = _dense_kernel(kernel, t[:, None] - t[None, :])
    ref = torch.autograd.grad(_dense_lml(K_trunc, y, model.noise.item()), params)
    for g, r in zip(grads, ref, strict=True):
        assert bool(torch.isfinite(g).all())
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)


def test_parallel_and_sequential_posteriors_agree() -> None:
    kernel, _ = _kernels()["m32_x_per_plus_m12"]
    model = StateSpaceGP(kernel, noise=0.1).to(DT)
    t, y = _data()
    model.set_data(t, y)
    t_new = torch.linspace(-1.0, float(t.max()) + 2.0, 37, dtype=DT)
    seq = model.posterior(t_new, method="sequential")
    par = model.posterior(t_new, method="parallel")
    torch.testing.assert_close(par.mean, seq.mean, atol=1e-9, rtol=0)
    torch.testing.assert_close(par.variance, seq.variance, atol=1e-9, rtol=0)
    # and against the dense GP posterior with the same truncated kernel
    tt = torch.cat([t, t_new])
    K, _ = _dense_kernel(kernel, tt[:, None] - tt[None, :])
    n = t.shape[0]
    Kxx = K[:n, :n] + 0.1 * torch.eye(n, dtype=DT)
    mean = K[n:, :n] @ torch.linalg.solve(Kxx, y)
    var = K.diagonal()[n:] - (K[n:, :n] * torch.linalg.solve(Kxx, K[:n, n:]).T).sum(-1)
    torch.testing.assert_close(seq.mean.squeeze(-1), mean.detach(), atol=1e-8, rtol=0)
    torch.testing.assert_close(seq.variance.squeeze(-1), var.detach(), atol=1e-8, rtol=0)


def test_model_passes_the_periodic_order_through():
    kernel = ScaleKernel(MaternKernel(nu=1.5)) * PeriodicKernel()
    fixed = StateSpaceGP(kernel, noise=0.1, periodic_order=5)
    # Matérn-3/2 has 2 states, a 5-harmonic series 2 * 5 + 1
    assert fixed.sde(dtype=torch.float64).F.shape == (22, 22)
    assert StateSpaceGP(kernel, noise=0.1).sde(dtype=torch.float64).F.shape[0] > 22

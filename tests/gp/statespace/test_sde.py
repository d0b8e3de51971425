"""Kernel -> SDE conversion and exact discretisation (Hartikainen & Särkkä 2010).

Tolerances: the closed forms are exact, so float64 reconstructions of ``k(tau)`` agree to
rounding (observed ~1e-15); the tests use 1e-10 absolute (kernel values are O(1)) and 1e-14
times ``max|F| max|Pinf|`` (the size of the cancelling terms) on the Lyapunov residual.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch
from gpytorch.kernels import (
    AdditiveKernel,
    MaternKernel,
    PeriodicKernel,
    RBFKernel,
    ScaleKernel,
)

from gp.statespace import LTISDE, discretise, kernel_to_sde, matern_sde, stack_sdes

DT = torch.float64


def _matern(nu: float, ell: float, scale: float | None = None, **kw) -> gpytorch.kernels.Kernel:
    k = MaternKernel(nu=nu, **kw)
    k.lengthscale = ell
    if scale is not None:
        k = ScaleKernel(k)
        k.outputscale = scale
    return k.to(DT)


def kernels() -> dict[str, gpytorch.kernels.Kernel]:
    return {
        "matern12": _matern(0.5, 0.7),
        "matern32": _matern(1.5, 1.1),
        "matern52": _matern(2.5, 1.5),
        "scale_matern12": _matern(0.5, 0.7, 1.3),
        "scale_matern32": _matern(1.5, 1.1, 0.8),
        "scale_matern52": _matern(2.5, 0.4, 2.0),
        "sum_12_52": _matern(0.5, 0.7, 1.3) + _matern(2.5, 2.5, 0.5),
        "scale_of_sum": ScaleKernel(AdditiveKernel(_matern(1.5, 0.3), _matern(2.5, 3.0))).to(DT),
        "constant_plus_matern": _constant(2.5) + _matern(1.5, 0.6, 0.7),
    }


def _constant(c: float) -> gpytorch.kernels.Kernel:
    k = gpytorch.kernels.ConstantKernel()
    k.constant = torch.tensor(c)
    return k.to(DT)


@pytest.mark.parametrize("name", list(kernels()))
def test_stationary_covariance_reproduces_kernel(name: str) -> None:
    kernel = kernels()[name]
    sde = kernel_to_sde(kernel)
    tau = torch.tensor([0.0, 1e-3, 0.1, 0.5, 1.0, 2.7, 6.0], dtype=DT)
    expected = kernel(tau[:, None], torch.zeros(1, 1, dtype=DT)).to_dense().squeeze(-1)
    torch.testing.assert_close(sde.covariance(tau), expected, atol=1e-10, rtol=0)
    # negative lags: the kernel is symmetric
    torch.testing.assert_close(sde.covariance(-tau), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", list(kernels()))
def test_lyapunov_residual_vanishes(name: str) -> None:
    sde = kernel_to_sde(kernels()[name])
    scale = sde.F.abs().max() * sde.Pinf.abs().max()  # size of the terms that cancel
    assert sde.lyapunov_residual().abs().max() < 1e-14 * scale
    assert sde.dtype == DT
    d = sde.state_dim
    assert sde.F.shape == sde.Pinf.shape == (d, d)
    assert sde.H.shape == (1, d)
    assert sde.L.shape[0] == d and sde.Qc.shape == (sde.L.shape[1],) * 2
    assert torch.linalg.eigvalsh(sde.Pinf).min() > 0


def test_state_dimensions() -> None:
    ks = kernels()
    dims = {name: kernel_to_sde(k).state_dim for name, k in ks.items()}
    assert dims["matern12"] == 1 and dims["matern32"] == 2 and dims["matern52"] == 3
    assert dims["sum_12_52"] == 4 and dims["scale_of_sum"] == 5


def test_sde_is_differentiable_in_hyperparameters() -> None:
    kernel = _matern(1.5, 1.1, 0.8)
    sde = kernel_to_sde(kernel)
    sde.covariance(torch.tensor([0.3, 1.0], dtype=DT)).sum().backward()
    assert kernel.raw_outputscale.grad is not None and kernel.raw_outputscale.grad != 0
    raw_ls = kernel.base_kernel.raw_lengthscale
    assert raw_ls.grad is not None and raw_ls.grad.abs().sum() > 0


def test_dtype_argument_casts_hyperparameters() -> None:
    kernel = ScaleKernel(MaternKernel(nu=2.5))  # float32 parameters
    sde = kernel_to_sde(kernel, dtype=torch.float64)
    assert all(m.dtype == torch.float64 for m in (sde.F, sde.L, sde.Qc, sde.H, sde.Pinf))
    assert kernel_to_sde(kernel).dtype == torch.float32
    assert sde.to(dtype=torch.float32).F.dtype == torch.float32


def test_matern_sde_rejects_other_nu() -> None:
    with pytest.raises(ValueError, match="nu"):
        matern_sde(3.5, torch.tensor(1.0))


def test_stack_sdes_single_and_empty() -> None:
    sde = matern_sde(1.5, torch.tensor(1.0, dtype=DT))
    assert stack_sdes([sde]) is sde
    with pytest.raises(ValueError, match="sdes"):
        stack_sdes([])


def test_rbf_kernel_raises_with_alternative() -> None:
    with pytest.raises(ValueError, match=r"RBFKernel.*MaternKernel\(nu=2.5\)"):
        kernel_to_sde(RBFKernel())
    with pytest.raises(ValueError, match="RBFKernel"):  # also inside a scale / sum
        kernel_to_sde(ScaleKernel(RBFKernel()) + MaternKernel(nu=0.5))


@pytest.mark.parametrize(
    "kernel, pattern",
    [
        (PeriodicKernel(ard_num_dims=2), "PeriodicKernel"),
        (MaternKernel(nu=0.5) * RBFKernel(), "RBFKernel"),
        (MaternKernel(nu=1.5, batch_shape=torch.Size([2])), "batch_shape"),
        (MaternKernel(nu=1.5, ard_num_dims=2), "ard_num_dims"),
        (MaternKernel(nu=1.5, active_dims=[1]), "active_dims"),
    ],
)
def test_unsupported_kernels_raise(kernel: gpytorch.kernels.Kernel, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        kernel_to_sde(kernel)


def test_non_kernel_raises() -> None:
    with pytest.raises(ValueError, match="kernel"):
        kernel_to_sde(torch.nn.Linear(1, 1))


def test_active_dims_zero_is_accepted() -> None:
    assert kernel_to_sde(MaternKernel(nu=1.5, active_dims=[0])).state_dim == 2


def test_discretise_matches_definition() -> None:
    sde = kernel_to_sde(kernels()["sum_12_52"])
    dt = torch.tensor([0.3, 0.0, 1.7, 0.3, 5.0], dtype=DT)
    A, Q = discretise(sde, dt)
    assert A.shape == Q.shape == (5, 4, 4)
    for k in range(5):
        A_ref = torch.linalg.matrix_exp(sde.F * dt[k])
        torch.testing.assert_close(A[k], A_ref, atol=1e-14, rtol=0)
        Q_ref = sde.Pinf - A_ref @ sde.Pinf @ A_ref.mT
        torch.testing.assert_close(Q[k], Q_ref, atol=1e-13, rtol=0)
        assert torch.equal(Q[k], Q[k].mT)
        assert torch.linalg.eigvalsh(Q[k]).min() > -1e-12
    # repeated timestamps: exactly identity and zero
    assert torch.equal(A[1], torch.eye(4, dtype=DT)) and torch.equal(
        Q[1], torch.zeros(4, 4, dtype=DT)
    )
    # Q = Pinf - A Pinf A^T also equals the integral form int_0^dt e^{Fs} L Qc L^T e^{F^T s} ds
    s = torch.linspace(0, 1.7, 4001, dtype=DT)
    E = torch.linalg.matrix_exp(s[:, None, None] * sde.F)
    integrand = E @ sde.L @ sde.Qc @ sde.L.mT @ E.mT
    integral = torch.trapezoid(integrand, s, dim=0)
    torch.testing.assert_close(Q[2], integral, atol=1e-6, rtol=0)


def test_discretise_empty_and_bad_shape() -> None:
    sde = matern_sde(2.5, torch.tensor(1.0, dtype=DT))
    A, Q = discretise(sde, torch.zeros(0, dtype=DT))
    assert A.shape == Q.shape == (0, 3, 3)
    with pytest.raises(ValueError, match="dt"):
        discretise(sde, torch.zeros(2, 2, dtype=DT))


def test_ltisde_is_a_plain_container() -> None:
    sde = matern_sde(0.5, torch.tensor(2.0, dtype=DT), torch.tensor(3.0, dtype=DT))
    assert isinstance(sde, LTISDE)
    torch.testing.assert_close(sde.Pinf, torch.tensor([[3.0]], dtype=DT))
    torch.testing.assert_close(sde.F, torch.tensor([[-0.5]], dtype=DT))
    torch.testing.assert_close(sde.Qc, torch.tensor([[3.0]], dtype=DT))  # 2 s^2 lam


def test_rescale_time_gives_the_same_prior_on_the_scaled_axis():
    from gpytorch.constraints import Interval
    from gpytorch.kernels import CosineKernel

    from gp.statespace import rescale_time

    periodic = PeriodicKernel(period_length_constraint=Interval(0.5, 2.0))
    periodic.period_length = torch.tensor(1.1)
    periodic.lengthscale = torch.tensor(0.7)
    kernel = (
        ScaleKernel(MaternKernel(nu=2.5) * periodic)
        + ScaleKernel(CosineKernel())
        + _matern(0.5, 0.3, 2.0)
    ).to(DT)
    t = torch.linspace(0.0, 3.0, 9, dtype=DT)[:, None]
    before = kernel(t).to_dense()
    scaled = rescale_time(kernel, 1e3)
    torch.testing.assert_close(scaled(1e3 * t).to_dense(), before, rtol=1e-12, atol=1e-12)
    constraint = scaled.kernels[0].base_kernel.kernels[1].raw_period_length_constraint
    assert float(constraint.lower_bound) == pytest.approx(500.0)
    assert float(constraint.upper_bound) == pytest.approx(2000.0)
    assert float(scaled.kernels[0].base_kernel.kernels[1].lengthscale) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="factor"):
        rescale_time(kernel, 0.0)

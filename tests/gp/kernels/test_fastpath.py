"""The one-GEMM tiles of RBF / Matérn / ScaleKernel equal gpytorch's kernels, values and
gradients (float64, 1e-10), and other kernels keep the generic gpytorch path."""

from __future__ import annotations

import pytest
import torch
from gpytorch.kernels import (
    LinearKernel,
    MaternKernel,
    PeriodicKernel,
    RBFKernel,
    ScaleKernel,
)

from gp.kernels import kernel_matvec
from gp.kernels._fastpath import stationary_spec

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _make(name: str, ard: bool, batch_shape: torch.Size = torch.Size()) -> ScaleKernel:
    d = 3 if ard else None
    base = (
        RBFKernel(ard_num_dims=d, batch_shape=batch_shape)
        if name == "rbf"
        else MaternKernel(nu=float(name), ard_num_dims=d, batch_shape=batch_shape)
    )
    kernel = ScaleKernel(base, batch_shape=batch_shape).to(DT)
    with torch.no_grad():
        shape = base.raw_lengthscale.shape
        base.lengthscale = 0.4 + torch.rand(shape, dtype=DT)
        kernel.outputscale = 0.5 + torch.rand(kernel.raw_outputscale.shape, dtype=DT)
    return kernel


NAMES = ["rbf", "0.5", "1.5", "2.5"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ard", [False, True])
def test_values_equal_gpytorch(name: str, ard: bool) -> None:
    k = _make(name, ard)
    assert stationary_spec(k) is not None and stationary_spec(k.base_kernel) is not None
    X, Z, V = (
        torch.randn(45, 3, dtype=DT),
        torch.randn(12, 3, dtype=DT),
        torch.randn(12, 2, dtype=DT),
    )
    dense = k(X, Z).to_dense() @ V
    for tile in (7, None):
        torch.testing.assert_close(kernel_matvec(k, X, Z, V, tile_size=tile), dense, **TOL)
    with torch.no_grad():  # the in-place variant of the elementwise map
        torch.testing.assert_close(kernel_matvec(k, X, Z, V, tile_size=7), dense, **TOL)
    unscaled = k.base_kernel(X, Z).to_dense() @ V
    torch.testing.assert_close(kernel_matvec(k.base_kernel, X, Z, V, tile_size=7), unscaled, **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_identical_points_give_the_kernel_at_zero(name: str) -> None:
    # x_i = z_j: the expansion |x|^2 + |z|^2 - 2 x.z leaves a rounding error of O(eps |x|^2)
    # in the squared distance; the kernels are smooth in r^2 except Matern 1/2, which is
    # linear in r = sqrt(r^2) near 0 and is therefore computed from direct differences here
    # (gpytorch's own value then carries the O(sqrt(eps)) ~ 1e-8 error, hence its tolerance).
    reference_tol = {"rtol": 0.0, "atol": 1e-6} if name == "0.5" else TOL
    k = _make(name, ard=True)
    Z = torch.randn(6, 3, dtype=DT)
    out = kernel_matvec(k, Z, Z, torch.eye(6, dtype=DT), tile_size=4)
    torch.testing.assert_close(out, k(Z, Z).to_dense(), **reference_tol)
    torch.testing.assert_close(out.diagonal(), k.outputscale.expand(6), **TOL)


def test_matern12_float32_near_coincident_points() -> None:
    # sqrt of the expansion's float32 rounding would be ~1e-3 here (|x| ~ 20); direct
    # differences keep the error at float32 resolution of k (<= 1e-6 with margin).
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 2, generator=g) * 3 + 20
    Z = X[:15].clone()
    k = MaternKernel(nu=0.5, ard_num_dims=2)
    exact = k.to(DT)(X.double(), Z.double()).to_dense()
    out = kernel_matvec(k.float(), X, Z, torch.eye(15))
    assert float((out.double() - exact).abs().max()) < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_gradients_equal_gpytorch(name: str) -> None:
    k = _make(name, ard=True)
    X = torch.randn(31, 3, dtype=DT, requires_grad=True)
    Z = torch.randn(8, 3, dtype=DT, requires_grad=True)
    V = torch.randn(8, 2, dtype=DT, requires_grad=True)
    W = torch.randn(31, 2, dtype=DT)
    leaves = [X, Z, V, k.raw_outputscale, k.base_kernel.raw_lengthscale]

    def grads(out: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad((out * W).sum(), leaves))

    dense = grads(k(X, Z).to_dense() @ V)
    for tile in (5, None):
        for a, b in zip(grads(kernel_matvec(k, X, Z, V, tile_size=tile)), dense, strict=True):
            assert b.abs().sum() > 0
            torch.testing.assert_close(a, b, **TOL)
    # hyperparameters only (gpytorch's custom-backward branch for inputs without grad)
    Xd, Zd = X.detach(), Z.detach()
    hyper = [k.raw_outputscale, k.base_kernel.raw_lengthscale]
    ours = torch.autograd.grad((kernel_matvec(k, Xd, Zd, V, tile_size=5) * W).sum(), hyper)
    ref = torch.autograd.grad((k(Xd, Zd).to_dense() @ V * W).sum(), hyper)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_batch_kernel_and_broadcast_inputs() -> None:
    k = _make("2.5", ard=False, batch_shape=torch.Size([2]))
    X = torch.randn(2, 17, 3, dtype=DT)
    Z = torch.randn(9, 3, dtype=DT)
    V = torch.randn(3, 1, 9, 1, dtype=DT)  # broadcasts to batch (3, 2)
    out = kernel_matvec(k, X, Z, V, tile_size=4)
    dense = k(X, Z).to_dense() @ V
    assert out.shape == (3, 2, 17, 1)
    torch.testing.assert_close(out, dense, **TOL)


def test_backend_gpytorch_and_other_kernels_use_forward() -> None:
    X, Z, V = torch.randn(20, 2, dtype=DT), torch.randn(7, 2, dtype=DT), torch.randn(7, 1, dtype=DT)
    fast = _make("rbf", ard=False)
    torch.testing.assert_close(
        kernel_matvec(fast, X, Z, V, backend="gpytorch", tile_size=6),
        kernel_matvec(fast, X, Z, V, backend="torch", tile_size=6),
        **TOL,
    )
    subclass = type("MyRBF", (RBFKernel,), {})().to(DT)
    for k in (PeriodicKernel().to(DT), LinearKernel().to(DT), RBFKernel(active_dims=[0]).to(DT)):
        assert stationary_spec(k) is None
        torch.testing.assert_close(
            kernel_matvec(k, X, Z, V, tile_size=6), k(X, Z).to_dense() @ V, **TOL
        )
    assert stationary_spec(subclass) is None
    assert stationary_spec(ScaleKernel(PeriodicKernel())) is None


def test_float32_close_to_float64() -> None:
    k = _make("rbf", ard=True)
    X, Z, V = (
        torch.randn(300, 3, dtype=DT),
        torch.randn(40, 3, dtype=DT),
        torch.randn(40, 3, dtype=DT),
    )
    exact = kernel_matvec(k, X, Z, V)
    with torch.no_grad():
        single = kernel_matvec(k.float(), X.float(), Z.float(), V.float(), tile_size=64)
    assert single.dtype == torch.float32
    # float32 rounding of O(m) terms of size O(|V|)
    torch.testing.assert_close(single.double(), exact, rtol=1e-4, atol=1e-4 * V.abs().sum(0).max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_dense() -> None:
    for name in NAMES:
        k = _make(name, ard=True).cuda()
        X = torch.randn(257, 3, dtype=DT, device="cuda", requires_grad=True)
        Z = torch.randn(33, 3, dtype=DT, device="cuda")
        V = torch.randn(33, 2, dtype=DT, device="cuda")
        out = kernel_matvec(k, X, Z, V, tile_size=100)
        dense = k(X, Z).to_dense() @ V
        torch.testing.assert_close(out, dense, **TOL)
        (ga,) = torch.autograd.grad(out.sum(), X)
        (gb,) = torch.autograd.grad(dense.sum(), X)
        torch.testing.assert_close(ga, gb, **TOL)

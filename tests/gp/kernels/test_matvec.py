"""Tiled kernel products equal the dense product; gradients flow through the tiles."""

from __future__ import annotations

import pytest
import torch
from gpytorch.kernels import MaternKernel, RBFKernel, ScaleKernel

from gp.kernels import (
    TILE_BYTES,
    cross_covariance_chunks,
    default_tile_size,
    kernel_diag,
    kernel_matvec,
)

DT = torch.float64


def _kernel(batch_shape: torch.Size = torch.Size()) -> ScaleKernel:
    k = ScaleKernel(MaternKernel(nu=1.5, batch_shape=batch_shape), batch_shape=batch_shape)
    k.base_kernel.lengthscale = 0.7
    k.outputscale = 1.3
    return k.to(DT)


@pytest.mark.parametrize("tile_size", [1, 7, 13, 50, None])
def test_matvec_equals_dense_with_batches(tile_size: int | None) -> None:
    k = _kernel()
    X = torch.randn(2, 3, 37, 2, dtype=DT)
    Z = torch.randn(3, 11, 2, dtype=DT)  # broadcasts against X's batch (2, 3)
    V = torch.randn(11, 4, dtype=DT)
    out = kernel_matvec(k, X, Z, V, tile_size=tile_size)
    dense = k(X, Z).to_dense() @ V
    assert out.shape == (2, 3, 37, 4)
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)


def test_matvec_batch_kernel_and_vector() -> None:
    k = RBFKernel(batch_shape=torch.Size([3])).to(DT)
    k.lengthscale = torch.tensor([0.5, 1.0, 2.0], dtype=DT).reshape(3, 1, 1)
    X, Z = torch.randn(3, 29, 1, dtype=DT), torch.randn(3, 10, 1, dtype=DT)
    v = torch.randn(10, dtype=DT)
    out = kernel_matvec(k, X, Z, v, tile_size=4)
    dense = k(X, Z).to_dense() @ v
    assert out.shape == (3, 29)
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)


def test_matvec_gradient_flows_to_hyperparameters_and_v() -> None:
    k = _kernel()
    X, Z = torch.randn(41, 3, dtype=DT), torch.randn(9, 3, dtype=DT)
    V = torch.randn(9, 2, dtype=DT, requires_grad=True)
    w = torch.randn(41, 2, dtype=DT)

    def grads(tiled: bool) -> list[torch.Tensor]:
        k.zero_grad()
        V.grad = None
        if tiled:
            out = kernel_matvec(k, X, Z, V, tile_size=6)
        else:
            out = k(X, Z).to_dense() @ V
        (out * w).sum().backward()
        return [
            k.raw_outputscale.grad.clone(),
            k.base_kernel.raw_lengthscale.grad.clone(),
            V.grad.clone(),
        ]

    for a, b in zip(grads(True), grads(False), strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_chunks_and_diag() -> None:
    k = _kernel()
    X, Z = torch.randn(2, 23, 2, dtype=DT), torch.randn(2, 5, 2, dtype=DT)
    chunks = list(cross_covariance_chunks(k, X, Z, tile_size=10))
    assert [s for s, _ in chunks] == [0, 10, 20]
    assert [b.shape[-2] for _, b in chunks] == [10, 10, 3]
    torch.testing.assert_close(torch.cat([b for _, b in chunks], -2), k(X, Z).to_dense())
    diag = kernel_diag(k, X)
    assert diag.shape == (2, 23)
    torch.testing.assert_close(diag, k(X).to_dense().diagonal(dim1=-2, dim2=-1))


def test_default_tile_is_about_tile_bytes_and_bad_input() -> None:
    rows = default_tile_size(1000, 1, torch.float64)
    assert rows * 1000 * 8 <= TILE_BYTES < (rows + 1) * 1000 * 8
    assert default_tile_size(10**9, 4, torch.float32) == 1
    k = _kernel()
    X = torch.randn(5, 2, dtype=DT)
    with pytest.raises(ValueError, match="tile_size"):
        kernel_matvec(k, X, X, torch.ones(5, 1, dtype=DT), tile_size=0)
    with pytest.raises(ValueError, match="V"):
        kernel_matvec(k, X, X, torch.ones(4, 1, dtype=DT))
    with pytest.raises(ValueError, match="Z"):
        kernel_matvec(k, X, torch.randn(5, 3, dtype=DT), torch.ones(5, 1, dtype=DT))


@pytest.mark.parametrize("backend", ["torch", "gpytorch"])
@pytest.mark.parametrize("name", ["X", "Z", "V"])
def test_non_finite_inputs_are_refused_naming_them(backend: str, name: str) -> None:
    args = {"X": torch.randn(5, 2, dtype=DT), "Z": torch.randn(4, 2, dtype=DT)}
    args["V"] = torch.randn(4, dtype=DT)
    for bad in (float("nan"), float("inf")):
        values = {k: v.clone() for k, v in args.items()}
        values[name].view(-1)[1] = bad
        with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
            kernel_matvec(_kernel(), values["X"], values["Z"], values["V"], backend=backend)
    if name != "V":
        values = {k: v.clone() for k, v in args.items()}
        values[name][0, 0] = float("nan")
        with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
            next(cross_covariance_chunks(_kernel(), values["X"], values["Z"]))
        with pytest.raises(ValueError, match="X contains NaN or inf"):  # its argument is X
            kernel_diag(_kernel(), values[name])


@pytest.mark.parametrize("backend", ["torch", "gpytorch"])
def test_mixed_dtypes_compute_in_the_promoted_dtype(backend: str) -> None:
    k = _kernel()
    X, Z, V = torch.randn(6, 2, dtype=DT), torch.randn(5, 2, dtype=DT), torch.randn(5, 3, dtype=DT)
    reference = k(X, Z).to_dense() @ V
    mixes = [(X.float(), Z, V), (X, Z.float(), V), (X, Z, V.float()), (X.float(), Z.float(), V)]
    for Xi, Zi, Vi in mixes:
        out = kernel_matvec(k, Xi, Zi, Vi, backend=backend)
        assert out.dtype == DT
        # a float32 argument carries float32 rounding (relative 6e-8) into the result
        torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)
    # a float32 kernel with float64 data computes in float64
    out = kernel_matvec(_kernel().float(), X, Z, V, backend=backend)
    assert out.dtype == DT
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)
    chunks = torch.cat([b for _, b in cross_covariance_chunks(k, X.float(), Z, tile_size=4)], -2)
    torch.testing.assert_close(chunks, k(X, Z).to_dense(), rtol=1e-6, atol=1e-6)


def test_integer_inputs_are_refused_naming_them() -> None:
    X, Z = torch.randn(5, 2, dtype=DT), torch.randn(4, 2, dtype=DT)
    with pytest.raises(ValueError, match="V must have a floating-point dtype"):
        kernel_matvec(_kernel(), X, Z, torch.arange(4))
    with pytest.raises(ValueError, match="X must have a floating-point dtype"):
        kernel_matvec(_kernel(), torch.ones(5, 2, dtype=torch.long), Z, torch.ones(4, dtype=DT))

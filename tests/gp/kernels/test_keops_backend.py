"""Backend dispatch of kernel_matvec: "auto" never picks KeOps, "keops" is opt-in, CUDA-only
unless allowed, limited to RBF / Matérn, and explains how to install pykeops when missing."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from gpytorch.kernels import MaternKernel, PeriodicKernel, RBFKernel, ScaleKernel

import gp.kernels._keops as keops_module
import gp.kernels.matvec as matvec_module
from gp.kernels import kernel_matvec

DT = torch.float64
HAS_PYKEOPS = importlib.util.find_spec("pykeops") is not None


def _data() -> tuple[ScaleKernel, torch.Tensor, torch.Tensor, torch.Tensor]:
    k = ScaleKernel(MaternKernel(nu=2.5, ard_num_dims=2)).to(DT)
    X, Z, V = torch.randn(30, 2, dtype=DT), torch.randn(6, 2, dtype=DT), torch.randn(6, 2, dtype=DT)
    return k, X, Z, V


def _hide_pykeops(monkeypatch: pytest.MonkeyPatch) -> None:
    # a None entry in sys.modules makes `import pykeops...` raise ImportError
    for name in ("pykeops", "pykeops.torch"):
        monkeypatch.setitem(sys.modules, name, None)


def _fake_keops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def fake(spec, X, Z, V):
        calls.append(spec.family)
        return torch.zeros(X.shape[-2], V.shape[-1], dtype=X.dtype)

    monkeypatch.setattr(matvec_module, "keops_matvec", fake)
    return calls


def test_auto_and_torch_never_call_keops(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_keops(monkeypatch)
    k, X, Z, V = _data()
    dense = k(X, Z).to_dense() @ V
    for backend in ("auto", "torch", "gpytorch"):
        out = kernel_matvec(k, X, Z, V, backend=backend, tile_size=8)
        torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)
    assert calls == []


def test_keops_is_called_when_asked_and_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_keops(monkeypatch)
    k, X, Z, V = _data()
    out = kernel_matvec(k, X, Z, V, backend="keops", allow_keops_cpu=True)
    assert calls == ["matern"] and out.shape == (30, 2)


def test_keops_on_cpu_tensors_needs_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_keops(monkeypatch)
    k, X, Z, V = _data()
    with pytest.raises(ValueError, match="allow_keops_cpu=True"):
        kernel_matvec(k, X, Z, V, backend="keops")
    assert calls == []


def test_keops_without_pykeops_explains_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_pykeops(monkeypatch)
    k, X, Z, V = _data()
    with pytest.raises(ImportError, match=r"backend='keops'.*pip install pykeops"):
        kernel_matvec(k, X, Z, V, backend="keops", allow_keops_cpu=True)
    # the package and the other backends work without it
    out = kernel_matvec(k, X, Z, V, backend="auto")
    torch.testing.assert_close(out, k(X, Z).to_dense() @ V, rtol=1e-10, atol=1e-10)


def test_keops_rejects_unsupported_kernels_and_bad_backend() -> None:
    _, X, Z, V = _data()
    for kernel in (
        PeriodicKernel().to(DT),
        ScaleKernel(PeriodicKernel()).to(DT),
        RBFKernel(active_dims=[0]).to(DT),
        RBFKernel().to(DT) + RBFKernel().to(DT),
    ):
        with pytest.raises(TypeError, match="backend='keops' supports"):
            kernel_matvec(kernel, X, Z, V, backend="keops", allow_keops_cpu=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernel_matvec(RBFKernel().to(DT), X, Z, V, backend="cuda")


def test_importing_gp_does_not_import_pykeops() -> None:
    # no import-time side effects: pykeops is imported only inside keops_matvec
    assert "pykeops" not in vars(keops_module)
    assert "pykeops" not in vars(matvec_module)


def _keops_matches_torch(device: str) -> None:
    for kernel in (
        ScaleKernel(RBFKernel(ard_num_dims=3)),
        MaternKernel(nu=0.5),
        ScaleKernel(MaternKernel(nu=1.5)),
        ScaleKernel(MaternKernel(nu=2.5, ard_num_dims=3)),
    ):
        kernel = kernel.to(device=device, dtype=DT)
        X = torch.randn(2, 50, 3, dtype=DT, device=device, requires_grad=True)
        Z = torch.randn(2, 9, 3, dtype=DT, device=device)
        V = torch.randn(9, 2, dtype=DT, device=device)
        ours = kernel_matvec(kernel, X, Z, V, backend="keops", allow_keops_cpu=True)
        ref = kernel_matvec(kernel, X, Z, V, backend="torch")
        torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-8)
        (ga,) = torch.autograd.grad(ours.sum(), X)
        (gb,) = torch.autograd.grad(ref.sum(), X)
        torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-8)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_PYKEOPS, reason="pykeops is optional and not installed")
def test_keops_matches_torch_on_cpu() -> None:
    _keops_matches_torch("cpu")


@pytest.mark.skipif(
    not (HAS_PYKEOPS and torch.cuda.is_available()), reason="needs CUDA and pykeops"
)
def test_keops_matches_torch_on_cuda() -> None:
    _keops_matches_torch("cuda")

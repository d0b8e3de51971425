"""Compiled Kalman log-likelihood with a hand-written adjoint (gp.statespace.fast).

References, all float64: the sequential torch filter on ``discretise`` (same recursion,
different rounding: observed agreement ~1e-14 relative, so 1e-10 is claimed), the dense GP
``MultivariateNormal.log_prob`` (Cholesky, ~1e-13), and autograd through the torch path for
every gradient (claimed 1e-8 relative to the largest entry; observed ~1e-13). The matrix
exponential and its Fréchet derivative are checked against scipy (backward error of the
Padé approximants <= 2^-53 per Al-Mohy & Higham, so 1e-12 relative for these well-conditioned
cases). The float32 check compares with float64 on the same float32-rounded inputs: the
only difference is the final rounding of the outputs to float32 (relative 6e-8; 1e-6 claimed).
"""

from __future__ import annotations

import subprocess
import sys

import gpytorch
import numpy as np
import pytest
import scipy.linalg
import torch
from gpytorch.kernels import MaternKernel, PeriodicKernel, ScaleKernel
from torch.distributions import MultivariateNormal

from gp.statespace import discretise, kalman_filter, kernel_to_sde
from gp.statespace import fast as fast_mod
from gp.statespace.fast import fast_log_marginal_likelihood, numba_available

DT = torch.float64
ORDER = 3  # fixed periodic series order: the SDE is then an exact kernel of its own
needs_numba = pytest.mark.skipif(not numba_available(), reason="numba is not installed")


def _matern(nu: float, ell: float, scale: float) -> gpytorch.kernels.Kernel:
    k = ScaleKernel(MaternKernel(nu=nu)).to(DT)
    k.base_kernel.lengthscale = ell
    k.outputscale = scale
    return k


def _quasi_periodic() -> gpytorch.kernels.Kernel:
    per = PeriodicKernel().to(DT)
    per.period_length = torch.tensor(1.3, dtype=DT)
    per.lengthscale = torch.tensor(0.9, dtype=DT)
    return _matern(1.5, 2.0, 0.7) * per


KERNELS = {
    "matern12": lambda: _matern(0.5, 0.7, 1.3),
    "matern32": lambda: _matern(1.5, 1.1, 0.8),
    "matern52": lambda: _matern(2.5, 1.5, 2.0),
    "sum_12_52": lambda: _matern(0.5, 0.9, 0.6) + _matern(2.5, 2.0, 1.1),
    "quasi_periodic": _quasi_periodic,
}


def _data(n: int, seed: int = 0, missing: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted irregular times with repeats (n >= 6) and ~1 in 7 targets missing."""
    g = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(n, generator=g, dtype=DT) * 0.15 * n).values
    if n >= 6:
        t[3] = t[2]  # a pair of repeated times
        t[n - 2] = t[n - 3]
        t = torch.sort(t).values
    y = torch.sin(1.3 * t) + 0.3 * torch.randn(n, generator=g, dtype=DT)
    if missing and n >= 3:
        y[1::7] = float("nan")
    return t, y


class _Setup:
    """A kernel, a differentiable noise and the parameters to differentiate."""

    def __init__(self, name: str, noise: float = 0.05, per_step_noise: int | None = None):
        self.name = name
        self.kernel = KERNELS[name]()
        if per_step_noise is None:
            self.raw_noise = torch.tensor(noise, dtype=DT).log().requires_grad_(True)
        else:
            g = torch.Generator().manual_seed(5)
            base = noise * (1 + torch.rand(per_step_noise, generator=g, dtype=DT))
            self.raw_noise = base.log().requires_grad_(True)
        self.params = [*self.kernel.parameters(), self.raw_noise]

    @property
    def noise(self) -> torch.Tensor:
        return self.raw_noise.exp()

    def sde(self):
        return kernel_to_sde(self.kernel, periodic_order=ORDER)


def _torch_lml(s: _Setup, dt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    sde = s.sde()
    A, Q = discretise(sde, dt)
    return kalman_filter(A, Q, sde.H, sde.Pinf, y, s.noise, zero_step=dt == 0).log_likelihood


def _dense_lml(s: _Setup, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    keep = ~torch.isnan(y)
    noise = s.noise.expand(len(y))[keep]
    t, y = t[keep], y[keep]
    if s.name == "quasi_periodic":  # the truncated series is the model: its own kernel
        K = s.sde().covariance((t[:, None] - t[None, :]).reshape(-1)).reshape(len(t), len(t))
    else:
        K = s.kernel(t[:, None]).to_dense()
    return MultivariateNormal(
        torch.zeros_like(y), covariance_matrix=K + torch.diag(noise)
    ).log_prob(y)


def _grads(value: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, allow_unused=True)  # n = 1: F is unused
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def _assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    err = (actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)
    assert err < rtol, f"relative error {err:.3e} >= {rtol:.0e}"


# ------------------------------------------------------------------- value and gradients


@needs_numba
@pytest.mark.parametrize("n", [1, 2, 3, 41])
@pytest.mark.parametrize("name", list(KERNELS))
def test_lml_and_gradients_equal_torch_filter_and_dense_gp(name: str, n: int) -> None:
    s = _Setup(name)
    t, y = _data(n)
    dt = t.diff()
    fast = fast_log_marginal_likelihood(s.sde(), dt, y, s.noise, backend="numba")
    ref = _torch_lml(s, dt, y)
    assert fast.shape == () and fast.dtype == DT
    _assert_rel(fast, ref, 1e-10)
    _assert_rel(fast, _dense_lml(s, t, y), 1e-10)
    _assert_rel(_grads(fast, s.params), _grads(ref, s.params), 1e-8)


@needs_numba
@pytest.mark.parametrize("name", ["matern32", "quasi_periodic"])
def test_per_step_noise_and_regular_grid(name: str) -> None:
    """(n,) noise; a regular grid (runs of equal steps share one Fréchet derivative)."""
    n = 30
    s = _Setup(name, per_step_noise=n)
    t = torch.arange(n, dtype=DT) * 0.25  # exact multiples: all steps equal
    t[10:] += 0.125  # one different step in the middle
    _, y = _data(n)
    dt = t.diff()
    assert len(torch.unique(dt)) == 2
    fast = fast_log_marginal_likelihood(s.sde(), dt, y, s.noise, backend="numba")
    ref = _torch_lml(s, dt, y)
    _assert_rel(fast, ref, 1e-10)
    _assert_rel(fast, _dense_lml(s, t, y), 1e-10)
    _assert_rel(_grads(fast, s.params), _grads(ref, s.params), 1e-8)


@needs_numba
def test_gradients_wrt_times_and_targets() -> None:
    """dL/d dt (through A = expm(F dt), also at repeated times) and dL/dy vs autograd."""
    s = _Setup("sum_12_52")
    t, y = _data(25)
    dt = t.diff().requires_grad_(True)
    y = y.clone().requires_grad_(True)
    sde = s.sde()
    fast = fast_log_marginal_likelihood(sde, dt, y, s.noise, backend="numba")
    # reference without torch.unique (which has no gradient): one matrix_exp per step
    A = torch.linalg.matrix_exp(dt[:, None, None] * sde.F)
    Q = sde.Pinf - A @ sde.Pinf @ A.mT
    ref = kalman_filter(A, Q, sde.H, sde.Pinf, y, s.noise).log_likelihood
    g_fast = torch.autograd.grad(fast, [dt, y])
    g_ref = torch.autograd.grad(ref, [dt, y], allow_unused=True)
    _assert_rel(g_fast[0], g_ref[0], 1e-8)
    expected_gy = torch.nan_to_num(g_ref[1], nan=0.0)  # NaN targets do not enter
    _assert_rel(g_fast[1], expected_gy, 1e-8)
    assert bool((g_fast[1][torch.isnan(y.detach())] == 0).all())
    assert (dt.detach() == 0).any()


@needs_numba
def test_all_missing_gives_zero_and_zero_gradients() -> None:
    s = _Setup("matern32")
    t, _ = _data(8)
    y = torch.full((8,), float("nan"), dtype=DT)
    lml = fast_log_marginal_likelihood(s.sde(), t.diff(), y, s.noise, backend="numba")
    assert lml.item() == 0.0
    grads = torch.autograd.grad(lml, s.params, allow_unused=True)
    assert all(g is None or bool((g == 0).all()) for g in grads)


@needs_numba
def test_no_grad_path_equals_taped_path() -> None:
    s = _Setup("matern52")
    t, y = _data(50)
    with_grad = fast_log_marginal_likelihood(s.sde(), t.diff(), y, s.noise, backend="numba")
    with torch.no_grad():
        without = fast_log_marginal_likelihood(s.sde(), t.diff(), y, s.noise, backend="numba")
    assert without.requires_grad is False and with_grad.requires_grad
    assert without.item() == with_grad.item()


@needs_numba
def test_second_backward_through_the_same_graph_raises() -> None:
    s = _Setup("matern32")
    t, y = _data(10)
    lml = fast_log_marginal_likelihood(s.sde(), t.diff(), y, s.noise, backend="numba")
    lml.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        lml.backward()


@needs_numba
def test_float32_inputs() -> None:
    t, y = _data(60)
    kernel32 = KERNELS["matern32"]().to(torch.float32)
    noise32 = torch.tensor(0.05, dtype=torch.float32, requires_grad=True)
    dt32, y32 = t.diff().float(), y.float()
    sde32 = kernel_to_sde(kernel32)
    lml32 = fast_log_marginal_likelihood(sde32, dt32, y32, noise32, backend="numba")
    assert lml32.dtype == torch.float32
    params32 = [*kernel32.parameters(), noise32]
    g32 = _grads(lml32, params32)
    assert g32.dtype == torch.float32
    # float64 on the same (float32-rounded) inputs
    kernel64 = kernel32.to(DT)
    noise64 = noise32.detach().double().requires_grad_(True)
    lml64 = fast_log_marginal_likelihood(
        kernel_to_sde(kernel64), dt32.double(), y32.double(), noise64, backend="numba"
    )
    _assert_rel(lml32.double(), lml64, 1e-6)
    _assert_rel(g32.double(), _grads(lml64, [*kernel64.parameters(), noise64]), 1e-6)


# ------------------------------------------------------------------------ torch fallback


@pytest.mark.parametrize("name", ["matern12", "quasi_periodic"])
def test_torch_fallback_without_numba(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With numba reported missing, "auto" uses the torch scan; "numba" raises ImportError."""
    s = _Setup(name)
    t, y = _data(33)
    dt = t.diff()
    expected = _torch_lml(s, dt, y)
    g_expected = _grads(expected, s.params)
    if numba_available():
        compiled = fast_log_marginal_likelihood(s.sde(), dt, y, s.noise)
        _assert_rel(compiled, expected, 1e-10)
        _assert_rel(_grads(compiled, s.params), g_expected, 1e-8)
    monkeypatch.setattr(fast_mod, "numba_available", lambda: False)
    fallback = fast_log_marginal_likelihood(s.sde(), dt, y, s.noise)
    _assert_rel(fallback, expected, 1e-10)
    _assert_rel(_grads(fallback, s.params), g_expected, 1e-8)
    with pytest.raises(ImportError, match="numba"):
        fast_log_marginal_likelihood(s.sde(), dt, y, s.noise, backend="numba")


def test_explicit_torch_backend_n1() -> None:
    s = _Setup("matern32")
    t, y = _data(1, missing=False)
    lml = fast_log_marginal_likelihood(s.sde(), t.diff(), y, s.noise, backend="torch")
    _assert_rel(lml, _dense_lml(s, t, y), 1e-10)


def test_import_does_not_import_numba() -> None:
    code = "import sys, gp.statespace.fast; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------ compiled pieces


@needs_numba
@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_expm_and_its_adjoint_equal_scipy(d: int) -> None:
    """expm(tau F) and tau L(tau F^T, G) against scipy for every Padé degree and squaring."""
    kern = fast_mod._kernels()
    rng = np.random.default_rng(d)
    F = rng.standard_normal((d, d))
    norm = kern._norm1_both(F)
    powers = kern.normalised_powers(F, norm)
    work, piv = np.empty((16, d, d)), np.empty(d, dtype=np.int64)
    for tau in (1e-5, 3e-3, 0.05, 0.3, 0.9, 4.0, 30.0):
        A = np.empty((d, d))
        kern.expm_scaled(powers, tau * norm, A, work, piv)
        expected = scipy.linalg.expm(tau * F)
        assert np.abs(A - expected).max() <= 1e-12 * np.abs(expected).max()
        G = rng.standard_normal((1, d, d))
        gF = np.zeros((d, d))
        kern.expm_adjoint(F, np.array([tau]), G.copy(), gF)
        expected = tau * scipy.linalg.expm_frechet(tau * F.T, G[0], compute_expm=False)
        assert np.abs(gF - expected).max() <= 1e-12 * np.abs(expected).max()


# ---------------------------------------------------------------------------- bad input


def test_bad_input_raises() -> None:
    s = _Setup("matern32")
    t, y = _data(10)
    dt, sde = t.diff(), s.sde()
    with pytest.raises(ValueError, match="dt"):
        fast_log_marginal_likelihood(sde, dt[:-1], y, s.noise)
    with pytest.raises(ValueError, match="dt"):
        fast_log_marginal_likelihood(sde, -dt, y, s.noise)
    with pytest.raises(ValueError, match="y must"):
        fast_log_marginal_likelihood(sde, dt, y[None], s.noise)
    with pytest.raises(ValueError, match="inf"):
        fast_log_marginal_likelihood(sde, dt, y.clone().fill_(float("inf")), s.noise)
    with pytest.raises(ValueError, match="noise"):
        fast_log_marginal_likelihood(sde, dt, y, -s.noise)
    with pytest.raises(ValueError, match="noise"):
        fast_log_marginal_likelihood(sde, dt, y, torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="backend"):
        fast_log_marginal_likelihood(sde, dt, y, s.noise, backend="jax")
    with pytest.raises(TypeError, match="sde"):
        fast_log_marginal_likelihood(sde.F, dt, y, s.noise)


@pytest.mark.skipif(not numba_available(), reason="needs numba")
def test_short_lengthscale_in_tiny_time_units_is_exact() -> None:
    # ell = 1e-3 with steps ~1e-6: raw Matérn-5/2 coordinates span lambda^4 ~ 1e13; the
    # compiled path balances the state first, so the LML is that of the dense GP (and of
    # the same data in rescaled time units) to rounding.
    kernel = _matern(2.5, 1e-3, 1.0)
    g = torch.Generator().manual_seed(2)
    t = torch.cumsum(torch.rand(200, generator=g, dtype=DT) * 1e-6, 0)
    y = torch.randn(200, generator=g, dtype=DT)
    sde = kernel_to_sde(kernel)
    lml = fast_log_marginal_likelihood(sde, t.diff(), y, torch.tensor(0.1, dtype=DT))
    K = kernel(t[:, None]).to_dense() + 0.1 * torch.eye(200, dtype=DT)
    dense = MultivariateNormal(torch.zeros(200, dtype=DT), K).log_prob(y)
    assert abs(lml.item() - dense.item()) < 1e-8 * abs(dense.item())
    grads = torch.autograd.grad(lml, list(kernel.parameters()))
    dense_grads = torch.autograd.grad(dense, list(kernel.parameters()))
    for a, b in zip(grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_torch_fallback_is_differentiable_in_dt() -> None:
    kernel = _matern(1.5, 0.7, 1.2)
    t, y = _data(15, missing=False)
    dt = t.diff().clone().requires_grad_(True)
    lml = fast_log_marginal_likelihood(kernel_to_sde(kernel), dt, y, 0.05, backend="torch")
    (grad,) = torch.autograd.grad(lml, dt)
    assert grad.shape == dt.shape and bool(torch.isfinite(grad).all())
    if numba_available():
        dt2 = t.diff().clone().requires_grad_(True)
        lml2 = fast_log_marginal_likelihood(kernel_to_sde(kernel), dt2, y, 0.05, backend="numba")
        (grad2,) = torch.autograd.grad(lml2, dt2)
        # repeated times (dt = 0): the torch path pins A = I, Q = 0 there (zero gradient);
        # the compiled path gives the one-sided derivative. Elsewhere they agree.
        positive = dt2.detach() > 0
        torch.testing.assert_close(grad[positive], grad2[positive], rtol=1e-8, atol=1e-10)

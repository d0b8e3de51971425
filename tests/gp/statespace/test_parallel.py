"""Parallel-in-time filter/smoother against the sequential one (Särkkä & García-Fernández 2021).

In float64 the associative scan and the sequential recursions agree to rounding, so the tests
claim 1e-8 relative on the LML and posterior moments and 1e-6 relative on gradients (the
sequential code itself equals the dense GP, see test_kalman.py; the LML is also checked
against the dense GP here). The float32 check bounds the per-point LML error at n = 4096 by
1e-4, as for the sequential filter.
"""

from __future__ import annotations

import math

import gpytorch
import pytest
import torch
from gpytorch.kernels import MaternKernel, ScaleKernel
from torch.distributions import MultivariateNormal

from gp.statespace import (
    StateSpaceGP,
    associative_scan,
    discretise,
    kalman_filter,
    kernel_to_sde,
    make_grid,
    parallel_kalman_filter,
    parallel_rts_smoother,
    resolve_method,
    rts_smoother,
)

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
}


def _model(name: str, method: str = "parallel") -> StateSpaceGP:
    return StateSpaceGP(KERNELS[name](), noise=NOISE, method=method).to(DT)


def _data(n: int, seed: int = 1, missing: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Irregular unsorted times; repeats (n >= 12) and NaN targets (n >= 8, if ``missing``)."""
    g = torch.Generator().manual_seed(seed)
    if n < 12:
        t = torch.rand(n, generator=g, dtype=DT) * 8
    else:
        base = torch.rand(n - 4, generator=g, dtype=DT) * 8
        t = torch.cat([base, base[[0, 3, 3, 7]]])  # one pair and one triple of repeats
        t = t[torch.randperm(n, generator=g)]
    y = torch.sin(1.3 * t) + 0.3 * torch.randn(n, generator=g, dtype=DT)
    if missing and n >= 8:
        y[torch.randperm(n, generator=g)[: n // 6]] = float("nan")
    return t, y


def _dense_lml(model: StateSpaceGP, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    keep = ~torch.isnan(y)
    t, y = t[keep], y[keep]
    K = model.kernel(t[:, None]).to_dense() + model.noise * torch.eye(len(t), dtype=DT)
    return MultivariateNormal(torch.zeros_like(y), covariance_matrix=K).log_prob(y)


def _assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    err = (actual - expected).abs().max() / expected.abs().max().clamp_min(1.0)
    assert err < rtol, f"relative error {err:.3e} >= {rtol:.0e}"


# ----------------------------------------------------------------------------------- scan


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8, 13, 64, 100])
@pytest.mark.parametrize("reverse", [False, True])
def test_associative_scan_matches_loop(n: int, reverse: bool) -> None:
    """Non-commutative operator (2x2 matrix products) plus a sum, any n."""
    g = torch.Generator().manual_seed(n)
    M = torch.randn(n, 2, 2, generator=g, dtype=DT)
    s = torch.randn(n, generator=g, dtype=DT)

    def op(a: tuple, b: tuple) -> tuple:
        return a[0] @ b[0], a[1] + b[1]

    out_M, out_s = associative_scan(op, (M, s), reverse=reverse)
    order = range(n - 1, -1, -1) if reverse else range(n)
    acc, expected_M, expected_s = None, torch.empty_like(M), torch.empty_like(s)
    total = 0.0
    for k in order:
        acc = M[k] if acc is None else (M[k] @ acc if reverse else acc @ M[k])
        total = total + s[k]
        expected_M[k], expected_s[k] = acc, total
    torch.testing.assert_close(out_M, expected_M, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_s, expected_s, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------- filter / smoother


def _filters(name: str, n: int, seed: int = 0) -> tuple:
    t, y = _data(n, seed=seed)
    model = _model(name)
    grid = make_grid(t, y)
    sde = kernel_to_sde(model.kernel, dtype=DT)
    A, Q = discretise(sde, grid.dt)
    args = (A, Q, sde.H, sde.Pinf, grid.y, model.noise.detach())
    seq = kalman_filter(*args, zero_step=grid.zero_step)
    par = parallel_kalman_filter(*args, zero_step=grid.zero_step)
    return A, grid, seq, par


@pytest.mark.parametrize("n", [1, 2, 37, 64])
@pytest.mark.parametrize("name", list(KERNELS))
def test_filter_moments_equal_sequential(name: str, n: int) -> None:
    A, grid, seq, par = _filters(name, n)
    for field in ("mean", "cov", "pred_mean", "pred_cov"):
        _assert_rel(getattr(par, field), getattr(seq, field), 1e-8)
    _assert_rel(par.log_likelihood, seq.log_likelihood, 1e-8)
    m_seq, P_seq = rts_smoother(A, seq, zero_step=grid.zero_step)
    m_par, P_par = parallel_rts_smoother(A, par, zero_step=grid.zero_step)
    _assert_rel(m_par, m_seq, 1e-8)
    _assert_rel(P_par, P_seq, 1e-8)


@pytest.mark.parametrize("n", [1, 2, 37, 64])
@pytest.mark.parametrize("name", list(KERNELS))
def test_lml_equals_sequential_and_dense(name: str, n: int) -> None:
    model = _model(name)
    t, y = _data(n)
    lml = model.log_marginal_likelihood(t, y)
    assert lml.shape == ()
    _assert_rel(lml, model.log_marginal_likelihood(t, y, method="sequential"), 1e-8)
    _assert_rel(lml, _dense_lml(model, t, y), 1e-8)


@pytest.mark.parametrize("y", [[float("nan")], [float("nan"), 0.4], [0.4, float("nan")]])
def test_lml_small_with_missing(y: list[float]) -> None:
    model = _model("sum_12_52")
    t, y = torch.tensor([0.3, 1.2], dtype=DT)[: len(y)], torch.tensor(y, dtype=DT)
    lml = model.log_marginal_likelihood(t, y)
    expected = model.log_marginal_likelihood(t, y, method="sequential")
    assert abs(lml.item() - expected.item()) <= 1e-12


def test_lml_all_missing_is_zero_and_differentiable() -> None:
    model = _model("matern32")
    t = torch.tensor([0.0, 1.0, 1.0, 2.5], dtype=DT)
    lml = model.log_marginal_likelihood(t, torch.full((4,), float("nan"), dtype=DT))
    assert lml.item() == 0.0
    lml.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", list(KERNELS))
def test_gradients_equal_sequential(name: str) -> None:
    t, y = _data(37, seed=4)
    grads = {}
    for method in ("sequential", "parallel"):
        model = _model(name, method=method)
        model.log_marginal_likelihood(t, y).backward()
        grads[method] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert torch.isfinite(grads[method]).all()
    _assert_rel(grads["parallel"], grads["sequential"], 1e-6)


@pytest.mark.parametrize("n", [1, 2, 37, 64])
@pytest.mark.parametrize("name", list(KERNELS))
def test_posterior_equals_sequential(name: str, n: int) -> None:
    t, y = _data(n, seed=5)
    span = (float(t.min()) - 1.0, float(t.max()) + 2.0)
    t_new = torch.cat([t[: min(n, 3)], torch.linspace(*span, 17, dtype=DT)])
    model = _model(name).set_data(t, y)
    par = model.posterior(t_new)
    seq = model.posterior(t_new, method="sequential")
    _assert_rel(par.mean, seq.mean, 1e-8)
    _assert_rel(par.variance, seq.variance, 1e-8)


@pytest.mark.parametrize("n", [4096, 100_000])
def test_float32_long_series_close_to_float64(n: int) -> None:
    # issue 3: float32 at n = 1e5 is finite with |LML32 - LML64| / n < 1e-4 (mean step 0.1)
    g = torch.Generator().manual_seed(7)
    t = torch.sort(torch.rand(n, generator=g, dtype=DT) * n / 10).values
    y = torch.sin(0.7 * t) + 0.3 * torch.randn(n, generator=g, dtype=DT)
    y[::50] = float("nan")
    model64 = StateSpaceGP(MaternKernel(nu=1.5), noise=0.1, method="parallel").to(DT)
    model32 = StateSpaceGP(MaternKernel(nu=1.5), noise=0.1, method="parallel")
    lml64 = model64.log_marginal_likelihood(t, y)
    lml32 = model32.log_marginal_likelihood(t.float(), y.float())
    assert lml32.dtype == torch.float32
    assert math.isfinite(lml32.item())
    assert abs(lml32.item() - lml64.item()) / n < 1e-4
    lml32.backward()
    assert all(torch.isfinite(p.grad).all() for p in model32.parameters())


# ------------------------------------------------------------------------------- dispatch


def test_resolve_method() -> None:
    for device in (None, "cpu", torch.device("cpu"), torch.device("cuda"), "cuda:1"):
        assert resolve_method("auto", device) == "parallel"
        assert resolve_method("fast", device) == "parallel"  # smoothing of "fast" is the scan
        assert resolve_method("sequential", device) == "sequential"
        assert resolve_method("parallel", device) == "parallel"
    with pytest.raises(ValueError, match="method"):
        resolve_method("scan", torch.device("cpu"))


def test_model_method_argument() -> None:
    model = StateSpaceGP(MaternKernel(nu=0.5))
    assert model.method == "auto"
    assert "method='auto'" in repr(model)
    with pytest.raises(ValueError, match="method"):
        StateSpaceGP(MaternKernel(nu=0.5), method="scan")
    t, y = _data(12)
    with pytest.raises(ValueError, match="method"):
        model.log_marginal_likelihood(t.float(), y.float(), method="scan")


def _forbid(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    import gp.statespace.model as model_module
    import gp.statespace.smoothing as smoothing_module

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("forbidden path used")

    for name in names:
        modules = [m for m in (model_module, smoothing_module) if hasattr(m, name)]
        assert modules, name
        for module in modules:
            monkeypatch.setattr(module, name, fail)


def test_auto_uses_the_compiled_lml_on_cpu_when_numba_is_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gp.statespace.model as model_module

    t, y = _data(12)
    model = _model("matern32", method="auto")
    expected = model.log_marginal_likelihood(t, y, method="sequential")
    monkeypatch.setattr(model_module, "numba_available", lambda: True)
    _forbid(monkeypatch, "kalman_filter", "parallel_kalman_filter")
    torch.testing.assert_close(model.log_marginal_likelihood(t, y), expected, rtol=1e-10, atol=0)


def test_auto_uses_the_parallel_scan_without_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    import gp.statespace.model as model_module

    monkeypatch.setattr(model_module, "numba_available", lambda: False)
    _forbid(monkeypatch, "kalman_filter", "rts_smoother", "fast_log_marginal_likelihood")
    t, y = _data(12)
    model = _model("matern32", method="auto")
    model.log_marginal_likelihood(t, y)
    model.set_data(t, y).posterior(t)


def test_fast_method_batches_and_smoothing_use_the_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid(monkeypatch, "kalman_filter", "rts_smoother")
    t, y = _data(12)
    model = _model("matern32", method="fast")
    single = model.log_marginal_likelihood(t, y)
    batch = model.log_marginal_likelihood(t, torch.stack([y, y]))
    torch.testing.assert_close(batch, torch.stack([single, single]), rtol=1e-10, atol=0)
    model.set_data(t, y).posterior(t)

"""Batches of independent series in ``StateSpaceGP`` (LML, gradients, posterior).

A batch is the same arithmetic as a Python loop over its series, vectorised: in float64 the
two agree to rounding (observed ~1e-15 relative), so every comparison claims 1e-10 relative
(1e-10 absolute floor). Both the sequential loop and the parallel scan are checked, on
per-series irregular unsorted times with repeats, missing values (including a series with
nothing observed) and n = 13, not a power of two.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch
from gpytorch.kernels import MaternKernel, ScaleKernel

from gp.statespace import (
    StateSpaceGP,
    StateSpacePosterior,
    discretise,
    kalman_filter,
    make_grid,
)

DT = torch.float64
B, N = 4, 13
METHODS = ["sequential", "parallel"]


def _kernel() -> gpytorch.kernels.Kernel:
    k1 = ScaleKernel(MaternKernel(nu=1.5))
    k1.base_kernel.lengthscale = 1.1
    k1.outputscale = 0.8
    k2 = MaternKernel(nu=0.5)
    k2.lengthscale = 2.0
    return (k1 + k2).to(DT)


def _model(method: str) -> StateSpaceGP:
    return StateSpaceGP(_kernel(), noise=0.05, method=method).to(DT)


def _batch(per_series: bool = True, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Times (B, N) (or (N,) shared) and targets (B, N) with repeats and NaNs."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(B if per_series else 1, N, generator=g, dtype=DT) * 6
    t[:, 4] = t[:, 9]  # a repeated timestamp in every series
    t[0, 2] = t[0, 7] = t[0, 11]  # and a triple in the first
    y = torch.sin(1.3 * t) + 0.3 * torch.randn(B, N, generator=g, dtype=DT)
    y[1, [0, 5, 12]] = float("nan")
    y[2, 3] = float("nan")
    y[3] = float("nan")  # nothing observed: log p = 0, posterior = prior
    return (t if per_series else t[0]), y


def _rows(t: torch.Tensor, b: int) -> torch.Tensor:
    return t if t.dim() == 1 else t[b]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("per_series", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_lml_and_gradients_equal_a_loop(method: str, per_series: bool) -> None:
    model = _model(method)
    t, y = _batch(per_series)
    params = [p for p in model.parameters() if p.requires_grad]
    lml = model.log_marginal_likelihood(t, y)
    assert lml.shape == (B,)
    grads = torch.autograd.grad(lml.sum(), params)
    loop = torch.stack([model.log_marginal_likelihood(_rows(t, b), y[b]) for b in range(B)])
    loop_grads = torch.autograd.grad(loop.sum(), params)
    _close(lml.detach(), loop.detach())
    assert lml[3].item() == 0.0  # nothing observed
    for g, g_loop in zip(grads, loop_grads, strict=True):
        _close(g, g_loop)


@pytest.mark.parametrize("shared_new", [True, False])
@pytest.mark.parametrize("per_series", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_posterior_equals_a_loop(method: str, per_series: bool, shared_new: bool) -> None:
    model = _model(method)
    t, y = _batch(per_series)
    g = torch.Generator().manual_seed(5)
    # between, at, before and after the data; per series or shared
    t_new = torch.rand(B, 7, generator=g, dtype=DT) * 9 - 1.5
    t_new[:, 0] = _rows(t, 0)[4] if per_series else t[4]
    t_new = t_new[0] if shared_new else t_new.unsqueeze(-1)  # (n,) or (B, n, 1)
    post = model.set_data(t, y).posterior(t_new, observation_noise=True)
    assert isinstance(post, StateSpacePosterior)
    assert post.mean.shape == post.variance.shape == (B, 7, 1)
    for b in range(B):
        single = model.set_data(_rows(t, b), y[b]).posterior(
            _rows(t_new, b), observation_noise=True
        )
        _close(post.mean[b], single.mean)
        _close(post.variance[b], single.variance)
    prior_var = model.kernel(torch.zeros(1, 1, dtype=DT)).to_dense()[0, 0] + model.noise
    _close(post.mean[3], torch.zeros(7, 1, dtype=DT))  # series 3: nothing observed
    _close(post.variance[3], prior_var.detach().expand(7, 1))


def test_sequential_and_parallel_batches_agree() -> None:
    t, y = _batch()
    seq, par = _model("sequential"), _model("parallel")
    _close(par.log_marginal_likelihood(t, y), seq.log_marginal_likelihood(t, y))
    t_new = torch.linspace(-1, 7, 11, dtype=DT)
    a = seq.set_data(t, y).posterior(t_new)
    b = par.set_data(t, y).posterior(t_new)
    _close(b.mean, a.mean)
    _close(b.variance, a.variance)


@pytest.mark.parametrize("method", METHODS)
def test_two_batch_dimensions_and_column_form(method: str) -> None:
    model = _model(method)
    t, y = _batch()
    t2, y2 = t.reshape(2, 2, N), y.reshape(2, 2, N)
    lml = model.log_marginal_likelihood(t2.unsqueeze(-1), y2.unsqueeze(-1))  # (..., n, 1)
    assert lml.shape == (2, 2)
    _close(lml.reshape(B), model.log_marginal_likelihood(t, y))
    post = model.set_data(t2, y2).posterior(torch.tensor([0.5, 2.0], dtype=DT))
    assert post.mean.shape == (2, 2, 2, 1)
    assert post.rsample(torch.Size([3])).shape == (3, 2, 2, 2, 1)


def test_shared_times_broadcast_against_batched_targets() -> None:
    model = _model("sequential")
    t, y = _batch(per_series=False)
    _close(
        model.log_marginal_likelihood(t, y),
        model.log_marginal_likelihood(t.expand(B, N), y),
    )
    grid = make_grid(t, y)
    assert grid.times.shape == (N,) and grid.y.shape == (B, N)  # one grid, shared


def test_kalman_filter_accepts_per_series_noise() -> None:
    model = _model("sequential")
    t, y = _batch()
    grid = make_grid(t, y)
    sde = model.sde(dtype=DT)
    A, Q = discretise(sde, grid.dt.reshape(-1))
    A, Q = A.reshape(B, N - 1, *A.shape[-2:]), Q.reshape(B, N - 1, *Q.shape[-2:])
    noise = torch.linspace(0.01, 0.2, B, dtype=DT)[:, None]  # (B, 1): one variance per series
    out = kalman_filter(A, Q, sde.H, sde.Pinf, grid.y, noise, zero_step=grid.zero_step)
    for b in range(B):
        single = kalman_filter(A[b], Q[b], sde.H, sde.Pinf, grid.y[b], noise[b, 0])
        _close(out.log_likelihood[b], single.log_likelihood)
        _close(out.mean[b], single.mean)


def test_bad_batch_shapes_raise() -> None:
    model = _model("sequential")
    t, y = _batch()
    with pytest.raises(ValueError, match="batch shape"):
        model.log_marginal_likelihood(t[:3], y)
    model.set_data(t, y)
    with pytest.raises(ValueError, match="X must have 1 input dimensions"):
        model.posterior(torch.zeros(3, 5, dtype=DT))
    with pytest.raises(ValueError, match="X must have shape"):  # batch 3 against the data's 4
        model.posterior(torch.zeros(3, 5, 1, dtype=DT))

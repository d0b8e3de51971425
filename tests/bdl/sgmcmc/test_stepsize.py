"""The step-size heuristic: exact curvature on quadratic potentials, the rule, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bdl.sgmcmc import hessian_max_eigenvalue, initial_square_avg, suggest_lr


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out - y).pow(2).sum(-1).mean()


@pytest.fixture()
def linear_problem():
    # mean loss 0.5 * mean (a_i^T w - y_i)^2 with a_i = (x_i, 1): Hessian A^T A / n exactly
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=gen, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.3])
    y = torch.randn(200, 1, generator=gen, dtype=torch.float64)
    model = nn.Linear(3, 1).double()
    design = torch.cat([x, torch.ones(200, 1, dtype=torch.float64)], 1)
    return model, x, y, design.T @ design / 200


def test_hessian_max_eigenvalue_is_exact_on_a_quadratic(linear_problem):
    model, x, y, hessian = linear_problem
    prior, n = 2.0, 50.0
    expected = torch.linalg.eigvalsh(hessian + prior / n * torch.eye(4, dtype=torch.float64))
    got = hessian_max_eigenvalue(
        model, _mse, x, y, num_data=n, prior_precision=prior, num_iterations=500, tol=1e-14,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    # the eigen-gap is large (weights scaled by 3, 1, 0.3): power iteration is exact to 1e-10
    assert got == pytest.approx(float(expected[-1]), rel=1e-10)


def test_preconditioned_curvature_is_that_of_the_rescaled_hessian(linear_problem):
    model, x, y, hessian = linear_problem
    g_weight = torch.tensor([[0.1, 1.0, 10.0]], dtype=torch.float64)
    g_bias = torch.tensor([2.0], dtype=torch.float64)
    root = torch.cat([g_weight[0], g_bias]).sqrt()
    expected = torch.linalg.eigvalsh(root[:, None] * hessian * root[None, :])[-1]
    got = hessian_max_eigenvalue(
        model, _mse, x, y, num_data=200, preconditioner=[g_weight, g_bias],
        num_iterations=500, tol=1e-14, generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert got == pytest.approx(float(expected), rel=1e-8)


def test_suggest_lr_rule_per_sampler(linear_problem):
    model, x, y, hessian = linear_problem
    h = float(torch.linalg.eigvalsh(hessian)[-1])
    kwargs = dict(
        num_data=200, num_iterations=500, tol=1e-14, generator=torch.Generator().manual_seed(1)
    )
    # SGLD: half the stability limit 2 / h, i.e. |1 - lr h| <= 1 with equality at the top
    assert suggest_lr(model, _mse, x, y, sampler="sgld", **kwargs) == pytest.approx(1 / h, rel=1e-6)
    # SGHMC: effective step lr / alpha follows the same rule
    lr = suggest_lr(model, _mse, x, y, sampler="sghmc", momentum_decay=0.05, **kwargs)
    assert lr == pytest.approx(0.05 / h, rel=1e-6)
    ones = [torch.ones_like(p) for p in model.parameters()]
    lr = suggest_lr(model, _mse, x, y, sampler="psgld", preconditioner=ones, **kwargs)
    assert lr == pytest.approx(1 / h, rel=1e-6)


def test_suggest_lr_is_scale_free(linear_problem):
    # multiplying the loss by c multiplies the curvature by c: the step must scale by 1 / c
    model, x, y, _ = linear_problem
    kwargs = dict(
        num_data=200, num_iterations=500, tol=1e-14, generator=torch.Generator().manual_seed(1)
    )
    base = suggest_lr(model, _mse, x, y, **kwargs)
    scaled = suggest_lr(model, lambda out, t: 10.0 * _mse(out, t), x, y, **kwargs)
    assert scaled == pytest.approx(base / 10.0, rel=1e-6)


def test_initial_square_avg_full_batch_is_the_squared_gradient(linear_problem):
    model, x, y, _ = linear_problem
    v = initial_square_avg(model, _mse, x, y, batch_size=500, num_batches=3)
    grads = torch.autograd.grad(_mse(model(x), y), list(model.parameters()))
    for got, g in zip(v, grads, strict=True):
        torch.testing.assert_close(got, g.pow(2), rtol=1e-12, atol=0)


def test_subsampling_uses_at_most_max_points():
    # a quadratic whose curvature is the mean of x_i^2: on a subset of points it is that
    # subset's mean, so the result must be one of the subset means (here all x_i^2 = 1)
    x = torch.from_numpy(np.sign(np.random.RandomState(0).randn(300, 1)))
    y = torch.zeros(300, 1, dtype=torch.float64)
    model = nn.Linear(1, 1, bias=False).double()
    lr = suggest_lr(model, _mse, x, y, num_data=300, sampler="sgld", max_points=10)
    assert lr == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sampler="adam"), "sampler"),
        (dict(momentum_decay=0.0), "momentum_decay"),
        (dict(momentum_decay=1.5), "momentum_decay"),
        (dict(sampler="psgld"), "preconditioner"),
        (dict(sampler="sgld", preconditioner=[]), "preconditioner"),
        (dict(max_points=0), "max_points"),
        (dict(num_data=0), "num_data"),
        (dict(prior_precision=-1.0), "prior_precision"),
    ],
)
def test_bad_input_names_the_argument(linear_problem, kwargs, match):
    model, x, y, _ = linear_problem
    with pytest.raises(ValueError, match=match):
        suggest_lr(model, _mse, x, y, **{"num_data": 200, **kwargs})


def test_non_finite_data_and_flat_potentials_are_refused(linear_problem):
    model, x, y, _ = linear_problem
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        suggest_lr(model, _mse, bad, y, num_data=200)
    with pytest.raises(ValueError, match="zero curvature"):
        suggest_lr(model, lambda out, t: (out - t).sum(), x, y, num_data=200)

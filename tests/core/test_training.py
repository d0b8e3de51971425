"""The one training loop: seeding, accumulation, hooks, early stopping, L-BFGS."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bdl.core.training import (
    EarlyStopping,
    minimize_lbfgs,
    seeded_generator,
    tensor_batches,
    train,
)

DT = torch.float64


def _problem(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=gen, dtype=DT)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    return X, X @ w + 0.01 * torch.randn(n, generator=gen, dtype=DT), w


def _run(seed, accumulate=1, batch_size=8, epochs=3, **kw):
    X, y, _ = _problem()
    lin = nn.Linear(3, 1, bias=False).double()
    nn.init.zeros_(lin.weight)
    opt = torch.optim.SGD(lin.parameters(), lr=0.05)
    batches = tensor_batches((X, y), batch_size, seeded_generator(seed))
    hist = train(
        lambda xb, yb: (lin(xb)[:, 0] - yb).pow(2).mean(), opt, batches, epochs,
        accumulate=accumulate, **kw,
    )  # fmt: skip
    return lin.weight.detach().clone(), hist


def test_same_seed_same_result_and_different_seed_differs():
    a, ha = _run(0)
    b, hb = _run(0)
    c, _ = _run(1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ha == hb and len(ha) == 3
    assert not torch.equal(a, c)


def test_epoch_loss_is_the_batch_size_weighted_mean():
    X, y, _ = _problem(n=10)
    w = torch.zeros(3, dtype=DT, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.0)  # no movement: the epoch mean is the full-data loss
    batches = tensor_batches((X, y), 4, seeded_generator(0))  # batches of 4, 4, 2
    hist = train(lambda xb, yb: (xb @ w - yb).pow(2).mean(), opt, batches, 1)
    assert hist[0] == pytest.approx(float(y.pow(2).mean()), rel=1e-12)


def test_gradient_accumulation_equals_one_larger_batch():
    """Accumulating k equal batches of b with weight 1/k is one step on k*b points."""
    X, y, _ = _problem(n=16)
    results = []
    for batch_size, accumulate in ((16, 1), (4, 4)):
        w = torch.zeros(3, dtype=DT, requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.1)
        batches = tensor_batches((X, y), batch_size, None, shuffle=False)
        train(
            lambda xb, yb, w=w: (xb @ w - yb).pow(2).mean(), opt, batches, 1, accumulate=accumulate
        )
        results.append(w.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-14)


def test_hooks_run_in_order_once_per_step():
    calls = []
    X, y, _ = _problem(n=12)
    w = torch.zeros(3, dtype=DT, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    train(
        lambda xb, yb: (xb @ w - yb).pow(2).mean(), opt,
        tensor_batches((X, y), 4, None, shuffle=False), 2,
        grad_hook=lambda params: calls.append(("grad", params[0] is w)),
        before_step=lambda: calls.append("before"), after_step=lambda: calls.append("after"),
    )  # fmt: skip
    assert calls == [("grad", True), "before", "after"] * 6


def test_end_of_epoch_stops_and_early_stopping_restores_the_best_state():
    lin = nn.Linear(1, 1)
    stopper = EarlyStopping(lin, patience=2)
    scores = iter([3.0, 1.0, 2.0, 2.5, 0.5])
    seen = []

    def end(epoch, loss):
        with torch.no_grad():
            lin.weight.fill_(float(epoch))
        seen.append(epoch)
        return stopper(next(scores))

    X = torch.randn(4, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.0)
    train(lambda xb: lin(xb).sum(), opt, tensor_batches((X,), 4, None), 10, end_of_epoch=end)
    assert seen == [0, 1, 2, 3]  # stopped after two epochs without improvement
    stopper.restore()
    assert float(lin.weight.detach()) == 1.0 and stopper.best_score == 1.0


def test_non_finite_loss_raises():
    w = torch.ones(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    with pytest.raises(RuntimeError, match="epoch 0"):
        train(lambda xb: (w * float("nan")).sum() + xb.sum(), opt,
              tensor_batches((torch.ones(3, 1),), 3, None), 2)  # fmt: skip


def test_several_optimizers_and_batches_of_gps_along_dim_minus_two():
    X = torch.randn(2, 10, 3, dtype=DT)  # a batch of two data sets
    y = torch.randn(2, 10, dtype=DT)
    a = torch.zeros(3, dtype=DT, requires_grad=True)
    b = torch.zeros((), dtype=DT, requires_grad=True)
    opts = [torch.optim.SGD([a], lr=0.1), torch.optim.SGD([b], lr=0.1)]
    sizes = []

    def loss(xb, yb):
        sizes.append(tuple(xb.shape))
        return (xb @ a + b - yb).pow(2).mean()

    batches = tensor_batches((X, y), 4, seeded_generator(0), dims=(-2, -1))
    train(loss, opts, batches, 1, batch_len=lambda batch: batch[0].shape[-2])
    assert sizes == [(2, 4, 3), (2, 4, 3), (2, 2, 3)]
    assert float(b) != 0.0 and bool((a != 0).all())
    with pytest.raises(ValueError, match="length"):
        tensor_batches((X, y[:, :5]), 4, None, dims=(-2, -1))


def test_minimize_lbfgs_solves_least_squares():
    X, y, w_true = _problem()
    w = torch.zeros(3, dtype=DT, requires_grad=True)
    hist = minimize_lbfgs(lambda: (X @ w - y).pow(2).mean(), [w], max_iter=100)
    exact = torch.linalg.lstsq(X, y).solution
    torch.testing.assert_close(w.detach(), exact, rtol=1e-6, atol=1e-8)
    assert hist[-1] <= hist[0]

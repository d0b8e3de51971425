"""Behaviour of the SG-MCMC optimizers: conventions, equivalences, errors, serialisation.

Tolerances
----------
The noise-free equivalences with ``torch.optim`` run in float32 on a small network for 25
steps: both sides compute the same update up to the order of floating-point operations (a few
ulp, ~1e-7 relative, of updates of size ~1e-2), so ``1e-6`` absolute is loose. Reproducibility
and round-trip checks are bitwise (``torch.equal``): same arithmetic, same random stream.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import nn

from bdl.sgmcmc import PSGLD, SGHMC, SGLD, NonFiniteGradientError, SGMCMCOptimizer

N = 120  # num_data
LAMBDA = 3.0  # prior precision


def make_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def batches(num: int = 25, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(123)
    for _ in range(num):
        yield torch.randn(8, 5, generator=g, dtype=dtype), torch.randint(3, (8,), generator=g)


def train(net: nn.Module, opt: torch.optim.Optimizer, num: int = 25) -> None:
    for x, y in batches(num, next(net.parameters()).dtype):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()  # mean minibatch loss
        opt.step()


def flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()])


Factory = Callable[..., torch.optim.Optimizer]
SAMPLERS: dict[str, Factory] = {
    "sgld": lambda ps, **kw: SGLD(ps, lr=0.05, num_data=N, **kw),
    "sghmc": lambda ps, **kw: SGHMC(ps, lr=0.05, num_data=N, momentum_decay=0.2, **kw),
    "psgld": lambda ps, **kw: PSGLD(ps, lr=0.005, num_data=N, **kw),
}


# ------------------------------------------------------------ noise-free equivalences
EQUIVALENT = {
    "sgld = sgd": (
        lambda ps: SGLD(ps, lr=0.1, num_data=N, temperature=0.0),
        lambda ps: torch.optim.SGD(ps, lr=0.1),
    ),
    "sgld prior = sgd weight decay": (
        lambda ps: SGLD(ps, lr=0.1, num_data=N, temperature=0.0, prior_precision=LAMBDA),
        lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=LAMBDA / N),
    ),
    "sghmc = sgd momentum": (
        lambda ps: SGHMC(ps, lr=0.1, num_data=N, momentum_decay=0.1, temperature=0.0),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    ),
    "sghmc prior = sgd momentum weight decay": (
        lambda ps: SGHMC(
            ps, lr=0.1, num_data=N, momentum_decay=0.3, temperature=0.0, prior_precision=LAMBDA
        ),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.7, weight_decay=LAMBDA / N),
    ),
    "psgld prior = rmsprop weight decay": (
        lambda ps: PSGLD(ps, lr=0.01, num_data=N, temperature=0.0, prior_precision=LAMBDA),
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.99, eps=1e-5, weight_decay=LAMBDA / N),
    ),
}


@pytest.mark.parametrize("name", list(EQUIVALENT))
def test_temperature_zero_equals_torch_optimizer(name: str) -> None:
    ours, reference = EQUIVALENT[name]
    a, b = make_net(), make_net()
    train(a, ours(list(a.parameters())))
    train(b, reference(list(b.parameters())))
    assert (flat(a) - flat(b)).abs().max().item() < 1e-6
    assert (flat(a) - flat(make_net())).abs().max().item() > 1e-3  # it did move


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_noise_flag_off_equals_temperature_zero(name: str) -> None:
    a, b = make_net(), make_net()
    opt_a = SAMPLERS[name](list(a.parameters()), temperature=0.0)
    opt_b = SAMPLERS[name](list(b.parameters()), generator=torch.Generator().manual_seed(1))
    opt_b.param_groups[0]["noise"] = False  # what CyclicalSchedule sets during exploration
    train(a, opt_a)
    train(b, opt_b)
    assert torch.equal(flat(a), flat(b))


def test_sghmc_with_unit_momentum_decay_is_sgld() -> None:
    """alpha = 1: v = w exactly, the same noise draw and drift as SGLD."""
    a, b = make_net(), make_net()
    g = torch.Generator
    train(a, SGLD(a.parameters(), lr=0.05, num_data=N, generator=g().manual_seed(4)))
    train(
        b,
        SGHMC(
            b.parameters(), lr=0.05, num_data=N, momentum_decay=1.0, generator=g().manual_seed(4)
        ),
    )
    assert torch.equal(flat(a), flat(b))


# ------------------------------------------------------------------- randomness
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_generator_makes_runs_reproducible(name: str) -> None:
    runs = []
    for seed in (7, 7, 8):
        net = make_net()
        train(
            net,
            SAMPLERS[name](list(net.parameters()), generator=torch.Generator().manual_seed(seed)),
        )
        runs.append(flat(net))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_state_dict_round_trip_continues_identically(name: str) -> None:
    net = make_net()
    opt = SAMPLERS[name](list(net.parameters()), generator=torch.Generator().manual_seed(3))
    train(net, opt, num=5)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    if name == "sghmc":
        assert all("velocity" in s for s in saved["opt"]["state"].values())
    if name == "psgld":
        assert all("square_avg" in s for s in saved["opt"]["state"].values())

    restored = make_net(seed=99)
    restored.load_state_dict(saved["model"])
    # a different seed: the loaded generator state must win
    opt2 = SAMPLERS[name](list(restored.parameters()), generator=torch.Generator().manual_seed(0))
    opt2.load_state_dict(saved["opt"])
    train(net, opt, num=5)
    train(restored, opt2, num=5)
    assert torch.equal(flat(net), flat(restored))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_deepcopy_and_pickle_keep_the_generator(name: str) -> None:
    net = make_net()
    opt = SAMPLERS[name](list(net.parameters()), generator=torch.Generator().manual_seed(2))
    train(net, opt, num=2)
    clone = copy.deepcopy(opt)
    assert isinstance(clone.generator, torch.Generator) and clone.check_finite
    restored = pickle.loads(pickle.dumps(opt))
    assert torch.equal(restored.generator.get_state(), opt.generator.get_state())


# ------------------------------------------------------------------- bad input
BAD = [
    ({"lr": 0.0}, "lr"),
    ({"lr": -1.0}, "lr"),
    ({"lr": math.nan}, "lr"),
    ({"lr": "0.1"}, "lr"),
    ({"num_data": None}, "num_data is required"),
    ({"num_data": 0}, "num_data"),
    ({"num_data": -5}, "num_data"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"prior_precision": -1.0}, "prior_precision"),
    ({"generator": 3}, "generator"),
]
SPECIFIC = [
    (SGHMC, {"momentum_decay": 0.0}, "momentum_decay"),
    (SGHMC, {"momentum_decay": 1.5}, "momentum_decay"),
    (PSGLD, {"alpha": 1.0}, "alpha"),
    (PSGLD, {"alpha": -0.1}, "alpha"),
    (PSGLD, {"eps": 0.0}, "eps"),
    (PSGLD, {"eps_relative": -0.1}, "eps_relative"),
]


@pytest.mark.parametrize("cls", [SGLD, SGHMC, PSGLD])
@pytest.mark.parametrize(("override", "match"), BAD)
def test_bad_arguments_raise_value_error_naming_them(cls, override, match) -> None:
    kwargs = {"lr": 0.1, "num_data": N, **override}
    with pytest.raises(ValueError, match=match):
        cls(make_net().parameters(), **kwargs)


@pytest.mark.parametrize(("cls", "override", "match"), SPECIFIC)
def test_bad_sampler_specific_arguments(cls, override, match) -> None:
    with pytest.raises(ValueError, match=match):
        cls(make_net().parameters(), lr=0.1, num_data=N, **override)


def test_num_data_is_required_without_a_default() -> None:
    with pytest.raises(ValueError, match="num_data"):
        SGLD(make_net().parameters(), lr=0.1)


def test_bad_param_group_is_not_added() -> None:
    net = make_net()
    params = list(net.parameters())
    opt = SGLD(params[:2], lr=0.1, num_data=N)
    with pytest.raises(ValueError, match="temperature"):
        opt.add_param_group({"params": params[2:], "temperature": -1.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": params[2:], "lr": 0.01})
    assert opt.param_groups[1]["lr"] == 0.01 and opt.param_groups[1]["num_data"] == N


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_gradient_raises_and_changes_nothing(name: str, bad: float) -> None:
    net = make_net()
    params = list(net.parameters())
    # two groups: the bad gradient is in the second, so the first must not be touched either
    factory = SAMPLERS[name]
    opt = factory([{"params": params[:2]}, {"params": params[2:]}])
    train(net, opt, num=3)  # build the optimizer state (velocity, square_avg)
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    for x, y in batches(1):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
    params[2].grad[0, 0] = bad
    with pytest.raises(NonFiniteGradientError, match=r"param_groups\[1\]\['params'\]\[0\]"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    state_after = opt.state_dict()["state"]
    for key, entry in state_before.items():
        for k, v in entry.items():
            assert torch.equal(v, state_after[key][k])
    # it is both a FloatingPointError and a ValueError
    assert issubclass(NonFiniteGradientError, FloatingPointError)
    assert issubclass(NonFiniteGradientError, ValueError)


def test_check_finite_false_skips_the_check() -> None:
    p = nn.Parameter(torch.zeros(3))
    opt = SGLD([p], lr=0.1, num_data=N, temperature=0.0, check_finite=False)
    p.grad = torch.tensor([1.0, math.nan, 0.0])
    opt.step()
    assert math.isnan(p[1].item())


def test_psgld_frozen_before_any_estimate_raises() -> None:
    p = nn.Parameter(torch.zeros(3))
    opt = PSGLD([p], lr=0.1, num_data=N)
    opt.freeze_preconditioner()
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="frozen"):
        opt.step()


@pytest.mark.parametrize("eps_relative", [0.0, 0.1])
def test_psgld_relative_eps_bounds_a_frozen_preconditioner(eps_relative: float) -> None:
    # entry 0 had no gradient when V was estimated; frozen, its G is 1 / eps = 1e5 without
    # eps_relative, and at most 1 / (eps_r sqrt(mean V)) (10x the tensor's typical G) with it
    lr, temperature, eps = 0.01, 1.0, 1e-5
    square_avg = torch.tensor([0.0, 1.0, 4.0, 9.0], dtype=torch.float64)
    p = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = PSGLD(
        [p], lr=lr, num_data=N, eps=eps, eps_relative=eps_relative,
        temperature=temperature, generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    opt.state[p]["square_avg"] = square_avg.clone()
    opt.freeze_preconditioner()
    p.grad = torch.ones(4, dtype=torch.float64)
    opt.step()
    denom = square_avg.sqrt() + eps + eps_relative * square_avg.mean().sqrt()
    std = math.sqrt(2.0 * lr * temperature / N)
    xi = torch.empty(4, dtype=torch.float64).normal_(
        0.0, std, generator=torch.Generator().manual_seed(3)
    )
    # theta' = theta - lr G d + (2 lr T / N)^(1/2) G^(1/2) xi, with G = 1 / denom
    expected = xi / denom.sqrt() - lr * p.grad / denom
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=0.0)
    assert torch.equal(opt.state[p]["square_avg"], square_avg)  # frozen: V unchanged
    g0 = 1.0 / float(denom[0])
    if eps_relative:
        assert g0 <= 1.0 / (eps_relative * math.sqrt(3.5))
    else:
        assert g0 == pytest.approx(1.0 / eps, rel=1e-12)


def test_sparse_gradients_are_rejected() -> None:
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        SGLD(emb.parameters(), lr=0.1, num_data=N).step()


# ------------------------------------------------------------------- layouts
def test_params_without_grad_and_mixed_dtypes() -> None:
    """A group mixing float32 / float64 and a parameter without gradient: the former are
    updated exactly as SGD would (T = 0), the latter is left alone; noise reaches every
    parameter with a gradient."""
    a32, a64, frozen = (
        nn.Parameter(torch.ones(4)),
        nn.Parameter(torch.ones(3).double()),
        nn.Parameter(torch.ones(2)),
    )
    opt = SGLD([a32, a64, frozen], lr=0.5, num_data=N, temperature=0.0)
    ref32, ref64 = a32.detach().clone(), a64.detach().clone()
    for _ in range(3):
        a32.grad, a64.grad = torch.full((4,), 0.25), torch.full((3,), 0.5, dtype=torch.float64)
        opt.step()
        ref32 -= 0.5 * 0.25
        ref64 -= 0.5 * 0.5
    assert torch.equal(a32.detach(), ref32) and torch.equal(a64.detach(), ref64)
    assert torch.equal(frozen.detach(), torch.ones(2))
    noisy = SGLD([a32, a64, frozen], lr=0.5, num_data=N)
    a32.grad, a64.grad = torch.zeros(4), torch.zeros(3, dtype=torch.float64)
    noisy.step()
    assert not torch.equal(a32.detach(), ref32) and not torch.equal(a64.detach(), ref64)
    assert torch.equal(frozen.detach(), torch.ones(2)) and a64.dtype == torch.float64


def test_changing_set_of_gradients_rebuilds_the_layout() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    opt = SGLD([a, b], lr=0.1, num_data=N, temperature=0.0)
    a.grad = torch.ones(2)
    opt.step()
    b.grad = torch.ones(3)
    opt.step()
    assert torch.allclose(a.detach(), torch.full((2,), -0.2))
    assert torch.allclose(b.detach(), torch.full((3,), -0.1))


def test_step_with_closure_returns_the_loss() -> None:
    net = make_net()
    opt = SGLD(net.parameters(), lr=0.05, num_data=N)
    x, y = next(batches(1))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert isinstance(opt, SGMCMCOptimizer) and isinstance(opt, torch.optim.Optimizer)

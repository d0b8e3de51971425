"""Structured SG-MCMC: reductions to SGLD, mean-field fixed point, buffers, groups, errors.

Tolerances
----------
Reductions to SGLD are bitwise (``torch.equal``): the same gradient through the same autograd
graph and the same noise stream. Where the gradient goes through the composite path (where +
functional_call) instead, the values are the same and the float32 arithmetic differs by a few
ulp of updates of size ~1e-3, so ``1e-6`` absolute is loose. The Gaussian and reservoir
tolerances are derived in their tests.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from bdl.sgmcmc import (
    SGHMC,
    SGLD,
    ChainBuffer,
    StructuredSampler,
    effective_sample_size,
    layer_groups,
    neuron_groups,
    random_groups,
)

N, LAMBDA, TEMP, LR = 120, 3.0, 0.7, 1e-2


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def make_loss(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 5, generator=g), torch.randint(3, (8,), generator=g)
    return lambda model: nn.functional.cross_entropy(model(x), y)


def run_sgld(net: nn.Module, steps: int, seed: int = 7) -> None:
    opt = SGLD(
        net.parameters(),
        lr=LR,
        num_data=N,
        temperature=TEMP,
        prior_precision=LAMBDA,
        generator=torch.Generator().manual_seed(seed),
    )
    for t in range(steps):
        opt.zero_grad()
        make_loss(t)(net).backward()
        opt.step()


def run_structured(net: nn.Module, steps: int, seed: int = 7, **kwargs) -> StructuredSampler:
    s = StructuredSampler(
        net,
        num_data=N,
        lr=LR,
        temperature=TEMP,
        prior_precision=LAMBDA,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    for t in range(steps):
        s.step(make_loss(t))
    return s


def assert_nets_equal(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_one_group_is_sgld_bitwise() -> None:
    ref, net = make_net(), make_net()
    run_sgld(ref, 20)
    names = [[n for n, _ in net.named_parameters()]]
    s = run_structured(net, 20, groups=names, buffer_size=7)
    assert_nets_equal(ref, net)
    assert s.num_groups == 1 and len(s.buffer) == 7


@pytest.mark.parametrize("num_masks", [1, 3])
def test_dropout_p0_is_sgld_bitwise(num_masks: int) -> None:
    ref, net = make_net(), make_net()
    run_sgld(ref, 20)
    run_structured(net, 20, groups="neuron", variant="dropout", dropout_p=0.0, num_masks=num_masks)
    assert_nets_equal(ref, net)


@pytest.mark.parametrize("variant", ["full", "dropout"])
def test_first_step_with_one_stored_sample_is_sgld(variant: str) -> None:
    # The buffer holds only theta_0 = theta, so every composite equals theta: the full variant
    # gives every group its exact gradient; the dropout variant with p -> 0 limit is covered
    # above, here p = 0.5 with L = 1 scales group g's gradient by rho_g / (1 - p).
    ref, net = make_net(), make_net()
    run_sgld(ref, 1)
    if variant == "full":
        run_structured(net, 1, groups="neuron")
        for p, q in zip(ref.parameters(), net.parameters(), strict=True):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    else:
        s = StructuredSampler(
            net, "layer", num_data=N, lr=LR, temperature=0.0, variant="dropout", dropout_p=0.5
        )
        torch.manual_seed(3)
        keep = torch.rand(1, 2) < 0.5  # the mask the sampler draws from the global RNG
        start = [p.detach().clone() for p in net.parameters()]
        grads = torch.autograd.grad(make_loss(0)(net), list(net.parameters()))
        torch.manual_seed(3)
        s.step(make_loss(0))
        for j, (p0, g, p) in enumerate(zip(start, grads, net.parameters(), strict=True)):
            scale = float(keep[0, j // 2]) / 0.5
            torch.testing.assert_close(p, p0 - LR * scale * g, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["full", "dropout"])
def test_vmap_and_loop_agree(variant: str) -> None:
    a, b = make_net(), make_net()
    run_structured(a, 6, groups="neuron", variant=variant, num_masks=4, vectorize=True)
    run_structured(b, 6, groups="neuron", variant=variant, num_masks=4, vectorize=False)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_sghmc_sampler_and_mean_field_draws() -> None:
    net = make_net()
    s = run_structured(
        net, 5, groups="random", num_groups=4, sampler=SGHMC, sampler_kwargs={"momentum_decay": 0.2}
    )
    assert isinstance(s.optimizer, SGHMC)
    draws = s.sample_parameters(10)
    stored = s.buffer.samples  # (6, D)
    flat = torch.cat([draws[n].reshape(10, -1) for n, _ in net.named_parameters()], dim=1)
    for k in range(s.num_groups):
        cols = s.group_ids == k  # each group of each draw is one stored row
        rows = flat[:, cols]
        match = (rows[:, None, :] == stored[None][:, :, cols]).all(-1)
        assert bool(match.any(1).all())


def test_gaussian_mean_field_fixed_point() -> None:
    # U = theta^T P theta / 2 with groups {theta_1}, {theta_2}: the mean-field fixed point has
    # means 0, variances T / P_gg (not (P^-1)_gg) and independent groups. C chains run at once
    # (one parameter entry per chain; the chains share buffer indices, which does not change
    # each chain's law). SGLD's discrete AR(1) with the drawn theta~_h as extra input has
    # v_g = (2T + eta P_gh^2 v_h) / (a (2 - eta a)), a = P_gg (the O(eta) bias).
    C, eta, S = 2000, 0.05, 4000  # chains, step (N = 1), buffer
    P = torch.tensor([[1.0, 0.8], [0.8, 2.0]], dtype=torch.float64)
    model = nn.Module()
    model.a = nn.Parameter(torch.zeros(C, dtype=torch.float64))
    model.b = nn.Parameter(torch.zeros(C, dtype=torch.float64))

    def loss_fn(m: nn.Module) -> torch.Tensor:
        return 0.5 * (P[0, 0] * m.a**2 + 2 * P[0, 1] * m.a * m.b + P[1, 1] * m.b**2).sum()

    s = StructuredSampler(
        model, [["a"], ["b"]], num_data=1, lr=eta, buffer_size=S,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    for _ in range(300):  # burn-in (relaxation time 1 / (eta a) <= 20 steps)
        s.step(loss_fn)
    s.clear_buffer()  # flush the transient, then fill the buffer at stationarity
    for _ in range(S):
        s.step(loss_fn)
    draws = []
    for i in range(1000):
        s.step(loss_fn)
        if i % 4 == 0:
            draws.append(torch.stack([model.a.detach().clone(), model.b.detach().clone()], -1))
    d = torch.stack(draws, 1)  # (C, draws, 2)
    a, off = P.diag(), P[0, 1].item()
    v = 1.0 / a
    for _ in range(20):  # fixed point of the coupled discrete variances
        v = (2.0 + eta * off**2 * v.flip(0)) / (a * (2.0 - eta * a))
    ess = effective_sample_size(d[:200], multichain=True) / 200 * C  # total ESS per coordinate
    rho2 = off**2 / (P[0, 0] * P[1, 1]).item()
    tau = 2.0 / (eta * a)  # integrated autocorrelation time of each coordinate (steps)
    # finite buffer: its mean has variance v_h tau_h / S, shifting theta_g's mean by
    # -P_gh / P_gg times it; the coupling amplifies by 1 / (1 - rho^2)
    buffer_bias = (off / a) ** 2 * v.flip(0) * tau.flip(0) / S / (1 - rho2)
    var_hat, mean_hat = d.var(dim=(0, 1)), d.mean(dim=(0, 1))
    # 4 standard errors: var of a variance estimate is 2 v^2 / ESS
    assert torch.all((var_hat - v).abs() <= 4 * v * (2 / ess).sqrt() + buffer_bias)
    assert torch.all(mean_hat.abs() <= 4 * (v / ess).sqrt())
    true_marginal = torch.linalg.inv(P).diag()  # 1.47, 0.74 vs mean-field ~1.03, 0.53
    assert torch.all((var_hat - true_marginal).abs() > 0.15)
    corr = torch.corrcoef(d.reshape(-1, 2).T)[0, 1]
    # SE 1 / sqrt(ESS) plus the finite-buffer cross-correlation |rho| tau / S / (1 - rho^2);
    # the exact posterior has correlation -0.57
    bound = 4 / ess.min().sqrt() + math.sqrt(rho2) * tau.max() / S / (1 - rho2)
    assert abs(corr.item()) <= bound.item()


def test_ring_buffer_keeps_newest() -> None:
    buf = ChainBuffer(5, 2, mode="ring")
    for n in range(12):
        buf.push(torch.full((2,), float(n)))
    assert sorted(buf.steps.tolist()) == [7, 8, 9, 10, 11]
    assert torch.equal(buf.samples[:, 0], buf.steps.double().float())


def test_reservoir_is_uniform() -> None:
    # R reservoirs of size m over n pushes: each push is kept with probability m / n, so its
    # count over R runs is Binomial(R, m / n); 4.5 standard deviations per push keep the
    # family-wise false-alarm rate below n * 7e-6 = 3.4e-4.
    m, n, R = 10, 50, 1000
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(n)
    for _ in range(R):
        buf = ChainBuffer(m, 1, mode="reservoir", generator=g)
        for k in range(n):
            buf.push(torch.tensor([float(k)]))
        assert len(buf) == m and len(set(buf.steps.tolist())) == m
        counts[buf.steps] += 1
    p = m / n
    assert torch.all((counts - R * p).abs() <= 4.5 * math.sqrt(R * p * (1 - p)))


def test_group_builders() -> None:
    net = make_net()
    assert {t.unique().numel() for t in layer_groups(net).values()} == {1}
    neurons = neuron_groups(net)
    assert torch.equal(neurons["0.bias"], torch.arange(16))
    assert torch.equal(neurons["2.weight"][:, 0], torch.arange(16, 19))
    ids = torch.cat([t.reshape(-1) for t in random_groups(net, 7, seed=1).values()])
    sizes = torch.bincount(ids)
    assert sizes.numel() == 7 and sizes.max() - sizes.min() <= 1
    assert StructuredSampler(net, "neuron", num_data=N, lr=LR).num_groups == 19


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"groups": "rows"}, "groups"),
        ({"groups": [["nope"]]}, "groups"),
        ({"groups": [["0.weight"], ["0.weight"]]}, "groups"),
        ({"groups": {"0.weight": torch.zeros(3, dtype=torch.long)}}, "groups"),
        ({"groups": "random"}, "num_groups"),
        ({"groups": "layer", "num_groups": 2}, "num_groups"),
        ({"variant": "half"}, "variant"),
        ({"dropout_p": 1.0}, "dropout_p"),
        ({"num_masks": 0}, "num_masks"),
        ({"buffer": "lifo"}, "buffer"),
        ({"buffer_size": 0}, "buffer_size"),
        ({"sampler": torch.optim.SGD}, "sampler"),
        ({"lr": -1.0}, "lr"),
        ({"num_data": None}, "num_data"),
    ],
)
def test_bad_inputs(kwargs: dict, name: str) -> None:
    args = {"num_data": N, "lr": LR, **kwargs}
    with pytest.raises(ValueError, match=name):
        StructuredSampler(make_net(), **args)


def test_bad_loss() -> None:
    s = StructuredSampler(make_net(), num_data=N, lr=LR)
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="loss_fn"):
        s.step(lambda m: m(x))
    with pytest.raises(ValueError, match="loss_fn"):
        s.step(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "sampler"),
    [
        ({"groups": "neuron", "buffer": "reservoir", "buffer_size": 4}, SGHMC),
        ({"groups": "layer", "variant": "dropout", "num_masks": 2, "buffer_size": 5}, SGLD),
    ],
)
def test_state_dict_resume_is_bitwise(kwargs: dict, sampler: type) -> None:
    # 12 uninterrupted steps vs 6 steps, save (model + sampler, through torch.save with
    # weights_only loading), rebuild everything fresh and load, 6 more steps: the noise,
    # buffer indices, masks and reservoir draws all come from the saved generator state and
    # the velocities from the saved optimizer state, so the runs must agree bit for bit.
    extra = (
        {"sampler": sampler, "sampler_kwargs": {"momentum_decay": 0.3}} if sampler is SGHMC else {}
    )

    def build(net: nn.Module) -> StructuredSampler:
        gen = torch.Generator().manual_seed(11)
        return StructuredSampler(
            net,
            num_data=N,
            lr=LR,
            temperature=TEMP,
            prior_precision=LAMBDA,
            generator=gen,
            **kwargs,
            **extra,
        )

    ref = make_net()
    s_ref = build(ref)
    for t in range(12):
        s_ref.step(make_loss(t))

    first = make_net()
    s_first = build(first)
    for t in range(6):
        s_first.step(make_loss(t))
    blob = io.BytesIO()
    torch.save({"model": first.state_dict(), "sampler": s_first.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)

    resumed = make_net(seed=5)  # different starting values: all must come from the checkpoint
    s_resumed = build(resumed)
    resumed.load_state_dict(saved["model"])
    s_resumed.load_state_dict(saved["sampler"])
    assert s_resumed.num_steps == 6 and s_resumed.buffer.num_pushed == 7
    for t in range(6, 12):
        s_resumed.step(make_loss(t))
    assert_nets_equal(ref, resumed)
    assert torch.equal(s_ref.buffer.data, s_resumed.buffer.data)
    assert torch.equal(s_ref.buffer.stamps, s_resumed.buffer.stamps)
    assert s_resumed.num_steps == 12
    if sampler is SGHMC:
        for p, q in zip(ref.parameters(), resumed.parameters(), strict=True):
            assert torch.equal(
                s_ref.optimizer.state[p]["velocity"], s_resumed.optimizer.state[q]["velocity"]
            )


def test_load_state_dict_rejects_other_layouts() -> None:
    state = run_structured(make_net(), 2, groups="layer", buffer_size=3).state_dict()
    with pytest.raises(ValueError, match="group_ids"):
        run_structured(make_net(), 0, groups="neuron", buffer_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match="buffer"):
        run_structured(make_net(), 0, groups="layer", buffer_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        run_structured(make_net(), 0, groups="layer", buffer_size=3).load_state_dict({})


def test_posterior_averages_over_the_buffered_states() -> None:
    # the buffer's rows are the chain's states of the grouped parameters (here the first
    # layer); the second layer is held fixed at its current value. The posterior is the
    # average of the softmax over the rows, each put into a copy of the network.
    import copy

    net = make_net()
    s = run_structured(net, 5, groups=[["0.weight"], ["0.bias"]], buffer_size=4)
    x = torch.randn(6, 5)
    post = s.posterior(x)
    probs = []
    for row in s.buffer.samples:
        m = copy.deepcopy(net)
        torch.nn.utils.vector_to_parameters(row, [m[0].weight, m[0].bias])
        with torch.no_grad():
            probs.append(torch.softmax(m(x), -1))
    ref = torch.stack(probs)
    torch.testing.assert_close(post.prob_samples, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(post.probs, ref.mean(0), atol=1e-6, rtol=0)
    assert s.num_outputs == 3 and s.batch_shape == torch.Size([])
    x64 = x.double().requires_grad_(True)
    assert s.posterior(x64).probs.dtype == torch.float64
    (grad,) = torch.autograd.grad(s.posterior(x64).probs[:, 0].sum(), x64)
    assert grad.shape == x64.shape
    regression = StructuredSampler(
        make_net(), num_data=N, lr=LR, task="regression", noise_variance=0.5
    )
    noisy = regression.posterior(x, observation_noise=True)
    torch.testing.assert_close(noisy.variance, regression.posterior(x).variance + 0.5)

"""SampleCollector: collection rule, storage, restoration, predictive, serialisation.

Tolerances: the predictive is compared with a hand-built reference that runs the same float32
forward passes on a copy of the model, so values agree to float32 rounding (``1e-6``);
storage and round trips are bitwise.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdl.core.posterior import CategoricalPosterior, SamplePosterior
from bdl.sgmcmc import SGHMC, SGLD, CyclicalSchedule, SampleCollector

N = 64


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)


def make_net(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, 8)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def run(model: nn.Module, collector: SampleCollector, steps: int, schedule=None) -> list:
    """SGHMC loop; returns the parameter vector after every step."""
    x, y = make_data()
    opt = SGHMC(model.parameters(), lr=0.05, num_data=N, prior_precision=1.0)
    states = []
    for k in range(steps):
        idx = torch.arange(k % 4 * 16, k % 4 * 16 + 16)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        collector.update()
        states.append(flat(model))
        if schedule is not None:
            schedule.step()
    return states


@pytest.mark.parametrize(("burn_in", "thin", "steps"), [(0, 1, 7), (5, 3, 20), (10, 4, 9)])
def test_burn_in_and_thinning(burn_in: int, thin: int, steps: int) -> None:
    model = make_net()
    collector = SampleCollector(model, burn_in=burn_in, thin=thin)
    states = run(model, collector, steps)
    kept = [t for t in range(1, steps + 1) if t > burn_in and (t - burn_in) % thin == 0]
    assert len(collector) == len(kept) == max(0, steps - burn_in) // thin
    assert collector.num_steps == steps
    if kept:
        assert torch.equal(collector.samples, torch.stack([states[t - 1] for t in kept]))


def test_fp16_cpu_storage() -> None:
    model = make_net()
    collector = SampleCollector(model, dtype=torch.float16, device="cpu")
    states = run(model, collector, 3)
    s = collector.samples
    assert s.dtype == torch.float16 and s.device.type == "cpu"
    assert s.shape == (3, sum(p.numel() for p in model.parameters()))
    assert torch.equal(s, torch.stack(states).half())
    post = collector.posterior(make_data()[0])
    assert post.probs.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_offloads_to_cpu() -> None:
    model = make_net().cuda()
    collector = SampleCollector(model, dtype=torch.float16, device="cpu")
    collector.update()
    assert collector.samples.device.type == "cpu"
    post = collector.posterior(make_data()[0].cuda())
    assert post.probs.device.type == "cuda"


def test_posterior_restores_model() -> None:
    model = make_net(batchnorm=True)
    collector = SampleCollector(model)
    run(model, collector, 4)
    # move the model away from the last sample so a missing restore would show
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()
    model[2].eval()  # mixed train/eval flags must come back as they were
    before = copy.deepcopy(model.state_dict())
    collector.posterior(make_data()[0])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and model[0].training and not model[2].training


def reference_probs(model: nn.Module, collector: SampleCollector, x: torch.Tensor):
    """Softmax of every stored sample by loading state into a fresh copy of the model."""
    out = []
    for params, buffers in zip(collector.samples, collector.buffer_samples, strict=True):
        m = copy.deepcopy(model)
        torch.nn.utils.vector_to_parameters(params.float(), m.parameters())
        float_buffers = [b for b in m.buffers() if b.is_floating_point()]
        torch.nn.utils.vector_to_parameters(buffers.float(), float_buffers)
        m.eval()
        with torch.no_grad():
            out.append(torch.softmax(m(x), -1))
    return torch.stack(out)


def test_batchnorm_running_stats_per_sample_and_classification_average() -> None:
    model = make_net(batchnorm=True)
    collector = SampleCollector(model, burn_in=2, thin=2)
    bn_stats = []
    x, y = make_data()
    opt = SGLD(model.parameters(), lr=0.05, num_data=N)
    for k in range(10):
        idx = torch.arange(k % 4 * 16, k % 4 * 16 + 16)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if collector.update():
            bn = model[1]
            bn_stats.append(torch.cat([bn.running_mean, bn.running_var]).clone())
    assert len(collector) == 4
    torch.testing.assert_close(collector.buffer_samples, torch.stack(bn_stats), rtol=0, atol=0)
    assert not torch.equal(bn_stats[0], bn_stats[-1])
    post = collector.posterior(x, batch_size=10)
    assert isinstance(post, CategoricalPosterior)
    ref = reference_probs(model, collector, x)
    torch.testing.assert_close(post.prob_samples, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(post.probs, ref.mean(0), rtol=0, atol=1e-6)
    assert post.probs.shape == (N, 3)


def test_regression_mixture_moments() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    collector = SampleCollector(model, task="regression", noise_variance=0.3)
    x = torch.randn(7, 3)
    outs = []
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
            outs.append(model(x))
        collector.update()
    outs = torch.stack(outs)
    post = collector.posterior(x, observation_noise=True)
    assert isinstance(post, SamplePosterior) and post.samples.shape == (5, 7, 2)
    torch.testing.assert_close(post.mean, outs.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(post.variance, outs.var(0, unbiased=False) + 0.3, rtol=0, atol=1e-6)
    latent = collector.posterior(x)
    torch.testing.assert_close(latent.variance, outs.var(0, unbiased=False), rtol=0, atol=1e-6)
    assert collector.num_outputs == 2
    scalar = nn.Linear(3, 1)
    c = SampleCollector(nn.Sequential(scalar, nn.Flatten(0)), task="regression")
    c.update()
    assert c.posterior(x).mean.shape == (7, 1)


def test_ring_buffer_keeps_newest() -> None:
    model = make_net()
    collector = SampleCollector(model, max_samples=3)
    states = run(model, collector, 7)
    assert len(collector) == 3 and collector.num_collected == 7
    assert torch.equal(collector.samples, torch.stack(states[-3:]))


def test_state_dict_round_trip() -> None:
    model = make_net(batchnorm=True)
    collector = SampleCollector(model, burn_in=1, thin=2, dtype=torch.float16)
    run(model, collector, 9)
    buf = io.BytesIO()
    torch.save(collector.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = SampleCollector(model, burn_in=1, thin=2, dtype=torch.float16)
    other.load_state_dict(state)
    assert len(other) == len(collector) == 4
    assert other.num_steps == 9 and other.num_collected == 4
    assert torch.equal(other.samples, collector.samples)
    assert torch.equal(other.buffer_samples, collector.buffer_samples)
    x = make_data()[0]
    assert torch.equal(other.posterior(x).probs, collector.posterior(x).probs)
    other.update()  # step 10: (10 - 1) % 2 != 0
    other.update()  # step 11: kept
    assert len(other) == 5
    with pytest.raises(ValueError, match="samples"):
        SampleCollector(nn.Linear(2, 2)).load_state_dict(state)


def test_cyclical_schedule_collects_only_in_sampling_phase() -> None:
    model = make_net()
    opt = SGHMC(model.parameters(), lr=0.05, num_data=N)
    schedule = CyclicalSchedule(opt, num_steps=20, num_cycles=2, exploration_fraction=0.5)
    collector = SampleCollector(model, thin=2, schedule=schedule)
    x, y = make_data()
    states, kept_steps = [], []
    for k in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sampling = schedule.is_sampling_step()
        if collector.update():
            kept_steps.append(k)
            assert sampling
        states.append(flat(model))
        schedule.step()
    # cycle length 10, sampling phase k mod 10 >= 5, every 2nd step back from the cycle end
    assert kept_steps == [5, 7, 9, 15, 17, 19]
    assert torch.equal(collector.samples, torch.stack([states[k] for k in kept_steps]))


def test_bad_inputs() -> None:
    model = make_net()
    with pytest.raises(ValueError, match="burn_in"):
        SampleCollector(model, burn_in=-1)
    with pytest.raises(ValueError, match="thin"):
        SampleCollector(model, thin=0)
    with pytest.raises(ValueError, match="max_samples"):
        SampleCollector(model, max_samples=0)
    with pytest.raises(ValueError, match="dtype"):
        SampleCollector(model, dtype=torch.int32)
    with pytest.raises(ValueError, match="schedule"):
        SampleCollector(model, schedule="cyclical")
    collector = SampleCollector(model, burn_in=3)
    collector.update()
    with pytest.raises(ValueError, match="no samples"):
        collector.posterior(torch.randn(2, 4))
    collector.collect()
    with pytest.raises(ValueError, match="task"):
        SampleCollector(model, task="ranking")
    collector.task = "ranking"  # a settable attribute, checked by posterior
    with pytest.raises(ValueError, match="task"):
        collector.posterior(torch.randn(2, 4))
    collector.task = "classification"
    with pytest.raises(ValueError, match="batch_size"):
        collector.posterior(torch.randn(2, 4), batch_size=0)
    with pytest.raises(ValueError, match="noise_variance"):
        SampleCollector(model, noise_variance=1.0)
    with pytest.raises(TypeError):
        collector.posterior(torch.randn(2, 4), True)  # keyword-only options
    with pytest.raises(ValueError, match="log_noise_std"):
        SampleCollector(model, task="regression", log_noise_std="nope")
    with pytest.raises(ValueError, match="at most one"):
        SampleCollector(model, task="regression", noise_variance=1.0, log_noise_std="0.bias")
    regression = SampleCollector(model, task="regression")
    regression.collect()
    with pytest.raises(ValueError, match="observation_noise"):
        regression.posterior(torch.randn(2, 4), observation_noise=True)
    with pytest.raises(ValueError, match="num_outputs"):
        _ = SampleCollector(nn.Sequential(nn.Conv1d(1, 1, 1)), task="regression").num_outputs


class NoisyNet(nn.Module):
    """Mean network and a sampled per-output log noise sd."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.log_std = nn.Parameter(torch.tensor([-1.0, 0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_per_sample_noise_from_a_sampled_parameter() -> None:
    model = NoisyNet()
    collector = SampleCollector(model, task="regression", log_noise_std="log_std")
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        collector.update()
    x = make_data()[0][:5]
    latent, noisy = collector.posterior(x), collector.posterior(x, observation_noise=True)
    log_std = collector.named_samples()["log_std"]  # (S, 2)
    assert log_std.shape == (4, 2)
    torch.testing.assert_close(
        noisy.variance - latent.variance, (2 * log_std).exp().mean(0).expand(5, 2)
    )
    torch.testing.assert_close(noisy.noise_variance, (2 * log_std).exp()[:, None].expand(4, 5, 2))
    assert collector.num_outputs == 2


def test_posterior_follows_the_input_dtype_and_is_differentiable() -> None:
    # a float32 chain answers float64 inputs in float64 (its samples cast, not the model's
    # parameters), batched inputs (b, q, d) keep their batch shape, and gradients reach X
    model = make_net()
    collector = SampleCollector(model)
    run(model, collector, 3)
    params = [p.detach().clone() for p in model.parameters()]
    X = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    post = collector.posterior(X)
    assert post.probs.dtype == torch.float64 and post.probs.shape == (2, 3, 3)
    assert post.prob_samples.shape == (3, 2, 3, 3)
    (grad,) = torch.autograd.grad(post.probs[..., 0].sum(), X)
    assert grad.shape == X.shape and bool(grad.abs().sum() > 0)
    flat = collector.posterior(X.detach().reshape(6, 4).float())
    torch.testing.assert_close(flat.probs.double(), post.probs.detach().reshape(6, 3))
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters(), strict=True))
    assert collector.posterior(X, joint=True).probs.shape == (2, 3, 3)  # joint: the same mixture
    bn = make_net(batchnorm=True)  # float buffers are cast with the parameters
    with_bn = SampleCollector(bn)
    run(bn, with_bn, 3)
    x64 = make_data()[0].double()
    ref = reference_probs(bn, with_bn, x64.float()).double().mean(0)
    torch.testing.assert_close(with_bn.posterior(x64).probs, ref, rtol=0, atol=1e-6)

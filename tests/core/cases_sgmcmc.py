"""SG-MCMC cases of the contract suite: collectors, the structured sampler, the estimators."""

from __future__ import annotations

import torch
from cases import D, EstimatorCase, ModelCase, classification_data, regression_data
from torch import nn

from bdl.core.posterior import SamplePosterior
from bdl.sgmcmc import (
    SGHMC,
    SampleCollector,
    SGMCMCClassifier,
    SGMCMCRegressor,
    StructuredSampler,
)

STEPS = 6


class NoisyMLP(nn.Module):
    """Tanh MLP (smooth in X, for the finite-difference check) and a sampled log noise sd."""

    def __init__(self, out: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, out))
        self.log_noise_std = nn.Parameter(torch.full((out,), -1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _mlp(dtype: torch.dtype, out: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, out)).to(dtype)


def _noisy(dtype: torch.dtype) -> NoisyMLP:
    torch.manual_seed(0)
    return NoisyMLP().to(dtype)


def _gaussian_nll(model: NoisyMLP, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    s = model.log_noise_std
    return (0.5 * (y[:, None] - model(x)).pow(2) * torch.exp(-2 * s) + s).sum(-1).mean()


def _chain(collector: SampleCollector, loss, x: torch.Tensor, y: torch.Tensor):
    """A few SGHMC steps on fixed minibatches, every state collected."""
    model = collector.model
    opt = SGHMC(
        model.parameters(), lr=0.05, num_data=len(x), prior_precision=1.0,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    for k in range(STEPS):
        idx = torch.arange(k % 4 * 10, k % 4 * 10 + 10)
        opt.zero_grad()
        loss(model, x[idx], y[idx]).backward()
        opt.step()
        collector.update()
    return collector


def _regression_collector(dtype: torch.dtype) -> SampleCollector:
    return SampleCollector(_noisy(dtype), task="regression", log_noise_std="log_noise_std")


def _build_regression_collector(dtype: torch.dtype) -> SampleCollector:
    x, y = regression_data(dtype=dtype)
    return _chain(_regression_collector(dtype), _gaussian_nll, x, y)


def _classification_collector(dtype: torch.dtype) -> SampleCollector:
    return SampleCollector(_mlp(dtype, 3))


def _build_classification_collector(dtype: torch.dtype) -> SampleCollector:
    x, y = classification_data()
    loss = lambda m, xb, yb: nn.functional.cross_entropy(m(xb), yb)  # noqa: E731
    return _chain(_classification_collector(dtype), loss, x.to(dtype), y)


def _structured(dtype: torch.dtype) -> StructuredSampler:
    return StructuredSampler(
        _mlp(dtype, 1), "layer", num_data=40, lr=0.01, prior_precision=1.0, buffer_size=8,
        generator=torch.Generator().manual_seed(2), task="regression", noise_variance=0.01,
    )  # fmt: skip


def _build_structured(dtype: torch.dtype) -> StructuredSampler:
    sampler = _structured(dtype)
    x, y = regression_data(dtype=dtype)
    for k in range(STEPS):
        idx = torch.arange(k % 4 * 10, k % 4 * 10 + 10)
        sampler.step(lambda m, i=idx: (m(x[i])[:, 0] - y[i]).pow(2).mean())
    return sampler


def _collector_noise(collector: SampleCollector) -> torch.Tensor:
    """The mean over samples of each sample's noise variance ``exp(2 log_noise_std)``."""
    return (2 * collector.named_samples()["log_noise_std"]).exp().mean(0)


# a sample posterior's draws are whole functions (joint across points); the joint check
# needs SamplePosterior.covariance_matrix
_JOINT = hasattr(SamplePosterior, "covariance_matrix")

MODEL_CASES = [
    ModelCase(
        "SampleCollector-regression",
        build=_build_regression_collector,
        fresh=_regression_collector,
        noise=_collector_noise,
        joint=_JOINT,
    ),
    ModelCase(
        "SampleCollector-classification",
        build=_build_classification_collector,
        fresh=_classification_collector,
        joint=False,
        categorical=True,
    ),
    ModelCase(
        "StructuredSampler",
        build=_build_structured,
        fresh=_structured,
        noise=lambda sampler: torch.tensor(0.01, dtype=torch.float64),
        joint=_JOINT,
    ),
]

_TINY = dict(
    hidden_sizes=(8,), epochs=4, batch_size=8, n_cycles=2, samples_per_cycle=2, random_state=0
)

ESTIMATOR_CASES = [
    EstimatorCase("SGMCMCRegressor", make=lambda: SGMCMCRegressor(**_TINY)),
    EstimatorCase(
        "SGMCMCClassifier", make=lambda: SGMCMCClassifier(**_TINY), task="classification"
    ),
]

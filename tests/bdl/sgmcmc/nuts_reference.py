r"""NUTS reference posterior predictive of a small Bayesian neural network (shared test helper).

The model, identical in :func:`build_net` (for the SG-MCMC samplers) and :func:`pyro_model`
(for Pyro's NUTS), is a 1-D regression network with one hidden layer of ``H`` tanh units,

.. math::

    f_\theta(x) = w_2^\top \tanh(W_1 x + b_1) + b_2, \qquad
    y_i \sim \mathcal N(f_\theta(x_i), \sigma^2), \qquad
    \theta \sim \mathcal N(0, \lambda^{-1} I),

with fixed, known noise :math:`\sigma` and prior precision :math:`\lambda` on every weight and
bias. The potential is :math:`U(\theta) = \sum_i (y_i - f_\theta(x_i))^2 / (2\sigma^2) +
\lambda \lVert\theta\rVert^2 / 2`, i.e. ``num_data = N`` times the mean minibatch loss
:func:`mean_loss` plus the ``prior_precision`` term of :mod:`bdl.sgmcmc` at temperature 1.

:func:`generate` runs NUTS on it (several independent chains) and returns the predictive
mean and variance of the latent :math:`f(x_*)` at the test inputs together with their Monte
Carlo standard errors (from the multi-chain effective sample size) and split-:math:`\hat R`;
the predictive of an observation adds :math:`\sigma^2` to the variance. The result is saved
in ``data/nuts_bnn_reference.npz`` (written by running this module as a script) with the
training data and every setting, and read back with :func:`load_reference`.

Run:  python tests/bdl/sgmcmc/nuts_reference.py [WORKERS]   (minutes; one process per chain)
"""

from __future__ import annotations

import math
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS
from torch import Tensor, nn

from bdl.sgmcmc import effective_sample_size, rhat

REFERENCE_PATH = Path(__file__).resolve().parent / "data" / "nuts_bnn_reference.npz"

#: Settings of the reference problem and of the NUTS run that produced the committed file.
SETTINGS = {
    "num_data": 24,
    "hidden": 10,
    "noise_std": 0.5,
    "prior_precision": 1.0,
    "num_test": 20,
    "data_seed": 0,
    "num_chains": 4,
    "warmup_steps": 300,
    "num_samples": 400,
    "max_tree_depth": 6,
    "nuts_seed": 1,
}


def make_data(num_data: int, noise_std: float, num_test: int, seed: int) -> dict[str, Tensor]:
    """Two clusters of inputs with a gap (so the predictive variance varies), float64.

    Returns ``x_train (N, 1)``, ``y_train (N,)`` with ``y = sin(1.5 x) + sigma eps`` and
    ``x_test (num_test, 1)`` on a grid over ``[-4, 4]`` (inside, between and beyond the
    clusters).
    """
    g = torch.Generator().manual_seed(seed)
    half = num_data // 2
    left = -3.0 + 2.0 * torch.rand(half, generator=g, dtype=torch.float64)
    right = 0.5 + 2.0 * torch.rand(num_data - half, generator=g, dtype=torch.float64)
    x = torch.cat([left, right]).unsqueeze(-1)
    y = torch.sin(1.5 * x[:, 0]) + noise_std * torch.randn(num_data, generator=g, dtype=x.dtype)
    x_test = torch.linspace(-4.0, 4.0, num_test, dtype=torch.float64).unsqueeze(-1)
    return {"x_train": x, "y_train": y, "x_test": x_test}


def build_net(hidden: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    """``Linear(1, H) -> tanh -> Linear(H, 1)``; returns outputs of shape ``(n, 1)``."""
    return nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1)).to(dtype)


def mean_loss(pred: Tensor, y: Tensor, noise_std: float) -> Tensor:
    """Mean Gaussian negative log-likelihood of a minibatch, up to its constant.

    ``pred (B, 1)`` or ``(B,)``, ``y (B,)``; ``sum_i (y_i - f_i)^2 / (2 sigma^2) / B``.
    """
    return 0.5 * ((pred.reshape(y.shape) - y) ** 2).mean() / noise_std**2


def pyro_model(x: Tensor, y: Tensor, hidden: int, noise_std: float, prior_precision: float):
    """The same BNN as a Pyro model (weights named after :func:`build_net`'s parameters)."""
    scale = torch.tensor(prior_precision, dtype=x.dtype) ** -0.5
    w1 = pyro.sample("w1", dist.Normal(0.0, scale).expand([hidden, 1]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, scale).expand([hidden]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(0.0, scale).expand([1, hidden]).to_event(2))
    b2 = pyro.sample("b2", dist.Normal(0.0, scale).expand([1]).to_event(1))
    f = latent(x, w1, b1, w2, b2)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(f, noise_std), obs=y)


def latent(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """``f(x)`` for weights with optional leading sample dims: ``x (n, 1)`` -> ``(..., n)``."""
    hidden = torch.tanh(x @ w1.transpose(-1, -2) + b1.unsqueeze(-2))  # (..., n, H)
    return (hidden @ w2.transpose(-1, -2)).squeeze(-1) + b2  # (..., n)


def moments_with_errors(f: Tensor) -> dict[str, np.ndarray]:
    """Predictive mean and variance of ``f (C, S, n)`` draws, with MC standard errors and R-hat.

    The standard error of the mean is ``sqrt(var / ESS(f))``; that of the variance is
    ``sqrt(var((f - mean)^2) / ESS((f - mean)^2))`` (the variance is the mean of the squared
    deviations). ESS is the multi-chain estimate of :func:`bdl.sgmcmc.effective_sample_size`.
    """
    pooled = f.reshape(-1, f.shape[-1])
    mean, var = pooled.mean(0), pooled.var(0)
    dev2 = (f - mean) ** 2
    ess_mean = effective_sample_size(f, multichain=True)
    ess_var = effective_sample_size(dev2, multichain=True)
    return {
        "mean": mean.numpy(),
        "var": var.numpy(),
        "mean_se": (var / ess_mean).sqrt().numpy(),
        "var_se": (dev2.reshape(-1, f.shape[-1]).var(0) / ess_var).sqrt().numpy(),
        "ess_mean": ess_mean.numpy(),
        "ess_var": ess_var.numpy(),
        # split-R-hat needs >= 2 chains; NaN for a single chain
        "rhat": rhat(f).numpy() if f.shape[0] > 1 else np.full(f.shape[-1], np.nan),
    }


def run_chain(settings: dict[str, float], seed: int) -> np.ndarray:
    """One NUTS chain on the reference BNN; draws of ``f(x_test)``, shape ``(S, n_test)``.

    NUTS (Hoffman & Gelman 2014) with a diagonal mass matrix and step size adapted during
    ``warmup_steps``; trees are capped at ``max_tree_depth`` (a cap keeps NUTS exact, it only
    shortens the trajectories).
    """
    torch.set_num_threads(1)
    s = settings
    data = make_data(s["num_data"], s["noise_std"], s["num_test"], s["data_seed"])
    pyro.set_rng_seed(seed)
    kernel = NUTS(pyro_model, target_accept_prob=0.8, max_tree_depth=s["max_tree_depth"])
    mcmc = MCMC(
        kernel,
        num_samples=s["num_samples"],
        warmup_steps=s["warmup_steps"],
        disable_progbar=True,
    )
    mcmc.run(data["x_train"], data["y_train"], s["hidden"], s["noise_std"], s["prior_precision"])
    w = mcmc.get_samples()
    return latent(data["x_test"], w["w1"], w["b1"], w["w2"], w["b2"]).numpy()


def generate(workers: int = 1, **overrides: int) -> dict[str, np.ndarray]:
    """Run NUTS on the reference BNN and return everything :func:`save_reference` stores.

    Chain ``c`` is an independent run seeded ``nuts_seed + c``; with ``workers > 1`` the
    chains run in that many processes (the result does not depend on ``workers``).
    ``overrides`` replace entries of :data:`SETTINGS` (e.g. ``nuts_seed=7``).
    """
    unknown = set(overrides) - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}")
    s = {**SETTINGS, **overrides}
    seeds = [s["nuts_seed"] + c for c in range(s["num_chains"])]
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            chains = list(pool.map(run_chain, [s] * len(seeds), seeds))
    else:
        chains = [run_chain(s, seed) for seed in seeds]
    f = torch.as_tensor(np.stack(chains))  # (C, S, n_test)
    out = moments_with_errors(f)
    data = make_data(s["num_data"], s["noise_std"], s["num_test"], s["data_seed"])
    out.update({k: v.numpy() for k, v in data.items()})
    out.update({f"setting_{k}": np.asarray(v) for k, v in s.items()})
    return out


def save_reference(result: dict[str, np.ndarray], path: Path = REFERENCE_PATH) -> None:
    """Write ``result`` as a compressed ``.npz`` (float64 arrays; a few KB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **result)


def load_reference(path: Path = REFERENCE_PATH) -> dict[str, np.ndarray]:
    """Read the committed reference (arrays; ``setting_*`` entries are 0-d arrays)."""
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def settings_of(reference: dict[str, np.ndarray]) -> dict[str, float]:
    """The ``setting_*`` entries of a loaded reference as plain Python numbers."""
    return {
        k[len("setting_") :]: v.item() for k, v in reference.items() if k.startswith("setting_")
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    result = generate(workers=int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    save_reference(result)
    worst = float(np.max(result["rhat"]))
    print(f"saved {REFERENCE_PATH} ({REFERENCE_PATH.stat().st_size} bytes)")
    print(
        f"max R-hat {worst:.4f}, min ESS mean {result['ess_mean'].min():.0f}, "
        f"min ESS var {result['ess_var'].min():.0f}"
    )
    print("mean", np.round(result["mean"], 3))
    print("var ", np.round(result["var"], 4))
    if not math.isfinite(worst) or worst > 1.01:
        raise SystemExit(f"R-hat {worst:.4f} > 1.01: run more or longer chains")

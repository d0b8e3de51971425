"""Cost of one exact GP log marginal likelihood + gradient: ExactGP vs gpytorch vs lean torch.

Protocol: ``ScaleKernel(MaternKernel(nu=1.5))``
with Gaussian noise, lengthscale 0.5, outputscale 1.3, noise 0.05; 1-D inputs uniform on
``[0, n / 100]`` (about 100 points per unit length), ``y = sin(2 pi x) + N(0, 0.05)``; float64;
one thread. One evaluation = value + gradient with respect to the raw lengthscale, outputscale
and noise (and the constant mean where the method has one), timed for

- ``ours``: :class:`gp.ExactGP` (Cholesky + ``cholesky_inverse``, analytic gradient);
- ``gpytorch``: ``gpytorch.models.ExactGP`` + ``ExactMarginalLogLikelihood`` with Cholesky
  forced (``gpytorch.settings.max_cholesky_size(10**9)``), value rescaled to the full sum;
- ``lean``: plain torch, ``K = kernel(X) + noise I``, ``torch.linalg.cholesky``,
  ``cholesky_solve``, and ``dL/dK = (alpha alpha^T - cholesky_inverse(L)) / 2`` pushed through
  the kernel by ``K.backward(dL/dK)``.

The three are run alternately (one warm-up each, then ``--reps`` rounds); the table gives
median seconds and ratios to ``lean``, and the largest disagreement of the LML values.

Usage: ``python benchmarks/bench_exact_gp.py [--sizes 1000 2000 3000 5000] [--reps 3]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import gpytorch
import torch
from gpytorch.kernels import MaternKernel, ScaleKernel

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gp import ExactGP  # noqa: E402

DT = torch.float64
LENGTHSCALE, OUTPUTSCALE, NOISE = 0.5, 1.3, 0.05


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.sort(torch.rand(n, generator=g, dtype=DT) * n / 100).values
    y = torch.sin(2 * math.pi * x) + math.sqrt(NOISE) * torch.randn(n, generator=g, dtype=DT)
    return x.unsqueeze(-1), y


def _kernel() -> ScaleKernel:
    k = ScaleKernel(MaternKernel(nu=1.5)).to(DT)
    with torch.no_grad():
        k.base_kernel.lengthscale = torch.tensor(LENGTHSCALE, dtype=DT)
        k.outputscale = torch.tensor(OUTPUTSCALE, dtype=DT)
    return k


def make_ours(X: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    model = ExactGP(_kernel(), noise=torch.tensor(NOISE, dtype=DT), mean="zero").to(DT)

    def once() -> float:
        model.zero_grad(set_to_none=True)
        lml = model.log_marginal_likelihood(X, y)
        lml.backward()
        return lml.item()

    return once


class _GPyTorchModel(gpytorch.models.ExactGP):
    def __init__(self, X: torch.Tensor, y: torch.Tensor, lik: gpytorch.likelihoods.Likelihood):
        super().__init__(X, y, lik)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = _kernel()

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def make_gpytorch(X: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    lik = gpytorch.likelihoods.GaussianLikelihood().to(DT)
    lik.noise = torch.tensor(NOISE, dtype=DT)
    model = _GPyTorchModel(X, y, lik).to(DT)
    model.train()
    lik.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    n = X.shape[0]

    def once() -> float:
        model.zero_grad(set_to_none=True)
        with gpytorch.settings.max_cholesky_size(10**9):
            value = mll(model(X), y) * n  # gpytorch returns the mean over points
            value.backward()
        return value.item()

    return once


def make_lean(X: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    kernel = _kernel()
    raw_noise = torch.tensor(math.log(math.expm1(NOISE)), dtype=DT, requires_grad=True)
    n = X.shape[0]
    eye = torch.eye(n, dtype=DT)

    def once() -> float:
        kernel.zero_grad(set_to_none=True)
        raw_noise.grad = None
        K = kernel(X).to_dense() + torch.nn.functional.softplus(raw_noise) * eye
        with torch.no_grad():
            L = torch.linalg.cholesky(K)
            alpha = torch.cholesky_solve(y.unsqueeze(-1), L)
            lml = -0.5 * (y @ alpha.squeeze(-1)) - L.diagonal().log().sum()
            lml = lml - 0.5 * n * math.log(2 * math.pi)
            grad_K = torch.cholesky_inverse(L).mul_(-0.5).add_(0.5 * alpha @ alpha.T)
        K.backward(grad_K)
        return lml.item()

    return once


METHODS = {"ours": make_ours, "gpytorch": make_gpytorch, "lean": make_lean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 3000])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, gpytorch {gpytorch.__version__}, 1 thread, float64")
    print(
        "| n | ours s | gpytorch (Cholesky) s | lean s | ours/lean | gpytorch/lean | max |dLML| |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        X, y = _data(n)
        runs = {name: make(X, y) for name, make in METHODS.items()}
        values = {name: run() for name, run in runs.items()}  # warm-up, and the values
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.reps):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        spread = max(values.values()) - min(values.values())
        print(
            f"| {n} | {med['ours']:.3f} | {med['gpytorch']:.3f} | {med['lean']:.3f} | "
            f"{med['ours'] / med['lean']:.2f} | {med['gpytorch'] / med['lean']:.2f} | "
            f"{spread:.1e} (LML {values['ours']:.6f}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()

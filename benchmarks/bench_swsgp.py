"""Sparse-within-sparse GP (SWSGP, M = 16,384, H = 32) against gpytorch's SVGP (M = 256).

Protocol: 3-D synthetic ``f = sin(3 x1) + cos(2 x2) x3 + 0.5 x1 x2``, noise sd 0.1,
``x ~ U[-1, 1]^3``, n = 100,000 train / 10,000 test, float32, batch 1,024, two epochs, one thread.

- gpytorch: ``ApproximateGP`` + ``VariationalStrategy`` (whitened) +
  ``CholeskyVariationalDistribution``, constant mean, ``ScaleKernel(RBFKernel())``, Gaussian
  likelihood, ``VariationalELBO``, Adam lr 0.01, inducing inputs learned (256 training inputs).
- ours: :class:`gp.sparse.swsgp.SWSGP`, ``ScaleKernel(RBFKernel())``, ``q(u)`` diagonal plus
  rank 4, its default optimiser (Adam lr 0.05), 16,384 training inputs as ``Z``; one row with
  ``Z`` fixed and one with ``Z`` learned (both recompute the neighbours at every step).

All models are trained in lock step on the same minibatches; every iteration (zero_grad,
forward, backward, Adam step) is timed on its own, and the model that goes first rotates from
step to step, so load on the machine hits all sides alike. The table gives median seconds per
iteration, the ratio of medians to gpytorch's (same run), test NLL (observation noise
included; in units of y) and the learned noise sd (truth 0.1).

Usage: ``python benchmarks/bench_swsgp.py [--quick] [--epochs 2] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import gpytorch
import torch
from gpytorch.kernels import RBFKernel, ScaleKernel

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bdl import metrics  # noqa: E402
from gp.sparse.swsgp import SWSGP  # noqa: E402

TARGET_RATIO = 1.5


def one_thread() -> str:
    torch.set_num_threads(1)
    return f"torch {torch.__version__}, gpytorch {gpytorch.__version__}, 1 thread"


def make_data(n_train: int, n_test: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n_train + n_test, 3, generator=gen) * 2 - 1
    f = torch.sin(3 * X[:, 0]) + torch.cos(2 * X[:, 1]) * X[:, 2] + 0.5 * X[:, 0] * X[:, 1]
    y = f + 0.1 * torch.randn(n_train + n_test, generator=gen)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


class GpytorchSVGP(gpytorch.models.ApproximateGP):
    def __init__(self, Z: torch.Tensor) -> None:
        dist = gpytorch.variational.CholeskyVariationalDistribution(Z.shape[0])
        strategy = gpytorch.variational.VariationalStrategy(
            self, Z, dist, learn_inducing_locations=True
        )
        super().__init__(strategy)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = ScaleKernel(RBFKernel())

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class Side:
    """One model with a ``step(xb, yb)`` closure, ``nll(X, y)`` and ``noise_sd()``."""

    def __init__(self, name: str, step, predict, noise_sd) -> None:
        self.name, self.step, self.predict, self.noise_sd = name, step, predict, noise_sd
        self.times: list[float] = []


def gpytorch_side(Z: torch.Tensor, n: int) -> Side:
    model = GpytorchSVGP(Z.clone())
    lik = gpytorch.likelihoods.GaussianLikelihood()
    mll = gpytorch.mlls.VariationalELBO(lik, model, num_data=n)
    opt = torch.optim.Adam(list(model.parameters()) + list(lik.parameters()), lr=0.01)
    model.train()
    lik.train()

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        (-mll(model(xb), yb)).backward()
        opt.step()

    @torch.no_grad()
    def predict(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model.eval()
        lik.eval()
        means, variances = [], []
        for start in range(0, X.shape[0], 4096):
            pred = lik(model(X[start : start + 4096]))
            means.append(pred.mean)
            variances.append(pred.variance)
        return torch.cat(means), torch.cat(variances)

    return Side("gpytorch SVGP M=256", step, predict, lambda: lik.noise.sqrt().item())


def swsgp_side(Z: torch.Tensor, n: int, learn_z: bool, M: int, H: int) -> Side:
    model = SWSGP(
        ScaleKernel(RBFKernel()),
        Z.clone(),
        num_neighbors=H,
        rank=4,
        learn_inducing_locations=learn_z,
    )
    opt = model.make_optimizer()
    model.train()

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        (-model.elbo(xb, yb, n)).backward()
        opt.step()

    @torch.no_grad()
    def predict(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model.eval()
        post = model.posterior(X, observation_noise=True)
        return post.mean.squeeze(-1), post.variance.squeeze(-1)

    label = f"SWSGP M={M} H={H} r=4, Z {'learned' if learn_z else 'fixed'}"
    return Side(label, step, predict, lambda: model.likelihood.noise.sqrt().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 10,000, M = 4,096, 1 epoch")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(one_thread())
    n_train, n_test, M, epochs = 100_000, 10_000, 16_384, 2
    if args.quick:
        n_train, n_test, M, epochs = 10_000, 2_000, 4_096, 1
    epochs = args.epochs or epochs
    H, batch = 32, 1024
    X, y, Xt, yt = make_data(n_train, n_test, args.seed)
    torch.manual_seed(args.seed)
    perm = torch.randperm(n_train)
    sides = [
        gpytorch_side(X[perm[:256]], n_train),
        swsgp_side(X[perm[:M]], n_train, learn_z=False, M=M, H=H),
        swsgp_side(X[perm[:M]], n_train, learn_z=True, M=M, H=H),
    ]
    gen = torch.Generator().manual_seed(args.seed + 1)
    steps = 0
    t_start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n_train, generator=gen)
        for start in range(0, n_train, batch):
            idx = order[start : start + batch]
            xb, yb = X[idx], y[idx]
            shift = steps % len(sides)
            for side in sides[shift:] + sides[:shift]:
                t0 = time.perf_counter()
                side.step(xb, yb)
                side.times.append(time.perf_counter() - t0)
            steps += 1
    wall = time.perf_counter() - t_start
    base = statistics.median(sides[0].times)
    header = ["model", "s/iter (median)", "ratio to gpytorch", "test NLL", "RMSE", "noise sd"]
    rows = []
    for side in sides:
        mean, var = side.predict(Xt)
        nll = float(metrics.gaussian_nll(mean.double(), var.double(), yt.double()))
        rmse = float((mean - yt).pow(2).mean().sqrt())
        med = statistics.median(side.times)
        rows.append(
            [
                side.name,
                f"{med:.4f}",
                f"{med / base:.2f}",
                f"{nll:.3f}",
                f"{rmse:.3f}",
                f"{side.noise_sd():.3f}",
            ]  # fmt: skip
        )
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
    ]
    print(
        f"n = {n_train:,} / {n_test:,}, batch {batch}, {epochs} epoch(s), {steps} iterations "
        f"per model, lock-step wall time {wall:.1f} s"
    )
    print("\n".join(lines))
    print(f"target: SWSGP s/iter <= {TARGET_RATIO} x gpytorch, test NLL below gpytorch's")
    print(f"Bayes-optimal test NLL ~ {0.5 * math.log(2 * math.pi * 0.01) + 0.5:.3f}")


if __name__ == "__main__":
    main()

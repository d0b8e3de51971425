"""SVGP: per-iteration cost of ``gp.SVGP`` vs gpytorch's own SVGP, and fit quality with defaults.

Protocol: 3-D synthetic data ``f = sin(3 x1) + cos(2 x2) x3 + 0.5 x1 x2``, noise sd 0.1,
``x ~ U[-1, 1]^3``, n = 100,000 train / 10,000 test (seed 0), float32, batch 1,024, two
epochs, one thread, M = 256.

1. **Step time.** One training step (ELBO of one minibatch, backward, optimiser step) of

   - ``ours``: :class:`gp.SVGP` (whitened ``VariationalStrategy``, our lean objective);
   - ``gpytorch``: the gpytorch SVGP tutorial model (``ApproximateGP`` + whitened
     ``VariationalStrategy``, ``VariationalELBO``);

   both with ``ScaleKernel(RBFKernel(ard_num_dims=3))``, a constant mean, learned inducing
   inputs (the same random subset of X) and the same optimiser: Adam lr 0.01 on everything
   (``CholeskyVariationalDistribution``), then NGD lr 0.1 for q(u)
   (``NaturalVariationalDistribution``) + Adam lr 0.01 for the rest. The two sides run
   alternately (``interleaved_timing``, one warm-up each); medians and the ratio come from
   the same run. Both the process CPU time (``time.process_time``; robust on a shared
   machine, since one thread is used) and the wall time are reported.
2. **Quality after two epochs.** ``ours``: ``SVGP.from_data(X, y, 256).fit((X, y),
   epochs=2, batch_size=1024, seed=0)`` (k-means++ inducing inputs, data-scaled initial
   values, NGD + Adam, all defaults); ``gpytorch``: the tutorial model from gpytorch's
   default initial values with Adam lr 0.01 on everything, and with NGD lr 0.1 + Adam lr
   0.01. Reported: test NLL and RMSE of ``y`` (predictive with noise) and the learned noise
   sd (truth 0.1; Bayes-optimal NLL ``0.5 log(2 pi 0.01) + 0.5 = -0.884``).

Usage: ``python benchmarks/bench_svgp.py [--quick] [--rounds 9] [--steps 20]``.
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

from benchmarks._common import one_thread  # noqa: E402
from gp import SVGP  # noqa: E402

DT = torch.float32
NOISE_SD = 0.1
M = 256
BATCH = 1024


def make_data(n_train: int, n_test: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The protocol's synthetic data set (float32)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n_train + n_test, 3, generator=g, dtype=torch.float64) * 2 - 1
    x1, x2, x3 = X.unbind(-1)
    f = torch.sin(3 * x1) + torch.cos(2 * x2) * x3 + 0.5 * x1 * x2
    y = f + NOISE_SD * torch.randn(f.shape, generator=g, dtype=torch.float64)
    X, y = X.to(DT), y.to(DT)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def _kernel() -> ScaleKernel:
    return ScaleKernel(RBFKernel(ard_num_dims=3))


class TutorialSVGP(gpytorch.models.ApproximateGP):
    """gpytorch's SVGP tutorial model (whitened VariationalStrategy, learned inducing inputs)."""

    def __init__(self, Z: torch.Tensor, natural: bool) -> None:
        dist_cls = (
            gpytorch.variational.NaturalVariationalDistribution
            if natural
            else gpytorch.variational.CholeskyVariationalDistribution
        )
        strategy = gpytorch.variational.VariationalStrategy(
            self, Z, dist_cls(Z.shape[-2]), learn_inducing_locations=True
        )
        super().__init__(strategy)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = _kernel()

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class GPyTorchRun:
    """gpytorch tutorial model + likelihood + optimisers; ``step(x, y)`` is one iteration."""

    def __init__(self, Z: torch.Tensor, n: int, natural: bool, lr: float = 0.01) -> None:
        self.model = TutorialSVGP(Z, natural)
        self.lik = gpytorch.likelihoods.GaussianLikelihood()
        self.mll = gpytorch.mlls.VariationalELBO(self.lik, self.model, num_data=n)
        self.model.train()
        self.lik.train()
        var_params = list(self.model.variational_parameters())
        ids = {id(p) for p in var_params}
        hyper = [p for p in self.model.parameters() if id(p) not in ids]
        hyper += list(self.lik.parameters())
        self.opts: list[torch.optim.Optimizer] = []
        if natural:
            self.opts.append(gpytorch.optim.NGD(var_params, num_data=n, lr=0.1))
            self.opts.append(torch.optim.Adam(hyper, lr=lr))
        else:
            self.opts.append(torch.optim.Adam(var_params + hyper, lr=lr))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        loss = -self.mll(self.model(x), y)
        loss.backward()
        for opt in self.opts:
            opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def predict(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.eval()
        self.lik.eval()
        means, variances = [], []
        for xb in X.split(2048):
            pred = self.lik(self.model(xb))
            means.append(pred.mean)
            variances.append(pred.variance)
        self.model.train()
        self.lik.train()
        return torch.cat(means), torch.cat(variances)

    @property
    def noise_sd(self) -> float:
        return float(self.lik.noise.detach().sqrt())


class OursRun:
    """:class:`gp.SVGP` with the same optimisers; ``step(x, y)`` is one iteration."""

    def __init__(self, Z: torch.Tensor, n: int, natural: bool, lr: float = 0.01) -> None:
        self.model = SVGP(_kernel(), Z, natural_gradients=natural)
        self.n = n
        self.opts: list[torch.optim.Optimizer] = []
        if natural:
            self.opts.append(
                gpytorch.optim.NGD(self.model.variational_parameters(), num_data=n, lr=0.1)
            )
            self.opts.append(torch.optim.Adam(self.model.hyperparameters(), lr=lr))
        else:
            self.opts.append(torch.optim.Adam(self.model.parameters(), lr=lr))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        loss = -self.model.elbo(x, y, self.n)  # the per-datum ELBO
        loss.backward()
        for opt in self.opts:
            opt.step()
        return float(loss.detach())


def _batches(X: torch.Tensor, y: torch.Tensor, seed: int):
    """Endless minibatches of the protocol size (a fresh permutation per epoch)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(X.shape[0], generator=g)
        for start in range(0, X.shape[0] - BATCH + 1, BATCH):
            idx = order[start : start + BATCH]
            yield X[idx], y[idx]


def time_steps(
    X, y, natural: bool, rounds: int, steps: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Median seconds per step of ours and gpytorch (alternating rounds, same Z and batches):
    ``((ours, gpytorch) process CPU time, (ours, gpytorch) wall time)``."""
    Z = X[torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(1))[:M]]
    ours, theirs = OursRun(Z, X.shape[0], natural), GPyTorchRun(Z, X.shape[0], natural)
    b_ours, b_theirs = _batches(X, y, 0), _batches(X, y, 0)
    sides = [
        (lambda: ours.step(*next(b_ours)), [], []),
        (lambda: theirs.step(*next(b_theirs)), [], []),
    ]
    for _ in range(2):  # warm-up
        for step, _, _ in sides:
            step()
    for r in range(rounds):
        for step, cpu, wall in sides if r % 2 == 0 else sides[::-1]:
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(steps):
                step()
            cpu.append((time.process_time() - c0) / steps)
            wall.append((time.perf_counter() - w0) / steps)
    med = [(statistics.median(cpu), statistics.median(wall)) for _, cpu, wall in sides]
    return (med[0][0], med[1][0]), (med[0][1], med[1][1])


def _nll_rmse(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    mean, var, y = mean.double(), var.double(), y.double()
    nll = 0.5 * (math.log(2 * math.pi) + var.log() + (y - mean).square() / var)
    return float(nll.mean()), float((y - mean).square().mean().sqrt())


def quality(X, y, Xt, yt, epochs: int) -> list[tuple[str, float, float, float, float, float]]:
    """(name, init seconds, fit seconds, test NLL, test RMSE, noise sd) after ``epochs``."""
    rows = []
    t0 = time.perf_counter()
    model = SVGP.from_data(X, y, M)
    init_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.fit((X, y), epochs=epochs, batch_size=BATCH, seed=0)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        post = model.posterior(Xt, observation_noise=True)
        noise_sd = float(model.noise.sqrt())
    nll, rmse = _nll_rmse(post.mean.squeeze(-1), post.variance.squeeze(-1), yt)
    rows.append(("ours, defaults (NGD + Adam)", init_seconds, seconds, nll, rmse, noise_sd))
    for natural, name in ((False, "gpytorch, Adam lr 0.01"), (True, "gpytorch, NGD 0.1 + Adam")):
        torch.manual_seed(0)
        Z = X[torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(1))[:M]]
        run = GPyTorchRun(Z, X.shape[0], natural)
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for _ in range(epochs):
            order = torch.randperm(X.shape[0], generator=g)
            for start in range(0, X.shape[0], BATCH):
                idx = order[start : start + BATCH]
                run.step(X[idx], y[idx])
        seconds = time.perf_counter() - t0
        nll, rmse = _nll_rmse(*run.predict(Xt), yt)
        rows.append((name, 0.0, seconds, nll, rmse, run.noise_sd))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20k points, fewer rounds")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    print(one_thread())
    print(f"gpytorch {gpytorch.__version__}, float32, M = {M}, batch {BATCH}")
    n_train, n_test = (20_000, 2_000) if args.quick else (100_000, 10_000)
    rounds, steps = (3, 5) if args.quick else (args.rounds, args.steps)
    X, y, Xt, yt = make_data(n_train, n_test)
    print(f"n = {n_train:,} train / {n_test:,} test; timing: {rounds} rounds x {steps} steps")
    print("\n| optimiser | clock | ours s/iter | gpytorch s/iter | ours / gpytorch |")
    print("|---|---|---|---|---|")
    for natural, name in ((False, "Adam lr 0.01"), (True, "NGD lr 0.1 + Adam lr 0.01")):
        cpu, wall = time_steps(X, y, natural, rounds, steps)
        for clock, (ours, theirs) in (("CPU", cpu), ("wall", wall)):
            print(
                f"| {name} | {clock} | {ours:.4f} | {theirs:.4f} | {ours / theirs:.2f} |",
                flush=True,
            )
    if args.skip_quality:
        return
    print("\n| model (2 epochs) | init s | fit s (wall) | test NLL | test RMSE | noise sd (0.1) |")
    print("|---|---|---|---|---|---|")
    for name, init, seconds, nll, rmse, sd in quality(X, y, Xt, yt, epochs=2):
        print(
            f"| {name} | {init:.1f} | {seconds:.1f} | {nll:.3f} | {rmse:.4f} | {sd:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

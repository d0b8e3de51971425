"""Yearly sunspot counts with a Poisson state-space GP (CVI), fitted in O(n) and forecast.

statsmodels' yearly sunspot numbers (1700-2008), rounded to integer counts, are modelled as

    y_t ~ Poisson(exp(f(t))),   f = level (ConstantKernel: a random constant log-rate)
                                  + quasi-periodic (Matérn-3/2 x periodic, period ~11 y)
                                  + slow drift (Matérn-3/2, long lengthscale).

The non-Gaussian
likelihood is handled by conjugate-computation variational inference: Gaussian pseudo-
observations whose natural parameters are natural-gradient updated, each update one Kalman
filter / RTS smoother pass (``gp.statespace.cvi``). The hyperparameters maximise the evidence
lower bound (L-BFGS). The last 30 years are held out and forecast. Prints the held-out
predictive log-likelihood and writes ``statespace_sunspots.png``.
Run: ``python examples/statespace_sunspots.py --out out``.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from _common import output_dir, smoke_mode
from gpytorch.kernels import ConstantKernel, MaternKernel, PeriodicKernel, ScaleKernel

import gp
from gp.statespace import predictive_moments


def load_sunspots() -> tuple[np.ndarray, np.ndarray]:
    """Years (n,) and rounded yearly sunspot counts (n,)."""
    import statsmodels.api as sm

    frame = sm.datasets.sunspots.load_pandas().data
    years = frame["YEAR"].to_numpy(np.float64, copy=True)
    return years, np.round(frame["SUNACTIVITY"].to_numpy(np.float64, copy=True))


def sunspot_kernel(level: float) -> ScaleKernel:
    """Random level (prior sd ``level``) + quasi-periodic ~11-year cycle + slow drift (years)."""
    offset = ConstantKernel()
    offset.constant = torch.tensor(level**2)
    periodic = PeriodicKernel()
    periodic.period_length = 11.0
    periodic.lengthscale = 2.0
    decay = MaternKernel(nu=1.5)
    decay.lengthscale = 40.0
    cycle = ScaleKernel(decay * periodic)
    cycle.outputscale = 1.0
    drift = ScaleKernel(MaternKernel(nu=1.5))
    drift.base_kernel.lengthscale = 50.0
    drift.outputscale = 0.2
    return offset + cycle + drift


def poisson_log_predictive(y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log p(y) = log E_{f ~ N(mean, var)} Poisson(y; exp f), by 40-point Gauss-Hermite, (n,)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(40)
    f = mean[:, None] + var.sqrt()[:, None] * torch.as_tensor(nodes)  # (n, 40)
    log_p = torch.distributions.Poisson(f.exp()).log_prob(y[:, None])
    log_w = torch.as_tensor(np.log(weights / weights.sum()))
    return torch.logsumexp(log_p + log_w, dim=-1)


def main() -> None:
    out = output_dir(__doc__.splitlines()[0])
    torch.manual_seed(0)
    years, counts = load_sunspots()
    smoke = smoke_mode()
    if smoke:
        years, counts = years[:60], counts[:60]
    split = years[-10 if smoke else -30]
    train = years < split
    log_mean = float(np.log(counts[train].mean()))  # the level's prior sd (log scale)
    t = torch.as_tensor(years)
    y = torch.as_tensor(counts)

    # ``periodic_order`` fixed so that the bound is a smooth function of the hyperparameters
    kernel = sunspot_kernel(log_mean)
    model = gp.StateSpaceGP(
        kernel,
        likelihood=gp.PoissonLikelihood(),
        method="parallel",
        periodic_order=3 if smoke else 5,
    ).double()
    model.set_data(t[train], y[train])
    start = time.perf_counter()
    losses = model.fit(max_iter=1 if smoke else 40).history_
    print(
        f"fitted {int(train.sum())} years in {time.perf_counter() - start:.1f} s "
        f"({len(losses)} evaluations), ELBO {-losses[-1]:.1f}"
    )

    t_plot = torch.linspace(float(years[0]), float(years[-1]) + 15.0, 1500, dtype=torch.float64)
    with torch.no_grad():
        post = model.posterior(t_plot[:, None])
        held = model.posterior(t[~train][:, None])
    mean, var = post.mean[:, 0], post.variance[:, 0]
    rate_median = mean.exp()  # exp of Gaussian quantiles = quantiles of the log-normal rate
    rate_lo, rate_hi = (mean - 1.96 * var.sqrt()).exp(), (mean + 1.96 * var.sqrt()).exp()
    expected_count, _ = predictive_moments(model.likelihood, mean, var)

    log_pred = poisson_log_predictive(y[~train], held.mean[:, 0], held.variance[:, 0])
    print(
        f"held-out {int((~train).sum())} years from {split:.0f}: "
        f"mean log predictive {float(log_pred.mean()):.3f} nats/year"
    )

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(years[train], counts[train], ".", ms=3, color="k", label="training counts")
    ax.plot(years[~train], counts[~train], ".", ms=3, color="tab:red", label="held out")
    ax.plot(t_plot.numpy(), expected_count.numpy(), color="tab:blue", lw=1, label="E[y]")
    ax.fill_between(
        t_plot.numpy(),
        rate_lo.numpy(),
        rate_hi.numpy(),
        color="tab:blue",
        alpha=0.25,
        label="95% band of the rate exp(f)",
    )
    ax.plot(t_plot.numpy(), rate_median.numpy(), color="tab:blue", lw=0.5, ls="--")
    ax.axvline(split, color="grey", ls=":")
    ax.set_xlabel("year")
    ax.set_ylabel("sunspot count")
    ax.set_title("Sunspots: Poisson state-space GP (quasi-periodic kernel, CVI, O(n))")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = out / "statespace_sunspots.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Mauna Loa CO2 with a state-space GP: trend + quasi-periodic seasonality, fitted and forecast.

The CO2 record (statsmodels' ``co2``, weekly 1958-2001, averaged to months; months without
a measurement stay missing) is modelled as

    y = quadratic mean (least squares on the training years) + f + Gaussian noise,
    f(t) = smooth departures from the line (Matérn-5/2, long lengthscale)
         + seasonal cycle (Matérn-3/2 x periodic with period 1 year: a quasi-periodic kernel)
         + medium-term irregularities (Matérn-1/2).

Every component has an exact state-space form, so inference is an O(n) Kalman filter / RTS
smoother (the log marginal likelihood and its gradient in the compiled filter when numba is
installed), and the missing months are simply NaN. The hyperparameters
are fitted by L-BFGS on the log marginal likelihood of the data up to 1995; the last six years
are held out and forecast with 95% bands. Prints the held-out NLL and coverage; writes
``statespace_co2.png``. Run: ``python examples/statespace_co2.py --out out``.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from _common import output_dir, smoke_mode
from gpytorch.kernels import MaternKernel, PeriodicKernel, ScaleKernel

import gp
from bdl import metrics


def load_co2() -> tuple[np.ndarray, np.ndarray]:
    """Decimal years (n,) and monthly mean CO2 ppm (n,), NaN for months without data."""
    import statsmodels.api as sm

    frame = sm.datasets.co2.load_pandas().data.resample("MS").mean()
    index = frame.index
    years = index.year + (index.day_of_year - 1) / 365.25
    return np.asarray(years, dtype=np.float64), frame["co2"].to_numpy(dtype=np.float64)


def co2_kernel() -> ScaleKernel:
    """Trend + quasi-periodic seasonality + short-term irregularities (time in years)."""
    trend = ScaleKernel(MaternKernel(nu=2.5))
    trend.base_kernel.lengthscale = 20.0
    trend.outputscale = 1.0
    periodic = PeriodicKernel()
    periodic.period_length = 1.0
    periodic.lengthscale = 1.0
    decay = MaternKernel(nu=1.5)
    decay.lengthscale = 50.0
    seasonal = ScaleKernel(decay * periodic)
    seasonal.outputscale = 0.1
    irregular = ScaleKernel(MaternKernel(nu=0.5))
    irregular.base_kernel.lengthscale = 1.0
    irregular.outputscale = 0.01
    return trend + seasonal + irregular


def main() -> None:
    out = output_dir(__doc__.splitlines()[0])
    torch.manual_seed(0)
    years, co2 = load_co2()
    smoke = smoke_mode()
    if smoke:  # a few years, a few iterations
        keep = years < 1966
        years, co2 = years[keep], co2[keep]
    split = 1963.0 if smoke else 1995.0
    train = years < split
    # Quadratic mean function (least squares on the training part): a zero-mean stationary GP
    # reverts to its mean when forecasting, so the accelerating secular rise goes into the mean
    # and the GP models the departures from it. Then standardise; time stays in years.
    seen = train & ~np.isnan(co2)
    trend_fit = np.polynomial.Polynomial.fit(years[seen], co2[seen], deg=2)
    trend = trend_fit(years)
    sd = np.nanstd(co2[train] - trend[train])
    t = torch.as_tensor(years)
    y = torch.as_tensor((co2 - trend) / sd)

    def trend_mean(times: torch.Tensor) -> np.ndarray:
        return trend_fit(times.numpy())

    model = gp.StateSpaceGP(co2_kernel(), noise=0.01, method="auto", periodic_order=6)
    model = model.to(torch.float64).set_data(t[train], y[train])
    start = time.perf_counter()
    losses = model.fit(max_iter=5 if smoke else 60).history_
    fit_seconds = time.perf_counter() - start
    print(
        f"fitted {int(train.sum())} months in {fit_seconds:.1f} s, "
        f"{len(losses)} evaluations, final -LML {losses[-1]:.1f}"
    )

    t_plot = torch.linspace(float(years[0]), float(years[-1]) + 2.0, 2000, dtype=torch.float64)
    with torch.no_grad():
        post = model.posterior(t_plot[:, None])
        test = ~train & ~np.isnan(co2)
        held_out = model.posterior(t[test][:, None], observation_noise=True)
    mean = post.mean[:, 0].numpy() * sd + trend_mean(t_plot)
    lower, upper = (b[:, 0].numpy() * sd + trend_mean(t_plot) for b in post.confidence_region(0.95))

    y_test = torch.as_tensor(co2[test])
    test_mean = held_out.mean[:, 0] * sd + torch.as_tensor(trend_mean(t[test]))
    test_var = held_out.variance[:, 0] * sd**2
    nll = metrics.gaussian_nll(test_mean, test_var, y_test)
    inside = (y_test - test_mean).abs() <= 1.96 * test_var.sqrt()
    print(
        f"held-out {int(test.sum())} months from {split:.0f}: NLL {float(nll):.3f} nats, "
        f"RMSE {float(metrics.rmse(test_mean, y_test)):.3f} ppm, "
        f"95% coverage {float(inside.double().mean()):.3f}"
    )

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(years[train], co2[train], ".", ms=1.5, color="k", label="training months")
    ax.plot(years[~train], co2[~train], ".", ms=1.5, color="tab:red", label="held out")
    ax.plot(t_plot.numpy(), mean, color="tab:blue", lw=1, label="posterior mean")
    ax.fill_between(t_plot.numpy(), lower, upper, color="tab:blue", alpha=0.25, label="95% band")
    ax.axvline(split, color="grey", ls=":")
    ax.set_xlabel("year")
    ax.set_ylabel("CO2 (ppm)")
    ax.set_title("Mauna Loa CO2: state-space GP (trend + quasi-periodic), O(n) Kalman inference")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = out / "statespace_co2.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

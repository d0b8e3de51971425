"""Mauna Loa CO2 with a state-space GP: trend + quasi-periodic seasonality, fitted and forecast.

The CO2 record (statsmodels' ``co2``, weekly 1958-2001, averaged to months; months without
a measurement stay missing) is modelled with :class:`gp.StateSpaceGPRegressor` as

    y = quadratic trend (``mean=2``: flat prior on its coefficients) + f + Gaussian noise,
    f(t) = smooth departures from the quadratic (Matérn-5/2, long lengthscale)
         + seasonal cycle (Matérn-3/2 x periodic with period 1 year: a quasi-periodic kernel)
         + medium-term irregularities (Matérn-1/2).

The estimator takes kernel hyperparameters in the time units of ``X`` (years here), so the
kernel is written with a one-year period and lengthscales in years, and its fitted values
(``kernel_``) read the same way; the missing months are NaN targets, which the Kalman
filter skips. Every component has an exact state-space form, so inference is an O(n) Kalman
filter / RTS smoother (the log marginal likelihood and its gradient in the compiled filter
when numba is installed). The
hyperparameters are fitted by L-BFGS to convergence on the log marginal likelihood of the
data up to 1995 (a fixed periodic order keeps that objective smooth); the quadratic's
coefficients are then integrated out exactly, so the forecast follows the generalised
least-squares quadratic (which weighs the correlated departures properly) and its 95%
bands include the quadratic's uncertainty, which grows with the forecast horizon. The last
seven years are held out. Prints the held-out RMSE, NLL and coverage; writes
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
    # A quadratic mean: a zero-mean stationary GP reverts to its mean when forecasting, so
    # the accelerating secular rise goes into the mean and the GP models the departures
    # from it (the targets are standardised by the spread of those departures, so the
    # kernel's output scales are relative to it).
    model = gp.StateSpaceGPRegressor(
        kernel=co2_kernel(), noise=0.01, mean=2, max_iter=5 if smoke else 300, periodic_order=6
    )
    start = time.perf_counter()
    model.fit(years[train, None], co2[train])  # NaN months are missing values
    fit_seconds = time.perf_counter() - start
    print(
        f"fitted {int(train.sum())} months in {fit_seconds:.1f} s, {model.n_iter_} "
        f"evaluations, log marginal likelihood {model.log_marginal_likelihood_value_:.1f}"
    )
    seasonal = model.kernel_.kernels[1].base_kernel.kernels[1]
    print(f"fitted seasonal period {float(seasonal.period_length):.4f} years")

    t_plot = np.linspace(years[0], years[-1] + 2.0, 2000)
    with torch.no_grad():
        post = model.posterior(t_plot[:, None])  # latent f + trend, in ppm
    mean = post.mean[:, 0].numpy()
    lower, upper = (b[:, 0].numpy() for b in post.confidence_region(0.95))

    test = ~train & ~np.isnan(co2)
    test_mean, test_std = model.predict(years[test, None], return_std=True)  # noise included
    y_test, mu = torch.as_tensor(co2[test]), torch.as_tensor(test_mean)
    var = torch.as_tensor(test_std) ** 2
    nll = metrics.gaussian_nll(mu, var, y_test)
    inside = (y_test - mu).abs() <= 1.96 * var.sqrt()
    print(
        f"held-out {int(test.sum())} months from {split:.0f}: NLL {float(nll):.3f} nats, "
        f"RMSE {float(metrics.rmse(mu, y_test)):.3f} ppm, "
        f"95% coverage {float(inside.double().mean()):.3f}"
    )

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(years[train], co2[train], ".", ms=1.5, color="k", label="training months")
    ax.plot(years[~train], co2[~train], ".", ms=1.5, color="tab:red", label="held out")
    ax.plot(t_plot, mean, color="tab:blue", lw=1, label="posterior mean")
    ax.fill_between(t_plot, lower, upper, color="tab:blue", alpha=0.25, label="95% band")
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

"""Quickstart: a Bayesian last-layer network on scikit-learn's diabetes data.

Fits ``bdl.VBLLRegressor`` (an MLP with a variational Bayesian last layer), prints test
metrics against a plain linear model, and saves a calibration plot of the predictive bands.

Run:  python examples/quickstart.py --out out
"""

from __future__ import annotations

import numpy as np
import torch
from _common import output_dir, smoke_mode
from matplotlib import pyplot as plt
from sklearn.datasets import load_diabetes
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import train_test_split

import bdl
from bdl import metrics


def main() -> None:
    out = output_dir(__doc__.splitlines()[0])
    torch.set_num_threads(1)
    X, y = load_diabetes(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=0)

    epochs = 2 if smoke_mode() else 30
    model = bdl.VBLLRegressor(epochs=epochs, random_state=0).fit(X_train, y_train)
    mean, std = model.predict(X_test, return_std=True)

    # metrics in units of the training-target standard deviation
    scale = y_train.std()
    t = lambda a: torch.as_tensor(a / scale)  # noqa: E731
    nll = metrics.gaussian_nll(t(mean), t(std) ** 2, t(y_test)).item()
    rmse = metrics.rmse(t(mean), t(y_test)).item()
    calib = metrics.interval_calibration_error(t(mean), t(std) ** 2, t(y_test)).item()
    baseline = LinearRegression().fit(X_train, y_train).predict(X_test)
    print(
        f"VBLL regressor   test RMSE {rmse:.3f}  NLL {nll:.3f}  interval calib. error {calib:.3f}"
    )
    print(f"linear baseline  test RMSE {metrics.rmse(t(baseline), t(y_test)).item():.3f}")
    print(f"posterior: {model.posterior(X_test[:5])}")

    order = np.argsort(mean)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(
        np.arange(len(order)), (mean - 2 * std)[order], (mean + 2 * std)[order],
        alpha=0.3, label="95% predictive band",
    )  # fmt: skip
    ax.plot(mean[order], lw=2, label="predictive mean")
    ax.scatter(np.arange(len(order)), y_test[order], s=10, c="k", label="test targets")
    ax.set_xlabel("test points, sorted by predicted mean")
    ax.set_ylabel("disease progression")
    ax.set_title(f"VBLL on diabetes: NLL {nll:.3f}, RMSE {rmse:.3f} (target sd units)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = out / "quickstart.png"
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    main()

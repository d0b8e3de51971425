"""Sparse GPs on 100,000 points: SVGP (M = 256) and SWSGP (M = 16,384, H = 32) as estimators.

A 3-D synthetic benchmark:

    f(x) = sin(3 x1) + cos(2 x2) x3 + 0.5 x1 x2,   x ~ U[-1, 1]^3,   y = f(x) + N(0, 0.1^2),

with n = 100,000 training and 10,000 test points. Both models are fitted by
``gp.SparseGPRegressor`` (inputs and targets standardised internally) for two epochs of
minibatches of 1,024 on one thread: SVGP with natural gradients for q(u), SWSGP with each
input using its 32 nearest of 16,384 inducing points. Prints the fit time, the time per
iteration, test NLL (observation noise included) and RMSE, and the learned noise sd (truth
0.1); writes ``sparse_gp_large.png``: a slice through x1 at fixed (x2, x3), posterior mean
+- 2 sd of f against the truth, with the x1 positions of the inducing points near the slice.
Run: ``python examples/sparse_gp_large.py --out out`` (about a minute; ``BDL_SMOKE=1`` uses
2,000 points, fewer inducing points and batches of 256, and runs in seconds).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from _common import output_dir, smoke_mode

import gp
from bdl import metrics

NOISE_SD = 0.1
SLICE = (0.3, 0.8)  # fixed (x2, x3) of the plotted slice
SLAB = 0.15  # inducing points with |x2 - 0.3|, |x3 - 0.8| below this are drawn on the slice


def truth(X: np.ndarray) -> np.ndarray:
    return np.sin(3 * X[:, 0]) + np.cos(2 * X[:, 1]) * X[:, 2] + 0.5 * X[:, 0] * X[:, 1]


def make_data(n_train: int, n_test: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1.0, 1.0, size=(n_train + n_test, 3))
    y = truth(X) + NOISE_SD * rng.standard_normal(n_train + n_test)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def inducing_inputs(model: gp.SparseGPRegressor) -> np.ndarray:
    """The fitted inducing inputs in the original input units, shape (M, 3)."""
    Z = model.model_.model.inducing_points.detach().reshape(-1, 3)  # standardised inputs
    return model.input_transform_.untransform(Z.double()).cpu().numpy()


def main() -> None:
    out = output_dir(__doc__.splitlines()[0])
    torch.set_num_threads(1)
    smoke = smoke_mode()
    n_train, n_test = (2_000, 500) if smoke else (100_000, 10_000)
    X, y, X_test, y_test = make_data(n_train, n_test)
    m_svgp, m_swsgp = (64, 512) if smoke else (256, 16_384)
    configs = {
        f"SVGP, M = {m_svgp:,}": dict(method="svgp", num_inducing=m_svgp),
        f"SWSGP, M = {m_swsgp:,}, H = 32": dict(
            method="swsgp", num_inducing=m_swsgp, num_neighbors=32
        ),
    }
    batch_size = 256 if smoke else 1024
    print(f"n = {n_train:,} train / {n_test:,} test, 3 inputs, noise sd {NOISE_SD}")
    fitted = {}
    for name, params in configs.items():
        model = gp.SparseGPRegressor(**params, epochs=2, batch_size=batch_size, random_state=0)
        start = time.perf_counter()
        model.fit(X, y)
        seconds = time.perf_counter() - start
        post = model.posterior(X_test, observation_noise=True)
        mean, var = post.mean[:, 0].double(), post.variance[:, 0].double()
        target = torch.as_tensor(y_test)
        nll = float(metrics.gaussian_nll(mean, var, target))
        rmse = float(metrics.rmse(mean, target))
        print(
            f"{name:<26} fit {seconds:6.1f} s ({model.n_iter_} iterations of "
            f"{model.train_time_ / model.n_iter_:.4f} s), test NLL {nll:.3f}, "
            f"RMSE {rmse:.4f}, noise sd {np.sqrt(model.noise_):.4f}"
        )
        fitted[name] = model

    import matplotlib.pyplot as plt

    x1 = np.linspace(-1.0, 1.0, 400)
    grid = np.column_stack([x1, np.full_like(x1, SLICE[0]), np.full_like(x1, SLICE[1])])
    fig, axes = plt.subplots(1, len(fitted), figsize=(11, 4), sharey=True)
    for ax, (name, model) in zip(np.atleast_1d(axes), fitted.items(), strict=True):
        post = model.posterior(grid)
        mean = post.mean[:, 0].cpu().double().numpy()
        sd = post.stddev[:, 0].cpu().double().numpy()
        ax.plot(x1, truth(grid), color="k", lw=1.2, label="truth f")
        ax.plot(x1, mean, color="tab:blue", lw=1.2, label="posterior mean")
        ax.fill_between(
            x1, mean - 2 * sd, mean + 2 * sd, color="tab:blue", alpha=0.25, label="mean ± 2 sd"
        )
        Z = inducing_inputs(model)
        near = (np.abs(Z[:, 1] - SLICE[0]) < SLAB) & (np.abs(Z[:, 2] - SLICE[1]) < SLAB)
        bottom = ax.get_ylim()[0]
        ax.plot(Z[near, 0], np.full(near.sum(), bottom), "|", color="tab:red", ms=10,
                label=f"inducing x1 near the slice ({near.sum()})")  # fmt: skip
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("x1")
        ax.set_xlim(-1, 1)
    np.atleast_1d(axes)[0].set_ylabel(f"f(x1, {SLICE[0]}, {SLICE[1]})")
    np.atleast_1d(axes)[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"sparse GPs on n = {n_train:,}: slice x2 = {SLICE[0]}, x3 = {SLICE[1]}")
    fig.tight_layout()
    path = out / "sparse_gp_large.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

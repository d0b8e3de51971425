"""Bayesian optimisation of the Branin function with every surrogate of the library.

Runs ``bdl.bo.BayesOpt`` (6 Sobol points, then one point per iteration, qLogEI) with the exact
GP, a sparse variational GP, a variational Bayesian last layer and an SG-MCMC ensemble, plus
Thompson sampling from last-layer and sparse-subspace-VI weight draws, over three seeds, and
saves the median simple regret of each against the number of evaluations.

Run:  python examples/bo_surrogates.py --out out
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from _common import output_dir, smoke_mode
from matplotlib import pyplot as plt

from bdl.bo import BayesOpt

OPTIMUM = 0.397887  # Branin's global minimum
BOUNDS = [(-5.0, 10.0), (0.0, 15.0)]
RUNS = [
    ("gp", "qlogei"),
    ("svgp", "qlogei"),
    ("vbll", "qlogei"),
    ("vbll", "ts"),
    ("sgmcmc", "qlogei"),
    ("ssvi", "ts"),
]


def branin(X: np.ndarray) -> np.ndarray:
    """Branin-Hoo (Dixon & Szegő, 1978) on [-5, 10] x [0, 15]."""
    x1, x2 = X[:, 0], X[:, 1]
    b, c, t = 5.1 / (4 * np.pi**2), 5 / np.pi, 1 / (8 * np.pi)
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * np.cos(x1) + 10


def main() -> None:
    out = output_dir(__doc__.splitlines()[0])
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Optimization failed")
    seeds, n_iter = ([0], 2) if smoke_mode() else ([0, 1, 2], 25)
    fig, ax = plt.subplots(figsize=(6, 4))
    for surrogate, acquisition in RUNS:
        regrets, seconds = [], []
        for seed in seeds:
            bo = BayesOpt(BOUNDS, surrogate=surrogate, acquisition=acquisition, seed=seed)
            bo.run(branin, n_iter)
            regrets.append(bo.history["best"] - OPTIMUM)
            seconds.append(np.median(bo.history["seconds"][1:]))
        median = np.median(regrets, axis=0)
        name = f"{surrogate} + {acquisition}"
        ax.semilogy(np.arange(1, len(median) + 1), np.maximum(median, 1e-6), label=name)
        print(f"{name:16s} final regret {median[-1]:.4f}  {np.median(seconds):.2f} s/iter")
    ax.axvline(6.5, color="0.7", lw=0.8)
    ax.set_xlabel("evaluations")
    ax.set_ylabel(f"median simple regret ({len(seeds)} seeds)")
    ax.set_title("Branin: every surrogate through bdl.bo.BayesOpt")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bo_surrogates.png", dpi=120)
    print(f"saved {out / 'bo_surrogates.png'}")


if __name__ == "__main__":
    main()

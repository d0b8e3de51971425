"""Sparse subspace VI on scikit-learn's digits: accuracy, NLL and ECE against density.

Trains ``bdl.SSVIClassifier`` (a 2x128 ReLU MLP whose every layer keeps only a fraction of its
weights, from the first step to the last) at densities from 2 % to 100 % (100 % is dense
mean-field VI by the same code), prints test accuracy, NLL, expected calibration error and the
training-FLOP ratio to dense VI, and plots the three metrics against density.

Run:  python examples/ssvi_density.py --out out
"""

from __future__ import annotations

import numpy as np
import torch
from _common import output_dir, smoke_mode
from matplotlib import pyplot as plt
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import bdl
from bdl import metrics
from bdl.ssvi import flops


def main() -> None:
    out = output_dir(__doc__.splitlines()[0])
    torch.set_num_threads(1)
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.2, random_state=0, stratify=y
    )
    densities = [0.05, 1.0] if smoke_mode() else [0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    epochs = 2 if smoke_mode() else None
    labels = torch.as_tensor(y_test)
    rows = []
    for density in densities:
        clf = bdl.SSVIClassifier(density=density, epochs=epochs, random_state=0)
        clf.fit(X_train, y_train)
        probs = torch.as_tensor(clf.predict_proba(X_test))
        example = torch.zeros(1, X.shape[1])
        ratio = flops(clf.model_.model, example)["total"]["train_ratio"]
        rows.append(
            (
                density,
                float(metrics.accuracy(probs, labels)),
                float(metrics.categorical_nll(probs, labels)),
                float(metrics.expected_calibration_error(probs, labels)),
                ratio,
            )
        )
        print(
            f"density {density:5.2f}  acc {rows[-1][1]:.4f}  NLL {rows[-1][2]:.4f}  "
            f"ECE {rows[-1][3]:.4f}  training FLOPs {ratio:.3f} x dense"
        )
    d, acc, nll, ece, _ = (np.array(c) for c in zip(*rows, strict=True))
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, values, name in zip(axes, (acc, nll, ece), ("accuracy", "NLL", "ECE"), strict=True):
        ax.semilogx(d, values, "o-")
        ax.set_xlabel("density (fraction of weights kept)")
        ax.set_title(name)
    fig.suptitle("SSVI on digits (2x128 MLP): density 1 is dense mean-field VI")
    fig.tight_layout()
    fig.savefig(out / "ssvi_density.png", dpi=120)
    print(f"saved {out / 'ssvi_density.png'}")


if __name__ == "__main__":
    main()

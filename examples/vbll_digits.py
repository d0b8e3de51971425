"""VBLL classification on scikit-learn's digits: calibration against a plain MAP network.

Fits ``bdl.VBLLClassifier`` (an MLP with a variational Bayesian last layer, default settings)
and a plain MAP MLP of the same shape trained with cross-entropy, prints test accuracy, NLL
and expected calibration error (ECE) of both, and plots their reliability diagrams and the
predictive entropy of correctly vs incorrectly classified test digits.

Run:  python examples/vbll_digits.py --out out
"""

from __future__ import annotations

import numpy as np
import torch
from _common import output_dir, smoke_mode
from matplotlib import pyplot as plt
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

import bdl
from bdl import metrics
from bdl.nets import make_mlp

N_BINS = 10


def train_map_mlp(x: np.ndarray, y: np.ndarray, num_classes: int, epochs: int) -> nn.Module:
    """2x128 ReLU MLP, Adam (lr 1e-3, weight decay 1e-4), batch 64, cross-entropy."""
    torch.manual_seed(0)
    net = nn.Sequential(make_mlp(x.shape[1], (128, 128)), nn.Linear(128, num_classes))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    x_t = torch.as_tensor(x, dtype=torch.float32)
    y_t = torch.as_tensor(y, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(y_t), generator=generator)
        for start in range(0, len(y_t), 64):
            idx = order[start : start + 64]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x_t[idx]), y_t[idx]).backward()
            opt.step()
    return net.eval()


def plot_reliability(ax, probs: Tensor, y: Tensor, title: str) -> None:
    """Accuracy per confidence bin (bars, with counts) against the bin's mean confidence."""
    rel = metrics.reliability_diagram(probs, y, n_bins=N_BINS)
    used = rel.count > 0
    lower, upper = rel.bin_lower[used].numpy(), rel.bin_upper[used].numpy()
    acc, conf, count = rel.accuracy[used].numpy(), rel.confidence[used].numpy(), rel.count[used]
    width = upper - lower
    ax.bar(lower, acc, width=width, align="edge", color="C0", edgecolor="k", label="accuracy")
    ax.hlines(conf, lower, upper, colors="C3", lw=2.5, label="mean confidence")
    tops = np.maximum(acc, conf) + 0.015
    for lo, w, top, c in zip(lower, width, tops, count.tolist(), strict=True):
        ax.text(lo + w / 2, top, f"n={c}", ha="center", fontsize=7)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}: ECE {rel.expected_calibration_error().item():.4f}")
    ax.legend(loc="upper left", fontsize=7)


def plot_entropy(ax, probs: Tensor, y: Tensor, title: str) -> None:
    """Histogram of predictive entropy, split by whether the prediction is right."""
    entropy = metrics.predictive_entropy(probs).numpy()
    correct = (probs.argmax(1) == y).numpy()
    bins = np.linspace(0.0, np.log(probs.shape[1]), 31)
    ax.hist(entropy[correct], bins=bins, color="C2", alpha=0.7, label=f"correct ({correct.sum()})")
    ax.hist(
        entropy[~correct], bins=bins, color="C3", alpha=0.8, label=f"wrong ({(~correct).sum()})"
    )
    ax.set_yscale("log")
    ax.set_xlabel("predictive entropy (nats)")
    ax.set_ylabel("test points")
    ax.set_title(f"{title}: predictive entropy")
    ax.legend(fontsize=7)


def main() -> None:
    out = output_dir(__doc__.splitlines()[0])
    torch.set_num_threads(1)
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.2, stratify=y, random_state=0
    )
    epochs = 2 if smoke_mode() else 40
    num_classes = 10

    vbll = bdl.VBLLClassifier(random_state=0, epochs=epochs).fit(X_train, y_train)
    vbll_probs = torch.as_tensor(vbll.predict_proba(X_test))

    scaler = StandardScaler().fit(X_train)
    net = train_map_mlp(scaler.transform(X_train), y_train, num_classes, epochs)
    with torch.no_grad():
        logits = net(torch.as_tensor(scaler.transform(X_test), dtype=torch.float32))
    map_probs = torch.softmax(logits.double(), dim=1)

    y_t = torch.as_tensor(y_test)
    results = {"VBLL": vbll_probs, "MAP MLP": map_probs}
    for name, probs in results.items():
        acc = metrics.accuracy(probs, y_t).item()
        nll = metrics.categorical_nll(probs, y_t).item()
        ece = metrics.expected_calibration_error(probs, y_t, n_bins=N_BINS).item()
        entropy = metrics.predictive_entropy(probs)
        wrong = probs.argmax(1) != y_t
        line = f"{name:<8} test accuracy {acc:.4f}  NLL {nll:.4f}  ECE ({N_BINS} bins) {ece:.4f}"
        if wrong.any() and (~wrong).any():
            # how well the entropy flags the misclassified digits (0.5 = chance)
            auroc = metrics.ood_auroc(entropy[~wrong], entropy[wrong]).item()
            line += (
                f"  | mean entropy correct {entropy[~wrong].mean():.3f}"
                f" wrong {entropy[wrong].mean():.3f}  error-detection AUROC {auroc:.3f}"
            )
        print(line)

    fig, axes = plt.subplots(2, 2, figsize=(11, 9))
    for col, (name, probs) in enumerate(results.items()):
        plot_reliability(axes[0, col], probs, y_t, name)
        plot_entropy(axes[1, col], probs, y_t, name)
    fig.suptitle(f"digits test set ({len(y_test)} images)")
    fig.tight_layout()
    path = out / "vbll_digits.png"
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    main()

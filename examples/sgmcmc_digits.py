"""Cyclical SGHMC on scikit-learn's digits: calibration against a MAP network, and traces.

A 2x128 ReLU MLP is sampled with ``bdl.sgmcmc.SGHMC`` under a ``CyclicalSchedule``
(exploration without noise, then a low-step-size sampling phase at the end of each cycle)
in the plain PyTorch loop: the loss is the minibatch *mean* cross-entropy, the optimizer is
told ``num_data`` and a Gaussian prior ``prior_precision``, and a ``SampleCollector``
keeps thinned samples from the sampling phases. A MAP network of the same shape is trained
for the same number of epochs (Adam, weight decay). The script prints test accuracy, NLL and
expected calibration error (ECE) of both, and the effective sample size (ESS) of a few
weights and of the training log-likelihood across the collected samples; the plot shows the
two reliability diagrams and trace plots of those quantities.

Run:  python examples/sgmcmc_digits.py --out out
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
from torch.utils.data import DataLoader, TensorDataset

from bdl import metrics
from bdl.nets import make_mlp
from bdl.sgmcmc import SGHMC, CyclicalSchedule, SampleCollector, effective_sample_size

N_BINS = 10
BATCH = 64
PRIOR_PRECISION = 1.0
NUM_TRACED = 4


def make_net(in_features: int, num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(make_mlp(in_features, (128, 128)), nn.Linear(128, num_classes))


def train_map(loader: DataLoader, in_features: int, num_classes: int, epochs: int) -> nn.Module:
    """The MAP baseline: Adam (lr 1e-3, weight decay 1e-4), batch 64, cross-entropy."""
    net = make_net(in_features, num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    return net.eval()


def train_sghmc(
    loader: DataLoader,
    x_train: Tensor,
    y_train: Tensor,
    num_classes: int,
    epochs: int,
    num_cycles: int,
) -> tuple[SampleCollector, list[float]]:
    """Cyclical SGHMC in the ordinary loop; returns the collector and per-sample train log-lik."""
    net = make_net(x_train.shape[1], num_classes)
    num_steps = epochs * len(loader)
    # lr = eta * N on the mean loss; with momentum_decay 0.1 an exploration step moves like
    # SGD with momentum 0.9 and lr 0.05. prior_precision 1 is weight decay 1 / N on the mean loss.
    opt = SGHMC(
        net.parameters(),
        lr=0.05,
        num_data=len(y_train),
        momentum_decay=0.1,
        prior_precision=PRIOR_PRECISION,
        generator=torch.Generator().manual_seed(0),
    )
    schedule = CyclicalSchedule(
        opt, num_steps=num_steps, num_cycles=num_cycles, exploration_fraction=0.7
    )
    # keep every 4th step of each cycle's sampling phase (the last 30% of the cycle)
    collector = SampleCollector(net, thin=4, schedule=schedule)
    log_lik = []
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            if collector.update():  # before schedule.step(): the phase of the step just taken
                with torch.no_grad():
                    nll = nn.functional.cross_entropy(net(x_train), y_train, reduction="sum")
                log_lik.append(-nll.item())
            schedule.step()
    return collector, log_lik


def plot_reliability(ax, probs: Tensor, y: Tensor, title: str) -> None:
    """Accuracy per confidence bin (bars) against the bin's mean confidence."""
    rel = metrics.reliability_diagram(probs, y, n_bins=N_BINS)
    used = rel.count > 0
    lower, upper = rel.bin_lower[used].numpy(), rel.bin_upper[used].numpy()
    acc, conf = rel.accuracy[used].numpy(), rel.confidence[used].numpy()
    ax.bar(
        lower, acc, width=upper - lower, align="edge", color="C0", edgecolor="k", label="accuracy"
    )
    ax.hlines(conf, lower, upper, colors="C3", lw=2.5, label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}: ECE {rel.expected_calibration_error().item():.4f}")
    ax.legend(loc="upper left", fontsize=7)


def main() -> None:
    out = output_dir(__doc__.splitlines()[0])
    torch.set_num_threads(1)
    smoke = smoke_mode()
    epochs, num_cycles = (2, 2) if smoke else (40, 4)
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.2, stratify=y, random_state=0
    )
    if smoke:
        X_train, y_train = X_train[:256], y_train[:256]
    scaler = StandardScaler().fit(X_train)
    x_tr = torch.as_tensor(scaler.transform(X_train), dtype=torch.float32)
    x_te = torch.as_tensor(scaler.transform(X_test), dtype=torch.float32)
    y_tr, y_te = torch.as_tensor(y_train), torch.as_tensor(y_test)
    num_classes = 10
    loader = DataLoader(
        TensorDataset(x_tr, y_tr),
        batch_size=BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )

    collector, log_lik = train_sghmc(loader, x_tr, y_tr, num_classes, epochs, num_cycles)
    sghmc_probs = collector.posterior(x_te).probs.double()
    map_net = train_map(loader, x_tr.shape[1], num_classes, epochs)
    with torch.no_grad():
        map_probs = torch.softmax(map_net(x_te).double(), dim=1)

    results = {f"cSGHMC ({len(collector)} samples)": sghmc_probs, "MAP": map_probs}
    for name, probs in results.items():
        acc = metrics.accuracy(probs, y_te).item()
        nll = metrics.categorical_nll(probs, y_te).item()
        ece = metrics.expected_calibration_error(probs, y_te, n_bins=N_BINS).item()
        print(f"{name:<22} test accuracy {acc:.4f}  NLL {nll:.4f}  ECE ({N_BINS} bins) {ece:.4f}")

    # traces: a few first-layer weights and the training log-likelihood across the samples
    samples = collector.samples.double()  # (S, P)
    traced = torch.linspace(0, samples.shape[1] - 1, NUM_TRACED).long()
    weights = samples[:, traced]
    ll = torch.tensor(log_lik, dtype=torch.float64)
    if len(ll) >= 4:
        ess_w = effective_sample_size(weights)
        ess_ll = effective_sample_size(ll).item()
        print(
            f"ESS over {len(ll)} samples: training log-likelihood {ess_ll:.1f}; weights "
            + ", ".join(f"#{int(i)} {e:.1f}" for i, e in zip(traced, ess_w.tolist(), strict=True))
        )
    else:
        ess_w, ess_ll = torch.full((NUM_TRACED,), float("nan")), float("nan")

    fig, axes = plt.subplots(2, 2, figsize=(11, 9))
    for ax, (name, probs) in zip(axes[0], results.items(), strict=True):
        plot_reliability(ax, probs, y_te, name)
    steps = np.arange(len(ll))
    for j, i in enumerate(traced.tolist()):
        axes[1, 0].plot(
            steps,
            weights[:, j].numpy(),
            marker=".",
            lw=1,
            label=f"weight #{i} (ESS {ess_w[j]:.1f})",
        )
    axes[1, 0].set_xlabel("collected sample")
    axes[1, 0].set_ylabel("value")
    axes[1, 0].set_title("trace of a few weights (cycle ends marked by jumps)")
    axes[1, 0].legend(fontsize=7)
    axes[1, 1].plot(steps, ll.numpy(), marker=".", lw=1, color="C2")
    axes[1, 1].set_xlabel("collected sample")
    axes[1, 1].set_ylabel("training log-likelihood")
    axes[1, 1].set_title(f"trace of the training log-likelihood (ESS {ess_ll:.1f})")
    fig.suptitle(f"digits: cyclical SGHMC vs MAP, {epochs} epochs each")
    fig.tight_layout()
    path = out / "sgmcmc_digits.png"
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    main()

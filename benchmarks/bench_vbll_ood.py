"""Out-of-distribution detection on digits: train on classes 0-7, score 8 and 9.

The protocol split (80/20, random_state=0, stratified) is made on all ten classes; 8 and 9
are then dropped from the training set. In-distribution test points are the test 0-7, OOD
points the test 8/9. Score = predictive entropy (higher = more OOD); AUROC by
``bdl.metrics.ood_auroc``. Rows over 5 training seeds: the MAP network, our
``VBLLClassifier`` with default settings, and vbll's dense ``DiscClassification`` in the
protocol network. Saves entropy histograms (seed 0) to ``benchmarks/out/vbll_ood.png``.

Usage: ``python benchmarks/bench_vbll_ood.py [--quick] [--rows MAP,ours]``.
"""

from __future__ import annotations

import argparse
import statistics

import _common as C
import numpy as np
import torch

from bdl import metrics
from bdl.lastlayer.estimators import VBLLClassifier

IN_CLASSES = list(range(8))
ROWS = ["MAP (nn.Linear head)", "ours: VBLLClassifier() defaults", "vbll 0.4.9 dense"]


def predict(row: str, split: C.Split, seed: int, epochs: int | None) -> torch.Tensor:
    """Test-set class probabilities (n_test, 8) of ``row`` trained with ``seed``."""
    x_test = torch.as_tensor(split.x_test)
    if row.startswith("ours"):
        est = VBLLClassifier(random_state=seed).fit(split.x_train, split.y_train)
        assert list(est.classes_) == IN_CLASSES
        return torch.as_tensor(est.predict_proba(split.x_test))
    if row.startswith("MAP"):
        net = C.train(
            split, C.plain_classification, seed, head_decay=C.WEIGHT_DECAY, clip=None, epochs=epochs
        )
    else:
        factory = C.vbll_package("classification", parameterization="dense")
        net = C.train(split, factory, seed, head_decay=0.0, clip=C.CLIP, adamw=True, epochs=epochs)
    return C.predict_proba(net, x_test, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 epochs (smoke run)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rows", default="", help="comma-separated substrings of row names")
    parser.add_argument("--out", default="", help="output stem (default vbll_ood[_quick])")
    args = parser.parse_args()
    threads = C.one_thread()
    rows = [r for r in ROWS if C.selected(r, [p for p in args.rows.split(",") if p])]
    seeds = C.seeds_for(args.quick, args.seeds)
    epochs = 5 if args.quick else None
    split = C.load_split("digits", keep_train_classes=IN_CLASSES)
    y_test = torch.as_tensor(split.y_test)
    is_in = y_test < len(IN_CLASSES)

    auroc: dict[str, list[float]] = {r: [] for r in rows}
    acc: dict[str, list[float]] = {r: [] for r in rows}
    entropies: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for row in rows:
        for seed in seeds:
            probs = predict(row, split, seed, epochs).double()
            ent = metrics.predictive_entropy(probs)
            auroc[row].append(float(metrics.ood_auroc(ent[is_in], ent[~is_in])))
            acc[row].append(float(metrics.accuracy(probs[is_in], y_test[is_in])))
            if seed == seeds[0]:
                entropies[row] = (ent[is_in].numpy(), ent[~is_in].numpy())
            print(f"  {row:34s} seed {seed}: AUROC {auroc[row][-1]:.4f}", flush=True)

    table = [[r, C.mean_sd(auroc[r], 4), C.mean_sd(acc[r], 3)] for r in rows]
    base = statistics.fmean(auroc[ROWS[0]]) if ROWS[0] in auroc else float("nan")
    for line in table:
        diff = statistics.fmean(auroc[line[0]]) - base
        line.append(f"{diff:+.4f}" if line[0] != ROWS[0] and diff == diff else "-")
    mode = "; QUICK smoke run (5 epochs for MAP and vbll, estimator at defaults)" * args.quick
    text = "\n".join(
        [
            "# OOD detection: digits, train on 0-7, OOD = test 8/9",
            "",
            f"{threads}; seeds {seeds}{mode}. n_in = {int(is_in.sum())}, n_out = "
            f"{int((~is_in).sum())}. Score = predictive entropy; mean ± sd over seeds.",
            "",
            C.markdown_table(
                ["method", "AUROC (entropy)", "in-dist. acc", "AUROC - MAP"],
                table,
            ),
        ]
    )
    print()
    print(text)
    stem = args.out or "vbll_ood" + "_quick" * args.quick
    C.write_out(f"{stem}.md", text + "\n")
    print(f"\nfigure: {plot(entropies, auroc, seeds[0], stem)}")


def plot(entropies, auroc, seed: int, stem: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(entropies), figsize=(4.2 * len(entropies), 3.4), sharey=True, squeeze=False
    )
    axes = axes[0]
    top = max(max(a.max(), b.max()) for a, b in entropies.values())
    bins = np.linspace(0.0, max(top, 1e-3), 31)
    for ax, (row, (e_in, e_out)) in zip(axes, entropies.items(), strict=True):
        ax.hist(e_in, bins=bins, density=True, alpha=0.6, label="in (test 0-7)")
        ax.hist(e_out, bins=bins, density=True, alpha=0.6, label="OOD (test 8/9)")
        ax.set_title(f"{row}\nAUROC {statistics.fmean(auroc[row]):.3f}", fontsize=9)
        ax.set_xlabel("predictive entropy (nats)")
    axes[0].set_ylabel(f"density (seed {seed})")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    C.OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = C.OUT_DIR / f"{stem}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()

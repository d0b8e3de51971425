"""Predictive quality of the SG-MCMC estimators at their defaults, beside the MAP baseline.

Protocol (that of ``benchmarks/_common.py``): the 80/20 split with seed 0 (stratified for
digits), inputs standardised with training statistics, diabetes targets standardised (RMSE
and NLL in target standard deviations), 2x128 ReLU MLP. Rows, each over
the training seeds F..F+S-1 (mean ± sd), measured in the same run:

- ``map``: the protocol's MAP net (Adam lr 1e-3, weight decay 1e-4; digits batch 64 / 40
  epochs, diabetes batch 32 / 30 epochs; diabetes noise = training residual variance);
- ``est``: ``bdl.SGMCMCClassifier(random_state=s)`` / ``bdl.SGMCMCRegressor(random_state=s)``
  with nothing else set (2x128 MLP, batch 64, 40 epochs: the MAP budget on digits), fed the
  raw (unstandardised) training arrays: the estimators standardise internally.

Target (issue 5, item 6): digits NLL <= 0.09 and ECE <= 0.02 as the mean of the ``est`` row.

Usage: ``python benchmarks/bench_sgmcmc_quality.py [--seeds 5] [--first-seed 0]
[--rows digits,diabetes:est]`` (``--seeds 5 --first-seed 5``: seeds 5..9).
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common as C
import numpy as np
import torch
from sklearn.datasets import load_diabetes, load_digits
from sklearn.model_selection import train_test_split

from bdl import SGMCMCClassifier, SGMCMCRegressor

TARGETS = {"digits": [("nll", 0.09), ("ece", 0.02)]}
COLUMNS = {
    "digits": [("acc", "acc"), ("nll", "NLL"), ("ece", "ECE"), ("brier", "Brier")],
    "diabetes": [("rmse", "RMSE"), ("nll", "NLL"), ("ice", "interval cal. err.")],
}
REFERENCE = (
    "MAP 0.136/0.022 (seed 0), deep ensemble x5 0.098/0.020, posteriors SGHMC at a hand-picked "
    "lr 0.0955/0.033 (NLL/ECE, benchmarks/RESULTS.md)"
)


def raw_split(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The protocol split before standardisation (the estimators standardise themselves)."""
    if name == "digits":
        x, y = load_digits(return_X_y=True)
        return train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    x, y = load_diabetes(return_X_y=True)
    return train_test_split(x, y, test_size=0.2, random_state=0)


def map_row(split: C.Split, seed: int) -> dict[str, float]:
    net = C.train(split, C.plain_classification if split.classification else C.plain_regression,
                  seed, head_decay=C.WEIGHT_DECAY, clip=None)  # fmt: skip
    _, _, x_test, y_test = split.tensors()
    if split.classification:
        return C.classification_metrics(C.predict_proba(net, x_test), y_test)
    mean, var = C.predict_gaussian(net, x_test, C.training_residual_variance(net, split))
    return C.regression_metrics(mean, var, y_test)


def estimator_row(split: C.Split, seed: int) -> dict[str, float]:
    x_train, x_test, y_train, y_test = raw_split(split.name)
    if split.classification:
        est = SGMCMCClassifier(random_state=seed).fit(x_train, y_train)
        probs = torch.as_tensor(est.predict_proba(x_test))  # classes_ are 0..9 here
        return C.classification_metrics(probs, torch.as_tensor(y_test))
    est = SGMCMCRegressor(random_state=seed).fit(x_train, y_train)
    post = est.posterior(x_test, observation_noise=True)
    # metrics in standardised units, as the protocol's (training mean and sd of y)
    mu, sd = y_train.mean(), y_train.std()
    y_std = torch.as_tensor((y_test - mu) / sd)[:, None]
    return C.regression_metrics((post.mean - mu) / sd, post.variance / sd**2, y_std)


ROWS = {
    "map": ("MAP (Adam, wd 1e-4; diabetes noise = train residual var.)", map_row),
    "est": ("**ours: SGMCMC estimator defaults**", estimator_row),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="number of training seeds S")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds F..F+S-1 (default 0)")
    parser.add_argument(
        "--rows", default="", help="comma-separated substrings of row keys, e.g. digits:est"
    )
    parser.add_argument("--out", default="sgmcmc_quality.md", help="file name in benchmarks/out")
    args = parser.parse_args()
    threads = C.one_thread()
    patterns = [p for p in args.rows.split(",") if p]
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    keys = [f"{d}:{r}" for d in ("digits", "diabetes") for r in ROWS]
    keys = [k for k in keys if C.selected(k, patterns)]
    if not keys:
        raise SystemExit(f"no row matches {args.rows!r}")
    results: dict[str, list[dict[str, float]]] = {}
    times: dict[str, list[float]] = {}
    splits: dict[str, C.Split] = {}
    for seed in seeds:  # alternate the sides seed by seed
        for key in keys:
            dataset, row = key.split(":")
            split = splits.setdefault(dataset, C.load_split(dataset))
            t0 = time.perf_counter()
            res = ROWS[row][1](split, seed)
            times.setdefault(key, []).append(time.perf_counter() - t0)
            results.setdefault(key, []).append(res)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in res.items())
            print(f"  {key:16s} seed {seed}: {shown}  ({times[key][-1]:.1f} s)", flush=True)

    parts = [
        "# SG-MCMC estimator quality at default settings",
        "",
        f"{threads}; seeds {seeds}. Protocol split and metrics of benchmarks/_common.py; "
        "mean ± sd.",
    ]
    for dataset in ("digits", "diabetes"):
        dkeys = [k for k in keys if k.startswith(dataset + ":")]
        if not dkeys:
            continue
        cols = COLUMNS[dataset]
        table = []
        for key in dkeys:
            res = results[key]
            cells = [C.mean_sd([x[c] for x in res], 4 if c == "nll" else 3) for c, _ in cols]
            label = ROWS[key.split(":")[1]][0]
            table.append([label, *cells, f"{statistics.fmean(times[key]):.1f}"])
        parts += ["", f"## {dataset} (n_test = {len(splits[dataset].y_test)})", ""]
        parts.append(C.markdown_table(["method", *(h for _, h in cols), "s / fit"], table))
        est = results.get(f"{dataset}:est")
        if est is not None and dataset in TARGETS:
            checks = []
            for metric, limit in TARGETS[dataset]:
                value = statistics.fmean(x[metric] for x in est)
                checks.append(f"{metric.upper()} {value:.4f} <= {limit} "
                              f"{'PASS' if value <= limit else 'MISS'}")  # fmt: skip
            parts += ["", f"Targets (estimator defaults, mean): {'; '.join(checks)}."]
            parts.append(f"Peers: {REFERENCE}.")
    text = "\n".join(parts) + "\n"
    print()
    print(text)
    print(f"written to {C.write_out(args.out, text)}")


if __name__ == "__main__":
    main()

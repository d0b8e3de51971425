"""Predictive quality of the VBLL heads on digits and diabetes, beside a MAP net and vbll.

Rows, each over 5 training seeds (mean ± sd):

- ``map``: 2x128 ReLU MLP + ``nn.Linear``, Adam lr 1e-3, weight decay 1e-4 everywhere
  (diabetes: Gaussian noise = training residual variance);
- ``est``: our scikit-learn estimators with their default settings (only ``random_state``
  set) -- the rows the targets apply to;
- ``head-*``: our heads in the protocol network and a plain loop (Adam, wd 1e-4 on the body,
  0 on the head, grad clip 1.0, ``num_data = N``);
- ``vbll-*``: the vbll package in the same network (AdamW, wd 1e-4 on the body, 0 on the
  layer, clip 1.0, ``regularization_weight = 1/N``).

Usage: ``python benchmarks/bench_vbll.py [--quick] [--rows digits:map,vbll] [--skip vbll-dense]``.
Row keys: ``digits:{map,est,head-dense,head-diagonal,head-lowrank,head-generative,
vbll-diagonal,vbll-dense}``, ``diabetes:{map,est,head-dense,head-diagonal,head-lowrank,
head-heteroscedastic,vbll-dense-w0.1,vbll-dense-w1.0}``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import _common as C
import torch

from bdl.lastlayer.estimators import VBLLClassifier, VBLLRegressor

# (metric, threshold) per dataset, applied to the mean of the ``est`` row
TARGETS = {"digits": [("nll", 0.085), ("ece", 0.018)], "diabetes": [("nll", 1.20)]}
REFERENCE = {
    "digits": "MAP 0.136/0.022, vbll dense 0.089/0.028 (NLL/ECE)",
    "diabetes": "MAP 1.475, vbll wishart 1.0: 1.287 (NLL)",
}
COLUMNS = {
    "digits": [("acc", "acc"), ("nll", "NLL"), ("ece", "ECE"), ("brier", "Brier")],
    "diabetes": [("rmse", "RMSE"), ("nll", "NLL"), ("ice", "interval cal. err.")],
}


@dataclass
class Row:
    key: str  # "dataset:name"
    label: str
    run: Callable[[C.Split, int, int | None], dict[str, float]]  # (split, seed, epochs)


def protocol_row(factory: C.HeadFactory, *, plain: bool, vbll: bool = False):
    """A row trained by the shared protocol loop; ``plain`` for the MAP baseline."""

    def run(split: C.Split, seed: int, epochs: int | None) -> dict[str, float]:
        net = C.train(
            split,
            factory,
            seed,
            head_decay=C.WEIGHT_DECAY if plain else 0.0,
            clip=None if plain else C.CLIP,
            adamw=vbll,
            epochs=epochs,
        )
        _, _, x_test, y_test = split.tensors()
        if split.classification:
            return C.classification_metrics(C.predict_proba(net, x_test, seed), y_test)
        noise = C.training_residual_variance(net, split) if plain else None
        mean, var = C.predict_gaussian(net, x_test, noise)
        return C.regression_metrics(mean, var, y_test)

    return run


def estimator_row(split: C.Split, seed: int, epochs: int | None) -> dict[str, float]:
    """Our estimator with default settings (``epochs`` is ignored: defaults are the point)."""
    _, _, x_test, y_test = split.tensors()
    if split.classification:
        est = VBLLClassifier(random_state=seed).fit(split.x_train, split.y_train)
        probs = torch.as_tensor(est.predict_proba(split.x_test))
        # columns follow est.classes_, which are 0..C-1 here
        return C.classification_metrics(probs, y_test)
    est = VBLLRegressor(random_state=seed).fit(split.x_train, split.y_train[:, 0])
    post = est.posterior(split.x_test, observation_noise=True)
    return C.regression_metrics(post.mean, post.variance, y_test)


def all_rows() -> list[Row]:
    rows = [
        Row(
            "digits:map",
            "MAP (nn.Linear head)",
            protocol_row(C.plain_classification, plain=True),
        ),
        Row("digits:est", "**ours: VBLLClassifier() defaults**", estimator_row),
    ]
    for name, factory in C.OUR_CLASSIFICATION.items():
        label = "ours head: generative (G-VBLL)" if name == "generative" else f"ours head: {name}"
        rows.append(Row(f"digits:head-{name}", label, protocol_row(factory, plain=False)))
    for param in ("diagonal", "dense"):
        rows.append(
            Row(
                f"digits:vbll-{param}",
                f"vbll 0.4.9 DiscClassification {param}",
                protocol_row(
                    C.vbll_package("classification", parameterization=param),
                    plain=False,
                    vbll=True,
                ),
            )
        )
    rows += [
        Row(
            "diabetes:map",
            "MAP (nn.Linear, noise = train residual var.)",
            protocol_row(C.plain_regression, plain=True),
        ),
        Row("diabetes:est", "**ours: VBLLRegressor() defaults**", estimator_row),
    ]
    for name, factory in C.OUR_REGRESSION.items():
        rows.append(
            Row(f"diabetes:head-{name}", f"ours head: {name}", protocol_row(factory, plain=False))
        )
    for wishart in (0.1, 1.0):
        rows.append(
            Row(
                f"diabetes:vbll-dense-w{wishart}",
                f"vbll 0.4.9 Regression dense, wishart_scale {wishart}",
                protocol_row(
                    C.vbll_package("regression", parameterization="dense", wishart_scale=wishart),
                    plain=False,
                    vbll=True,
                ),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 epochs (smoke run)")
    parser.add_argument("--seeds", type=int, default=5, help="training seeds 0..S-1")
    parser.add_argument(
        "--rows", default="", help="comma-separated substrings of row keys, e.g. digits:map,vbll"
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated substrings of row keys to leave out"
    )
    parser.add_argument("--out", default="", help="output file name in benchmarks/out")
    args = parser.parse_args()
    threads = C.one_thread()
    patterns = [p for p in args.rows.split(",") if p]
    skip = [p for p in args.skip.split(",") if p]
    seeds = C.seeds_for(args.quick, args.seeds)
    epochs = 5 if args.quick else None
    rows = [
        r
        for r in all_rows()
        if C.selected(r.key, patterns) and not (skip and C.selected(r.key, skip))
    ]
    if not rows:
        raise SystemExit(f"no row matches {args.rows!r}; keys: {[r.key for r in all_rows()]}")

    splits: dict[str, C.Split] = {}
    results: dict[str, list[dict[str, float]]] = {}
    times: dict[str, list[float]] = {}
    for row in rows:
        dataset = row.key.split(":")[0]
        split = splits.setdefault(dataset, C.load_split(dataset))
        for seed in seeds:
            t0 = time.perf_counter()
            res = row.run(split, seed, epochs)
            times.setdefault(row.key, []).append(time.perf_counter() - t0)
            results.setdefault(row.key, []).append(res)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in res.items())
            print(f"  {row.key:28s} seed {seed}: {shown}  ({times[row.key][-1]:.1f} s)", flush=True)

    mode = "; QUICK smoke run: 5 epochs for protocol rows, estimators at defaults" * args.quick
    parts = [
        "# VBLL predictive quality",
        "",
        f"{threads}; seeds {seeds}{mode}.",
        "Split 80/20 random_state=0 (stratified for digits), inputs standardised with training "
        "statistics, diabetes targets standardised (RMSE/NLL in target sd). Mean ± sd over seeds.",
    ]
    for dataset in ("digits", "diabetes"):
        drows = [r for r in rows if r.key.startswith(dataset + ":")]
        if not drows:
            continue
        cols = COLUMNS[dataset]
        table = []
        for r in drows:
            res = results[r.key]
            cells = [C.mean_sd([x[k] for x in res], 4 if k == "nll" else 3) for k, _ in cols]
            table.append([r.label, *cells, f"{statistics.fmean(times[r.key]):.1f}"])
        header = ["method", *(h for _, h in cols), "s / fit"]
        parts += ["", f"## {dataset} (n_test = {len(splits[dataset].y_test)})", ""]
        parts.append(C.markdown_table(header, table))
        est = results.get(f"{dataset}:est")
        if est is not None:
            checks = []
            for metric, limit in TARGETS[dataset]:
                value = statistics.fmean(x[metric] for x in est)
                verdict = "PASS" if value <= limit else "MISS"
                checks.append(f"{metric.upper()} {value:.4f} <= {limit} {verdict}")
            parts += ["", f"Targets (estimator defaults, mean): {'; '.join(checks)}."]
            parts.append(f"Peer reference: {REFERENCE[dataset]}.")
    text = "\n".join(parts) + "\n"
    print()
    print(text)
    name = args.out or ("vbll_quality_quick.md" if args.quick else "vbll_quality.md")
    print(f"written to {C.write_out(name, text)}")


if __name__ == "__main__":
    main()

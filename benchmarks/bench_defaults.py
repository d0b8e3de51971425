"""Every estimator at its defaults on data the other benchmarks do not use (issue 10, item 2).

Estimators, each constructed with nothing but ``random_state=seed``: ``bdl.VBLLRegressor``,
``bdl.VBLLClassifier``, ``bdl.SGMCMCRegressor``, ``bdl.SGMCMCClassifier``, ``gp.GPRegressor``,
``gp.SparseGPRegressor`` and ``gp.SparseGPClassifier`` (``method="svgp"``), fed the raw
inputs (they standardise internally). Baselines: scikit-learn's ``MLPClassifier`` of the same
size (``hidden_layer_sizes=(128, 128)``, ``early_stopping=False``, its defaults otherwise,
behind a ``StandardScaler``) and ``GaussianProcessClassifier`` (its defaults, behind a
``StandardScaler``; the fit time is what counts).

Data: classification iris, wine, breast_cancer; regression diabetes, ``make_friedman1``
(n = 500, noise sd 1), ``make_friedman2`` / ``make_friedman3`` (n = 500, noise sd 125 and
0.1: the signal-to-noise ratio 3:1 of Friedman, Ann. Statist. 1991, as used by Breiman,
Mach. Learn. 1996), linnerud's first target (weight; 20 rows, so 5 test points a split:
reported, not held to the target). Synthetic sets are drawn once (``random_state=0``).

Protocol: for every seed a 75/25 split with ``random_state=seed`` (stratified for
classification); ``torch.set_num_threads(1)`` and one BLAS thread; estimators run in turn
within a seed, after one untimed warm-up fit of each. Metrics on the test split, mean over
seeds (± sd where shown):

- classification: accuracy, NLL of ``predict_proba`` clipped at 1e-12, fit time;
- regression: RMSE and NLL in units of the training targets' sd (NLL from the estimator's own
  predictive density ``posterior(X, observation_noise=True).log_prob``), coverage of the
  central 90 % interval ``mean ± 1.645 std`` from ``predict(return_std=True)``, fit time.

Targets: regression coverage within 0.85-0.95; each classifier's NLL <= the MLP's + 0.01 on
the same data set; ``SparseGPClassifier`` fit time <= 10x scikit-learn's GPC on
breast_cancer.

Usage: ``python benchmarks/bench_defaults.py [--seeds 5] [--rows iris,SGMCMC]
[--set SGMCMCClassifier.epochs=100] [--out defaults.md] [--json defaults.json]``
(``--rows``: substrings of ``dataset:estimator`` keys, any match; ``--set``: an explicit
parameter for one estimator, a Python literal, repeatable; the rows show it).
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import _common as C
import numpy as np
import torch
from scipy.stats import norm
from sklearn import datasets
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessClassifier
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import bdl
import gp

Z90 = float(norm.ppf(0.95))
COVERAGE = (0.85, 0.95)
NLL_MARGIN = 0.01
GPC_TIME_FACTOR = 10.0
CLASSIFICATION = ("iris", "wine", "breast_cancer")
REGRESSION = ("diabetes", "friedman1", "friedman2", "friedman3", "linnerud")
#: data sets reported but not held to the targets (too few test points)
INFORMATIVE_ONLY = ("linnerud",)


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of a data set (synthetic ones drawn with ``random_state=0``)."""
    if name in ("iris", "wine", "breast_cancer", "diabetes"):
        return getattr(datasets, f"load_{name}")(return_X_y=True)
    if name == "linnerud":
        x, y = datasets.load_linnerud(return_X_y=True)
        return x, y[:, 0]
    noise = {"friedman1": 1.0, "friedman2": 125.0, "friedman3": 0.1}[name]
    maker = getattr(datasets, f"make_{name}")
    return maker(n_samples=500, noise=noise, random_state=0)


def mlp_classifier(seed: int):
    return make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(128, 128), early_stopping=False, random_state=seed),
    )


def sklearn_gpc(seed: int):
    return make_pipeline(StandardScaler(), GaussianProcessClassifier(random_state=seed))


#: name -> (factory of a seeded estimator, whether it is one of ours)
CLASSIFIERS: dict[str, tuple[Callable, bool]] = {
    "VBLLClassifier": (bdl.VBLLClassifier, True),
    "SGMCMCClassifier": (bdl.SGMCMCClassifier, True),
    "SparseGPClassifier": (gp.SparseGPClassifier, True),
    "MLPClassifier": (mlp_classifier, False),
    "sklearn GPC": (sklearn_gpc, False),
}
REGRESSORS: dict[str, tuple[Callable, bool]] = {
    "VBLLRegressor": (bdl.VBLLRegressor, True),
    "SGMCMCRegressor": (bdl.SGMCMCRegressor, True),
    "GPRegressor": (gp.GPRegressor, True),
    "SparseGPRegressor": (gp.SparseGPRegressor, True),
}


def make(table: dict, name: str, seed: int, overrides: dict[str, dict]):
    factory, ours = table[name]
    if ours:
        return factory(random_state=seed, **overrides.get(name, {}))
    return factory(seed)


def timed_fit(est, x: np.ndarray, y: np.ndarray) -> float:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(x, y)
    return time.perf_counter() - start


def classification_row(est, split) -> dict[str, float]:
    x_tr, x_te, y_tr, y_te = split
    seconds = timed_fit(est, x_tr, y_tr)
    proba = np.clip(est.predict_proba(x_te), 1e-12, None)
    idx = np.searchsorted(est.classes_, y_te)
    return {
        "acc": float(np.mean(est.classes_[proba.argmax(1)] == y_te)),
        "nll": float(-np.mean(np.log(proba[np.arange(len(y_te)), idx]))),
        "time": seconds,
    }


def regression_row(est, split) -> dict[str, float]:
    x_tr, x_te, y_tr, y_te = split
    seconds = timed_fit(est, x_tr, y_tr)
    mean, std = est.predict(x_te, return_std=True)
    with torch.no_grad():
        post = est.posterior(x_te, observation_noise=True)
        log_prob = post.log_prob(torch.as_tensor(y_te, dtype=post.mean.dtype)[:, None])
    sd = float(np.std(y_tr))
    return {
        "rmse": float(np.sqrt(np.mean((mean - y_te) ** 2))) / sd,
        # density of y / sd: -log p(y) - log sd
        "nll": float(-log_prob.double().mean()) - float(np.log(sd)),
        "cover": float(np.mean(np.abs(y_te - mean) <= Z90 * std)),
        "time": seconds,
    }


def split(name: str, seed: int, classification: bool):
    x, y = load(name)
    return train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y if classification else None
    )


def fmt(values: list[float], digits: int = 3, sd: bool = True) -> str:
    if not sd or len(values) == 1:
        return f"{statistics.fmean(values):.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def label(name: str, overrides: dict[str, dict]) -> str:
    params = overrides.get(name, {})
    if not params:
        return name
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in params.items())})"


def good(r: list[dict]) -> list[dict]:
    """The seeds whose fit succeeded."""
    return [x for x in r if "error" not in x]


def mean_of(r: list[dict], key: str) -> float:
    values = [x[key] for x in good(r)]
    return statistics.fmean(values) if values else float("nan")


def cells(r: list[dict], columns: list[tuple[str, int, bool]]) -> list[str]:
    """Seeds column (failures counted) and one mean (± sd) cell per ``(key, digits, sd)``."""
    ok, failed = good(r), len(r) - len(good(r))
    seeds = str(len(ok)) + (f" ({failed} failed)" if failed else "")
    if not ok:
        return [seeds] + ["—"] * len(columns)
    return [seeds] + [fmt([x[k] for x in ok], d, sd) for k, d, sd in columns]


def classification_table(res: dict, overrides: dict[str, dict]) -> list[str]:
    rows = []
    for data in CLASSIFICATION:
        mlp = res.get(f"{data}:MLPClassifier")
        gpc = res.get(f"{data}:sklearn GPC")
        for name, (_, ours) in CLASSIFIERS.items():
            r = res.get(f"{data}:{name}")
            if r is None:
                continue
            nll, t = mean_of(r, "nll"), mean_of(r, "time")
            verdict = ["FAILS" if len(good(r)) < len(r) else ""]
            if ours and mlp is not None:
                ref = mean_of(mlp, "nll") + NLL_MARGIN
                verdict.append(f"NLL {'ok' if nll <= ref else 'MISS'} (≤ {ref:.3f})")
            if name == "SparseGPClassifier" and gpc is not None and data == "breast_cancer":
                ratio = t / mean_of(gpc, "time")
                ok = ratio <= GPC_TIME_FACTOR
                verdict.append(f"time {'ok' if ok else 'MISS'} ({ratio:.0f}× GPC)")
            columns = [("acc", 3, False), ("nll", 3, True), ("time", 2, False)]
            verdict = "; ".join(v for v in verdict if v)
            rows.append([data, label(name, overrides), *cells(r, columns), verdict])
    header = ["data", "estimator", "seeds", "acc", "NLL", "fit s", "target"]
    return [C.markdown_table(header, rows)] if rows else []


def regression_table(res: dict, overrides: dict[str, dict]) -> list[str]:
    rows = []
    for data in REGRESSION:
        for name in REGRESSORS:
            r = res.get(f"{data}:{name}")
            if r is None:
                continue
            cover = mean_of(r, "cover")
            lo, hi = COVERAGE
            verdict = "ok" if lo <= cover <= hi and len(good(r)) == len(r) else "MISS"
            if data in INFORMATIVE_ONLY:
                verdict = f"({verdict}; 5 test points, not held)"
            columns = [("rmse", 3, True), ("nll", 3, True), ("cover", 3, True), ("time", 2, False)]
            rows.append([data, label(name, overrides), *cells(r, columns), verdict])
    header = ["data", "estimator", "seeds", "RMSE / sd", "NLL", "90 % cover", "fit s", "target"]
    return [C.markdown_table(header, rows)] if rows else []


def failures(res: dict) -> list[str]:
    """One line per failed fit: key, seed and the error."""
    lines = []
    for key, r in res.items():
        lines += [f"- {key} seed {i}: {x['error']}" for i, x in enumerate(r) if "error" in x]
    return ["Failed fits:", "", *lines] if lines else []


def warm_up(keys: list[tuple[str, str, bool]], overrides: dict[str, dict]) -> None:
    """One untimed fit of every estimator on 40 rows (first-call costs out of the timings)."""
    for name in dict.fromkeys(k[1] for k in keys):
        data, _, classification = next(k for k in keys if k[1] == name)
        x_tr, _, y_tr, _ = split(data, 0, classification)
        est = make(CLASSIFIERS if classification else REGRESSORS, name, 0, overrides)
        try:
            timed_fit(est, x_tr[:40], y_tr[:40])
        except Exception:  # noqa: BLE001 (reported by the measured fits)
            pass


def parse_overrides(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        name, _, param = key.partition(".")
        if name not in CLASSIFIERS and name not in REGRESSORS or not param or not value:
            raise SystemExit(f"--set wants ESTIMATOR.param=value, got {item!r}")
        out.setdefault(name, {})[param] = ast.literal_eval(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..S-1")
    parser.add_argument("--rows", default="", help="substrings of dataset:estimator keys")
    parser.add_argument("--set", action="append", default=[], help="ESTIMATOR.param=value")
    parser.add_argument("--out", default="defaults.md", help="markdown file in benchmarks/out")
    parser.add_argument("--json", default="", help="also write the per-seed results here")
    args = parser.parse_args()
    threads = C.one_thread()
    overrides = parse_overrides(args.set)
    patterns = [p for p in args.rows.split(",") if p]
    keys = [(d, n, True) for d in CLASSIFICATION for n in CLASSIFIERS]
    keys += [(d, n, False) for d in REGRESSION for n in REGRESSORS]
    keys = [k for k in keys if C.selected(f"{k[0]}:{k[1]}", patterns)]
    if not keys:
        raise SystemExit(f"no row matches {args.rows!r}")
    res: dict[str, list[dict[str, float]]] = {}
    with threadpool_limits(1):
        warm_up(keys, overrides)
        for seed in range(args.seeds):
            for data, name, classification in keys:
                table = CLASSIFIERS if classification else REGRESSORS
                est = make(table, name, seed, overrides)
                part = split(data, seed, classification)
                try:
                    row = (classification_row if classification else regression_row)(est, part)
                    shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items())
                except Exception as err:  # noqa: BLE001 (a failed fit is a result)
                    row = {"error": f"{type(err).__name__}: {err}"}
                    shown = row["error"]
                res.setdefault(f"{data}:{name}", []).append(row)
                print(f"  {data}:{name} seed {seed}: {shown}", flush=True)
    parts = [
        "# Estimator defaults on scikit-learn's bundled and synthetic sets",
        "",
        f"{threads}, one BLAS thread; seeds 0..{args.seeds - 1} of a 75/25 split; "
        "mean (± sd) over seeds.",
        "",
        *classification_table(res, overrides),
        "",
        *regression_table(res, overrides),
        "",
        *failures(res),
    ]
    text = "\n".join(parts)
    print("\n" + text)
    C.OUT_DIR.mkdir(parents=True, exist_ok=True)
    (C.OUT_DIR / args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"overrides": overrides, "results": res}, indent=1))


if __name__ == "__main__":
    main()

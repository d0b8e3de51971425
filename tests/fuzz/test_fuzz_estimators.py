"""Fuzz suite: every estimator against bad, degenerate and odd data.

The property, for every estimator of the contract suite and every perturbation: ``fit`` and
``predict`` / ``predict_proba`` / ``posterior`` either give a correct-looking result (finite
means, non-negative variances, probabilities that sum to one) or raise a ``ValueError`` /
``TypeError`` whose message names the offending argument. Never NaN, inf or a negative
variance, never an internal error.

Two layers: a deterministic grid (every estimator x every named perturbation) and a
hypothesis search over scales, sizes, dtypes and perturbations (bounded examples, derandomised).
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "core"))
from cases import all_cases  # noqa: E402

_, ESTIMATORS = all_cases()
NAMED = re.compile(
    r"\b(X|y|Y|features?|targets?|labels?|classes|class|samples?|n_samples|column|columns|"
    r"dtype|time|times)\b"
)


def _base(case, n=30, seed=0):
    X, y = case.data()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(X), size=min(n, len(X)), replace=False)
    return X[idx].copy(), y[idx].copy()


def _labels_ok(case, y) -> bool:
    return case.task != "classification" or len(np.unique(y)) >= 2


# ---------------------------------------------------------------------------------- mutations
def nan_in_X(X, y, case):
    X[0, 0] = np.nan
    return X, y


def inf_in_X(X, y, case):
    X[1, -1] = np.inf
    return X, y


def nan_in_y(X, y, case):
    y = y.astype(np.float64)
    y[2] = np.nan
    return X, y


def inf_in_y(X, y, case):
    y = y.astype(np.float64)
    y[2] = np.inf
    return X, y


def empty(X, y, case):
    return X[:0], y[:0]


def one_sample(X, y, case):
    return X[:1], y[:1]


def two_samples(X, y, case):
    if case.task == "classification":
        first = [np.flatnonzero(y == c)[0] for c in np.unique(y)[:2]]
        return X[first], y[first]
    return X[:2], y[:2]


def constant_y(X, y, case):
    if case.task == "classification":
        return X, np.zeros_like(y)  # one class: a clear error
    return X, np.full(len(y), 3.5)


def constant_feature(X, y, case):
    X[:, 0] = 7.0
    return X, y


def duplicated_rows(X, y, case):
    return np.concatenate([X, X]), np.concatenate([y, y])


def tiny_scale_X(X, y, case):
    return X * 1e-8, y


def huge_scale_X(X, y, case):
    return X * 1e8, y


def huge_scale_y(X, y, case):
    return X, (y * 1e8 if case.task == "regression" else y)


def tiny_scale_y(X, y, case):
    return X, (y * 1e-8 if case.task == "regression" else y)


def float32_input(X, y, case):
    return X.astype(np.float32), (y.astype(np.float32) if case.task == "regression" else y)


def int_input(X, y, case):
    return np.round(X * 3).astype(np.int64), y


def pandas_input(X, y, case):
    cols = [f"f{i}" for i in range(X.shape[1])]
    return pd.DataFrame(X, columns=cols), pd.Series(y)


def string_labels(X, y, case):
    if case.task == "classification":
        return X, np.array(["cat", "dog", "eel", "fox"])[y]
    return X, y


def one_dimensional_X(X, y, case):
    return X[:, 0], y


def wrong_length_y(X, y, case):
    return X, y[:-1]


MUTATIONS = [
    nan_in_X, inf_in_X, nan_in_y, inf_in_y, empty, one_sample, two_samples, constant_y,
    constant_feature, duplicated_rows, tiny_scale_X, huge_scale_X, huge_scale_y, tiny_scale_y,
    float32_input, int_input, pandas_input, string_labels, one_dimensional_X, wrong_length_y,
]  # fmt: skip


# ---------------------------------------------------------------------------------- property
def _check_outputs(case, est, X):
    """Finite predictions; non-negative variances; probabilities summing to one."""
    Xq = X[:5] if not isinstance(X, pd.DataFrame) else X.iloc[:5]
    post = est.posterior(Xq)
    assert bool(torch.isfinite(post.mean).all()), "posterior mean is not finite"
    assert bool(torch.isfinite(post.variance).all()), "posterior variance is not finite"
    assert bool((post.variance >= 0).all()), "negative posterior variance"
    if case.task == "regression":
        mean, std = est.predict(Xq, return_std=True)
        assert np.isfinite(mean).all() and np.isfinite(std).all() and (std >= 0).all()
    else:
        proba = est.predict_proba(Xq)
        assert np.isfinite(proba).all() and np.allclose(proba.sum(1), 1.0)
        est.predict(Xq)


def check_property(case, X, y):
    """Fit and predict; a raised error must be a ValueError/TypeError naming the argument."""
    est = case.make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence and jitter warnings are allowed
        try:
            est.fit(X, y)
        except (ValueError, TypeError) as err:
            assert NAMED.search(str(err)), f"error does not name the argument: {err!r}"
            return "error"
        _check_outputs(case, est, X)
    return "ok"


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("case", ESTIMATORS, ids=str)
def test_estimator_grid(case, mutation):
    X, y = _base(case)
    X, y = mutation(X, y, case)
    check_property(case, X, y)


@pytest.mark.parametrize("case", ESTIMATORS, ids=str)
@settings(
    max_examples=6, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
@given(
    n=st.integers(min_value=3, max_value=40),
    x_scale=st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6]),
    y_scale=st.sampled_from([1e-6, 1.0, 1e6]),
    shift=st.sampled_from([0.0, 1e4]),
    mutation=st.sampled_from([None, constant_feature, duplicated_rows, float32_input]),
)
def test_estimator_search(case, n, x_scale, y_scale, shift, mutation):
    X, y = _base(case, n=n)
    X = X * x_scale + shift
    if case.task == "regression":
        y = y * y_scale + shift
    if mutation is not None:
        X, y = mutation(X, y, case)
    if not _labels_ok(case, y):
        return
    check_property(case, X, y)

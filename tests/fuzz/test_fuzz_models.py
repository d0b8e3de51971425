"""Fuzz suite: every torch-level model's ``posterior`` against bad and extreme inputs.

Property: a posterior with finite means and non-negative variances, or a ``ValueError`` /
``TypeError`` naming the argument; never NaN, inf or negative variances.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "core"))
from cases import all_cases  # noqa: E402

MODELS, _ = all_cases()
NAMED = re.compile(r"\b(X|x|features?|inputs?|t|times?|t_new|dtype|dims?|shape)\b")
DT = torch.float64


@pytest.fixture(scope="module")
def fitted():
    cache = {}

    def get(case):
        if case.name not in cache:
            torch.manual_seed(0)
            cache[case.name] = case.build(DT)
        return cache[case.name]

    return get


def _query(case, shape=(4,), scale=1.0, dtype=DT):
    gen = torch.Generator().manual_seed(3)
    return ((torch.rand(*shape, case.d, generator=gen, dtype=DT) * 4 - 2) * scale).to(dtype)


def check_posterior(model, X, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            post = model.posterior(X, **kwargs)
        except (ValueError, TypeError) as err:
            assert NAMED.search(str(err)), f"error does not name the argument: {err!r}"
            return "error"
    assert bool(torch.isfinite(post.mean).all()), "posterior mean is not finite"
    assert bool(torch.isfinite(post.variance).all()), "posterior variance is not finite"
    assert bool((post.variance >= 0).all()), "negative posterior variance"
    return "ok"


def _bad_inputs(case):
    good = _query(case)
    nan, inf = good.clone(), good.clone()
    nan[0, 0], inf[1, -1] = float("nan"), float("inf")
    return {
        "nan": nan,
        "inf": inf,
        "empty": good[:0],
        "wrong_width": torch.zeros(3, case.d + 1, dtype=DT),
        "integer": torch.ones(3, case.d, dtype=torch.long),
        "scalar": torch.tensor(1.0, dtype=DT),
        "not_a_tensor": good.numpy().tolist(),
    }


@pytest.mark.parametrize("kind", list(_bad_inputs(MODELS[0])), ids=str)
@pytest.mark.parametrize("case", MODELS, ids=str)
def test_bad_inputs_are_refused_clearly(case, fitted, kind):
    model = fitted(case)
    X = _bad_inputs(case)[kind]
    if kind == "wrong_width" and case.d == 1:
        X = torch.zeros(3, 2, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((ValueError, TypeError)) as info:
            model.posterior(X)
    assert NAMED.search(str(info.value)), f"error does not name the argument: {info.value!r}"


@pytest.mark.parametrize("case", MODELS, ids=str)
@settings(
    max_examples=8, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
@given(
    scale=st.sampled_from([1e-8, 1e-3, 1.0, 1e3, 1e8]),
    shape=st.sampled_from([(1,), (7,), (2, 3), (1, 1, 2)]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    observation_noise=st.booleans(),
)
def test_posterior_at_extreme_and_batched_inputs(
    case, fitted, scale, shape, dtype, observation_noise
):
    model = fitted(case)
    X = _query(case, shape, scale, dtype)
    kwargs = {"observation_noise": observation_noise} if case.noise is not None else {}
    check_posterior(model, X, **kwargs)

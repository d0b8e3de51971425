"""Every regression model and estimator of the library as a BoTorch surrogate.

Parametrised over the contract suite's cases (``cases.py``): ``bdl.bo.as_botorch_model``
takes ``batch x q x d`` inputs and returns ``batch x q x m`` posteriors, differentiable in X,
with deterministic base samples, and BoTorch's analytic and MC acquisitions evaluate on it.
Classification models are refused with a clear error.
"""

from __future__ import annotations

import pytest
import torch
from cases import all_cases

pytest.importorskip("botorch")

from botorch.acquisition import (  # noqa: E402
    LogExpectedImprovement,
    qLogExpectedImprovement,
    qUpperConfidenceBound,
)
from botorch.acquisition.objective import ScalarizedPosteriorTransform  # noqa: E402
from botorch.posteriors import GPyTorchPosterior  # noqa: E402
from botorch.sampling.get_sampler import get_sampler  # noqa: E402

from bdl.bo import as_botorch_model  # noqa: E402

MODEL_CASES, ESTIMATOR_CASES = all_cases()
REGRESSION = [c for c in MODEL_CASES if not c.categorical]
CATEGORICAL = [c for c in MODEL_CASES if c.categorical]
REGRESSORS = [c for c in ESTIMATOR_CASES if c.task == "regression"]
CLASSIFIERS = [c for c in ESTIMATOR_CASES if c.task == "classification"]
B, Q = 3, 4


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(case):
        if case.name not in cache:
            torch.manual_seed(0)
            if hasattr(case, "build"):
                cache[case.name] = case.build(torch.float64)
            else:
                X, y = case.data()
                cache[case.name] = case.make().fit(X, y)
        return as_botorch_model(cache[case.name])

    return get


def _inputs(case, requires_grad=False):
    d = case.d if hasattr(case, "d") else case.n_features
    gen = torch.Generator().manual_seed(1)
    X = torch.rand(B, Q, d, generator=gen, dtype=torch.float64) * 2 - 1
    return X.requires_grad_(requires_grad)


def _has_noise(case) -> bool:
    return getattr(case, "noise", True) is not None


def _scalarize(model):
    m = model.num_outputs
    if m == 1:
        return None
    weights = torch.ones(m, dtype=torch.float64) / m
    return ScalarizedPosteriorTransform(weights)


CASES = REGRESSION + REGRESSORS
IDS = [c.name for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shapes_dtype_and_outputs(case, built):
    model = built(case)
    post = model.posterior(_inputs(case))
    assert post.mean.shape == (B, Q, model.num_outputs)
    assert post.variance.shape == (B, Q, model.num_outputs)
    assert post.mean.dtype == torch.float64
    assert bool((post.variance >= 0).all())
    if _has_noise(case):
        noisy = model.posterior(_inputs(case), observation_noise=True)
        assert noisy.mean.shape == post.mean.shape
        if isinstance(post, GPyTorchPosterior):  # (an ensemble's noise is one realisation)
            assert bool((noisy.variance >= post.variance - 1e-9).all())
    first = model.posterior(_inputs(case), output_indices=[0])
    torch.testing.assert_close(first.mean, post.mean[..., :1])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_base_samples_are_deterministic(case, built):
    model = built(case)
    post = model.posterior(_inputs(case))
    sampler = get_sampler(post, sample_shape=torch.Size([16]), seed=0)
    torch.testing.assert_close(sampler(post), sampler(model.posterior(_inputs(case))))
    assert sampler(post).shape == (16, B, Q, model.num_outputs)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_acquisitions_are_differentiable(case, built):
    model = built(case)
    transform = _scalarize(model)
    X = _inputs(case, requires_grad=True)
    best = torch.tensor(0.0, dtype=torch.float64)
    for acq in (
        qLogExpectedImprovement(model, best_f=best, posterior_transform=transform),
        qUpperConfidenceBound(model, beta=2.0, posterior_transform=transform),
    ):
        value = acq(X)
        assert value.shape == (B,)
        assert bool(torch.isfinite(value).all())
        (grad,) = torch.autograd.grad(value.sum(), X)
        assert bool(torch.isfinite(grad).all())
    analytic = LogExpectedImprovement(model, best_f=best, posterior_transform=transform)
    assert analytic(X[:, :1]).shape == (B,)


@pytest.mark.parametrize("case", CATEGORICAL + CLASSIFIERS, ids=lambda c: c.name)
def test_classification_models_are_refused(case, built):
    model = built(case)
    with pytest.raises(TypeError, match="classification"):
        model.posterior(_inputs(case))

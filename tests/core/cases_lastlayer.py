"""Contract-suite cases of the VBLL family: the heads on features, ``wrap`` results, the
extractor-plus-head network and the two scikit-learn estimators (tiny configurations).

Heads take the inputs of the suite directly as their features (``d = D``).
"""

from __future__ import annotations

import torch
from cases import D, EstimatorCase, ModelCase, classification_data, regression_data
from torch import nn

from bdl.lastlayer import (
    GenerativeVBLLClassification,
    HeteroscedasticVBLLRegression,
    VBLLClassification,
    VBLLNetwork,
    VBLLRegression,
    wrap,
)
from bdl.lastlayer.estimators import VBLLClassifier, VBLLRegressor

C = 3  # classes of classification_data()


def _reg_data(dtype, outputs=1):
    X, y = regression_data(dtype=dtype)
    if outputs == 2:
        y = torch.stack([y, torch.cos(X[:, 0])], -1)
    return X, y


def _cls_data(dtype):
    X, y = classification_data(classes=C)
    return X.to(dtype), y


def _head_case(
    name, make, data, *, noise=None, categorical=False, fit_kwargs=None, noise_takes_inputs=False
):
    fit_kwargs = {"epochs": 5, "seed": 0} if fit_kwargs is None else fit_kwargs

    def build(dtype):
        head = make().to(dtype)
        return head.fit(data(dtype), **fit_kwargs)

    def fresh(dtype):
        torch.manual_seed(123)  # a different initialisation: everything must come from the dict
        return make().to(dtype)

    return ModelCase(
        name=name,
        build=build,
        fresh=fresh,
        noise=noise,
        noise_takes_inputs=noise_takes_inputs,
        joint=not categorical,
        categorical=categorical,
        fit=lambda model: model.fit(data(_dtype_of(model)), **fit_kwargs),
    )


def _dtype_of(model):
    return next(model.parameters()).dtype


def _mlp(d_out):
    return nn.Sequential(
        nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, d_out)
    )


def _wrap_case(name, task, data, *, method="posthoc", noise=None):
    out = 1 if task == "regression" else C

    def make(dtype):
        torch.manual_seed(1)
        return wrap(_mlp(out).to(dtype), task, method=method)

    def fit(model):
        return model.fit(data(_dtype_of(model)), epochs=3, seed=0)

    return ModelCase(
        name=name,
        build=lambda dtype: fit(make(dtype)),
        fresh=make,
        noise=noise,
        joint=task == "regression",
        categorical=task == "classification",
        fit=fit,
    )


def _network(dtype, head):
    torch.manual_seed(2)
    body = nn.Sequential(nn.Linear(D, 8), nn.Tanh())
    return VBLLNetwork(body, head(8)).to(dtype)


def _network_case(name, head, data, *, noise=None, categorical=False):
    def fit(model):
        return model.fit(data(_dtype_of(model)), epochs=3, seed=0)

    return ModelCase(
        name=name,
        build=lambda dtype: fit(_network(dtype, head)),
        fresh=lambda dtype: _network(dtype, head),
        noise=noise,
        joint=not categorical,
        categorical=categorical,
        fit=fit,
    )


MODEL_CASES = [
    _head_case(
        "vbll_regression_dense",
        lambda: VBLLRegression(D, 2),
        lambda dtype: _reg_data(dtype, outputs=2),
        noise=lambda model: model.noise_variance,
    ),
    _head_case(
        "vbll_regression_lowrank",
        lambda: VBLLRegression(D, 1, covariance="lowrank", rank=2),
        _reg_data,
        noise=lambda model: model.noise_variance,
    ),
    _head_case(
        "vbll_regression_diagonal_closed_form",
        lambda: VBLLRegression(D, 1, covariance="diagonal"),
        _reg_data,
        noise=lambda model: model.noise_variance,
        fit_kwargs={"closed_form": True},
    ),
    _head_case(
        "vbll_heteroscedastic",
        lambda: HeteroscedasticVBLLRegression(D, 2),
        lambda dtype: _reg_data(dtype, outputs=2),
        noise=lambda model, X: model.noise_variance(X),  # input-dependent noise
        noise_takes_inputs=True,
    ),
    _head_case(
        "vbll_classification_dense",
        lambda: VBLLClassification(D, C),
        _cls_data,
        categorical=True,
    ),
    _head_case(
        "vbll_classification_lowrank",
        lambda: VBLLClassification(D, C, covariance="lowrank", rank=2),
        _cls_data,
        categorical=True,
    ),
    _head_case(
        "vbll_generative",
        lambda: GenerativeVBLLClassification(D, C),
        _cls_data,
        categorical=True,
    ),
    _wrap_case(
        "vbll_wrap_regression",
        "regression",
        _reg_data,
        noise=lambda model: model.head.noise_variance,
    ),
    _wrap_case(
        "vbll_wrap_regression_finetune",
        "regression",
        _reg_data,
        method="finetune",
        noise=lambda model: model.head.noise_variance,
    ),
    _wrap_case("vbll_wrap_classification", "classification", _cls_data),
    _network_case(
        "vbll_network_regression",
        lambda width: VBLLRegression(width, 1),
        _reg_data,
        noise=lambda model: model.head.noise_variance,
    ),
    _network_case(
        "vbll_network_classification",
        lambda width: VBLLClassification(width, C),
        _cls_data,
        categorical=True,
    ),
]

_TINY = {"hidden_sizes": (8,), "epochs": 2, "random_state": 0}

ESTIMATOR_CASES = [
    EstimatorCase("VBLLRegressor", lambda: VBLLRegressor(**_TINY)),
    EstimatorCase(
        "VBLLRegressor_heteroscedastic",
        lambda: VBLLRegressor(**_TINY, heteroscedastic=True, head_epochs=2),
    ),
    EstimatorCase(
        "VBLLClassifier", lambda: VBLLClassifier(**_TINY), task="classification", joint=False
    ),
    EstimatorCase(
        "VBLLClassifier_generative",
        lambda: VBLLClassifier(**_TINY, head="generative"),
        task="classification",
        joint=False,
    ),
]

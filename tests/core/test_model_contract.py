"""The shared contract every torch-level model honours (BoTorch-style model test base).

Parametrised over every ``ModelCase`` of the family case lists (see ``cases.py``).
"""

from __future__ import annotations

import pytest
import torch
from cases import all_cases

from bdl.core import Model, Posterior

MODEL_CASES, _ = all_cases()
ids = [c.name for c in MODEL_CASES]
DT = torch.float64


@pytest.fixture(scope="module")
def fitted():
    cache: dict[tuple[str, torch.dtype], Model] = {}

    def get(case, dtype=DT):
        key = (case.name, dtype)
        if key not in cache:
            torch.manual_seed(0)
            cache[key] = case.build(dtype)
        return cache[key]

    return get


def _inputs(shape, dtype=DT, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=gen, dtype=torch.float64) * 4 - 2).to(dtype)


def _outputs(case, model):
    return model.num_outputs


@pytest.mark.parametrize("case", MODEL_CASES, ids=ids)
def test_protocol_attributes(case, fitted):
    model = fitted(case)
    assert isinstance(model, Model)
    assert isinstance(model.num_outputs, int) and model.num_outputs >= 1
    assert isinstance(model.batch_shape, torch.Size)


@pytest.mark.parametrize("case", MODEL_CASES, ids=ids)
@pytest.mark.parametrize("shape", [(5,), (2, 4)], ids=["n_d", "b_q_d"])
def test_posterior_shapes(case, fitted, shape):
    model = fitted(case)
    X = _inputs(shape + (case.d,))
    post = model.posterior(X)
    assert isinstance(post, Posterior)
    expected = model.batch_shape + torch.Size(shape) + (model.num_outputs,)
    if len(model.batch_shape) and len(shape) > 1:  # X's batch broadcasts with the model's
        expected = torch.broadcast_shapes(model.batch_shape, shape[:-1]) + shape[-1:]
        expected = expected + (model.num_outputs,)
    assert post.mean.shape == expected
    assert post.variance.shape == expected
    assert bool(torch.isfinite(post.mean).all()) and bool((post.variance >= 0).all())


@pytest.mark.parametrize("case", MODEL_CASES, ids=ids)
def test_posterior_arguments_are_keyword_only(case, fitted):
    model = fitted(case)
    X = _inputs((3, case.d))
    with pytest.raises(TypeError):
        model.posterior(X, True)


@pytest.mark.parametrize("case", [c for c in MODEL_CASES if c.noise is not None], ids=str)
def test_observation_noise_adds_exactly_the_noise_variance(case, fitted):
    model = fitted(case)
    X = _inputs((6, case.d))
    latent = model.posterior(X)
    noisy = model.posterior(X, observation_noise=True)
    noise = case.noise(model, X) if case.noise_takes_inputs else case.noise(model)
    noise = torch.as_tensor(noise, dtype=DT).expand_as(latent.variance)
    torch.testing.assert_close(noisy.mean, latent.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(noisy.variance - latent.variance, noise, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", [c for c in MODEL_CASES if c.joint], ids=str)
@pytest.mark.parametrize("observation_noise", [False, True])
def test_joint_covariance_matches_marginals(case, fitted, observation_noise):
    if observation_noise and case.noise is None:
        pytest.skip("no observation noise for this model")
    model = fitted(case)
    X = _inputs((6, case.d))
    marginal = model.posterior(X, observation_noise=observation_noise)
    joint = model.posterior(X, observation_noise=observation_noise, joint=True)
    torch.testing.assert_close(joint.mean, marginal.mean, rtol=1e-8, atol=1e-10)
    cov = joint.covariance_matrix
    n, m = marginal.mean.shape[-2:]
    assert cov.shape[-2:] == (n * m, n * m)
    diag = cov.diagonal(dim1=-2, dim2=-1).reshape(marginal.variance.shape)
    torch.testing.assert_close(diag, marginal.variance, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(cov, cov.mT)


@pytest.mark.parametrize("case", MODEL_CASES, ids=ids)
@pytest.mark.parametrize("shape", [(3,), (2, 2)], ids=["n_d", "b_q_d"])
def test_gradients_wrt_inputs_match_finite_differences(case, fitted, shape):
    model = fitted(case)
    X = _inputs(shape + (case.d,)).requires_grad_(True)

    def moments(x):
        post = model.posterior(x)
        return post.mean, post.variance

    assert torch.autograd.gradcheck(moments, (X,), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", MODEL_CASES, ids=ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_follows_the_input(case, fitted, dtype):
    model = fitted(case)
    post = model.posterior(_inputs((4, case.d), dtype=dtype))
    assert post.mean.dtype == dtype and post.variance.dtype == dtype


@pytest.mark.parametrize("case", MODEL_CASES, ids=ids)
def test_state_dict_round_trip_into_a_fresh_model(case, fitted):
    model = fitted(case)
    fresh = case.fresh(DT)
    fresh.load_state_dict(model.state_dict())
    X = _inputs((5, case.d))
    a, b = model.posterior(X), fresh.posterior(X)
    torch.testing.assert_close(b.mean, a.mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.variance, a.variance, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", [c for c in MODEL_CASES if c.fit is not None], ids=str)
def test_fit_returns_self_with_history_inside_no_grad(case):
    model = case.fresh(DT)
    with torch.no_grad():
        out = case.fit(model)
    assert out is model
    assert len(model.history_) >= 1
    assert all(v == v for v in model.history_)


@pytest.mark.parametrize("case", [c for c in MODEL_CASES if c.fit is not None], ids=str)
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float64])
def test_fit_under_float64_default_dtype(case, model_dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = case.fresh(model_dtype)
        case.fit(model)
        post = model.posterior(_inputs((3, case.d)))
        assert bool(torch.isfinite(post.mean).all())
    finally:
        torch.set_default_dtype(old)

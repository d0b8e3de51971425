"""bdl.bo adapter: conditioning against gold standards, fantasies, gradients, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("botorch")

from botorch.acquisition import qKnowledgeGradient, qLogExpectedImprovement  # noqa: E402
from botorch.sampling import SobolQMCNormalSampler  # noqa: E402
from gpytorch.kernels import MaternKernel, ScaleKernel  # noqa: E402

import bdl  # noqa: E402
import gp  # noqa: E402
from bdl.bo import ConditionedModel, as_botorch_model  # noqa: E402
from bdl.lastlayer import VBLLRegression  # noqa: E402

DT = torch.float64


def _gp(X, y, noise=0.05):
    kernel = ScaleKernel(MaternKernel(nu=2.5))
    kernel.base_kernel.lengthscale = 0.4
    kernel.outputscale = 1.3
    return gp.ExactGP(kernel, noise=noise).double().set_data(X, y)


def _data(n, d=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=gen, dtype=DT)
    y = torch.sin(4 * X).sum(-1) + 0.1 * torch.randn(n, generator=gen, dtype=DT)
    return X, y


def test_conditioning_an_exact_gp_equals_the_gp_with_the_extra_data():
    X, y = _data(12)
    Xn, yn = _data(3, seed=1)
    Xt = torch.rand(2, 5, 2, dtype=DT)
    conditioned = as_botorch_model(_gp(X, y)).condition_on_observations(Xn, yn[:, None])
    reference = _gp(torch.cat([X, Xn]), torch.cat([y, yn])).posterior(Xt, joint=True)
    post = conditioned.posterior(Xt)
    # same Gaussian conditional computed in two orders: float64 round-off only
    torch.testing.assert_close(post.mean, reference.mean, atol=1e-8, rtol=1e-8)
    cov = post.distribution.covariance_matrix
    torch.testing.assert_close(cov, reference.covariance_matrix, atol=1e-8, rtol=1e-8)
    noisy = conditioned.posterior(Xt, observation_noise=True).variance
    torch.testing.assert_close(noisy - post.variance, torch.full_like(noisy, 0.05))


def test_conditioning_twice_folds_into_one():
    X, y = _data(10)
    (Xa, ya), (Xb, yb) = _data(2, seed=1), _data(3, seed=2)
    base = as_botorch_model(_gp(X, y))
    twice = base.condition_on_observations(Xa, ya[:, None]).condition_on_observations(
        Xb, yb[:, None]
    )
    once = base.condition_on_observations(torch.cat([Xa, Xb]), torch.cat([ya, yb])[:, None])
    assert isinstance(twice, ConditionedModel) and twice.base is base
    Xt = torch.rand(4, 2, dtype=DT)
    torch.testing.assert_close(twice.posterior(Xt).mean, once.posterior(Xt).mean)


def test_conditioning_a_last_layer_is_the_recursive_bayesian_update():
    """Sequential Bayesian linear regression equals the batch posterior (exact, float64)."""
    gen = torch.Generator().manual_seed(0)
    phi = torch.randn(30, 4, generator=gen, dtype=DT)
    y = phi @ torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=DT) + 0.2 * torch.randn(
        30, generator=gen, dtype=DT
    )

    def head(n):
        h = VBLLRegression(4, 1, bias=False, noise_std=0.2, learn_noise=False).double()
        h.fit_closed_form(phi[:n], y[:n, None], learn_noise=False)
        return h

    sequential = as_botorch_model(head(20)).condition_on_observations(phi[20:], y[20:, None])
    batch = head(30)
    Xt = torch.randn(6, 4, generator=gen, dtype=DT)
    reference = batch.posterior(Xt, joint=True)
    torch.testing.assert_close(sequential.posterior(Xt).mean, reference.mean)
    torch.testing.assert_close(
        sequential.posterior(Xt).distribution.covariance_matrix, reference.covariance_matrix
    )


def test_fantasies_and_knowledge_gradient_on_an_estimator():
    rng = np.random.default_rng(0)
    X = rng.random((15, 2))
    model = as_botorch_model(gp.GPRegressor(random_state=0).fit(X, np.sin(5 * X).sum(1)))
    sampler = SobolQMCNormalSampler(torch.Size([4]), seed=0)
    fantasy = model.fantasize(torch.rand(3, 2, dtype=DT), sampler)
    assert fantasy.batch_shape == torch.Size([4])
    assert fantasy.posterior(torch.rand(4, 5, 2, dtype=DT)).mean.shape == (4, 5, 1)
    kg = qKnowledgeGradient(model, num_fantasies=4)
    value = kg(torch.rand(2, 1 + 4, 2, dtype=DT))
    assert value.shape == (2,) and bool(torch.isfinite(value).all())


def test_acquisition_gradient_matches_finite_differences():
    X, y = _data(10)
    model = as_botorch_model(_gp(X, y))
    acq = qLogExpectedImprovement(
        model, best_f=y.max(), sampler=SobolQMCNormalSampler(torch.Size([64]), seed=0)
    )
    Xq = torch.rand(1, 2, 2, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: acq(x), (Xq,), eps=1e-6, atol=1e-5)


def test_sample_ensembles_cannot_be_conditioned():
    rng = np.random.default_rng(0)
    X = rng.random((20, 2))
    est = bdl.SGMCMCRegressor(hidden_sizes=(8,), epochs=20, random_state=0).fit(X, X.sum(1))
    with pytest.raises(NotImplementedError, match="Gaussian"):
        as_botorch_model(est).condition_on_observations(
            torch.rand(2, 2, dtype=DT), torch.rand(2, 1, dtype=DT), noise=torch.full((2, 1), 0.1)
        )


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unfitted"):
        as_botorch_model(gp.GPRegressor())
    with pytest.raises(TypeError, match="obj must be"):
        as_botorch_model(object())
    X, y = _data(8)
    model = as_botorch_model(_gp(X, y))
    with pytest.raises(ValueError, match="output_indices"):
        model.posterior(torch.rand(3, 2, dtype=DT), output_indices=[1])
    with pytest.raises(ValueError, match="Y must have shape"):
        model.condition_on_observations(torch.rand(3, 2, dtype=DT), torch.rand(2, 1, dtype=DT))
    with pytest.raises(ValueError, match="X must have shape"):
        model.posterior(torch.rand(3, dtype=DT))
    assert as_botorch_model(model) is model

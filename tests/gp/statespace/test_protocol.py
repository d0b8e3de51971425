"""``StateSpaceGP`` as a ``bdl.core.Model``: inputs (..., n, 1), dtype, gradients in the
times, joint covariance, fit, likelihoods from ``gp``, transforms that keep FFBS sampling."""

from __future__ import annotations

import pytest
import torch
from gpytorch.kernels import MaternKernel, ScaleKernel

import gp
from bdl.core import Model, Normalize, Standardize, TransformedModel
from gp.statespace import CVISites, StateSpaceGP, StateSpacePosterior, cvi_elbo, kernel_to_sde

DT = torch.float64


def _data(n: int = 25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=DT) * 6
    return t, torch.sin(1.3 * t) + 0.1 * torch.randn(n, generator=g, dtype=DT)


def _model(method: str = "auto") -> StateSpaceGP:
    model = StateSpaceGP(ScaleKernel(MaternKernel(nu=1.5)), noise=0.05, method=method).to(DT)
    return model.set_data(*_data())


def test_protocol_attributes_and_input_forms() -> None:
    model = _model()
    assert isinstance(model, Model) and model.num_outputs == 1
    assert model.batch_shape == torch.Size([])
    t_new = torch.linspace(-1, 7, 9, dtype=DT)
    a, b = model.posterior(t_new), model.posterior(t_new[:, None])
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
    batched = model.posterior(t_new.reshape(3, 3, 1))  # (b, q, 1) query sets, one series
    assert batched.mean.shape == (3, 3, 1)
    torch.testing.assert_close(batched.mean.reshape(9, 1), a.mean, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError):
        model.posterior(t_new, True)
    y2 = torch.stack([_data()[1], _data(seed=1)[1]])
    assert model.set_data(_data()[0], y2).batch_shape == (2,)


@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_joint_covariance_and_observation_noise(method: str) -> None:
    model = _model(method)
    X = torch.tensor([[0.5], [0.55], [3.0], [6.5]], dtype=DT)
    joint = model.posterior(X, joint=True, observation_noise=True)
    marginal = model.posterior(X, observation_noise=True)
    assert isinstance(joint, StateSpacePosterior) and joint.covariance_matrix.shape == (4, 4)
    torch.testing.assert_close(joint.covariance_matrix.diagonal(), marginal.variance[:, 0])
    latent = model.posterior(X)
    torch.testing.assert_close(
        marginal.variance - latent.variance, model.noise.detach().expand(4, 1)
    )


def test_dtype_follows_x() -> None:
    model = _model()
    X = torch.linspace(0, 6, 5, dtype=DT)[:, None]
    post = model.posterior(X.float())
    assert post.dtype == torch.float32 and post.variance.dtype == torch.float32
    torch.testing.assert_close(post.mean, model.posterior(X).mean.float())
    draws = post.rsample(torch.Size([3]))
    assert draws.dtype == torch.float32 and draws.shape == (3, 5, 1)


@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_posterior_is_differentiable_in_the_prediction_times(method: str) -> None:
    model = _model(method)
    t, _ = _data()
    # between the data, outside it, and exactly at training times (zero steps)
    X = torch.cat([torch.tensor([0.3, 6.8], dtype=DT), t[:2]])[:, None].requires_grad_(True)

    def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        post = model.posterior(x, observation_noise=True)
        return post.mean, post.variance

    assert torch.autograd.gradcheck(moments, (X,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_fit_and_the_noise_constraint() -> None:
    model = StateSpaceGP(ScaleKernel(MaternKernel(nu=1.5)), noise=0.3).to(DT)
    t, y = _data(40)
    with torch.no_grad():  # fit enables gradients itself
        assert model.fit((t[:, None], y), max_iter=20) is model
    assert model.history_[-1] < model.history_[0]
    assert model.noise_lower_bound == pytest.approx(gp.likelihoods.NOISE_LOWER_BOUND)
    with pytest.raises(ValueError, match="noise_lower_bound"):
        StateSpaceGP(MaternKernel(nu=0.5), noise=1e-7)
    assert float(StateSpaceGP(MaternKernel(nu=0.5), noise=1e-7, noise_lower_bound=0.0).noise) > 0


def test_poisson_likelihood_from_gp_and_per_datum_elbo() -> None:
    g = torch.Generator().manual_seed(2)
    t = torch.linspace(0, 10, 30, dtype=DT)
    y = torch.poisson(torch.sin(t).exp(), generator=g)
    model = StateSpaceGP(ScaleKernel(MaternKernel(nu=1.5)), likelihood=gp.PoissonLikelihood())
    model = model.to(DT).set_data(t, y)
    with torch.no_grad():
        total = model.log_marginal_likelihood()
        sde = kernel_to_sde(model.kernel, dtype=DT)
        mean = cvi_elbo(model.likelihood, sde, t, y, CVISites())
    assert float(mean) == pytest.approx(float(total) / 30, rel=1e-8)
    post = model.posterior(torch.tensor([[2.5], [11.0]], dtype=DT), joint=True)
    assert post.mean.shape == (2, 1) and post.covariance_matrix.shape == (2, 2)
    assert model.fit(max_iter=3).history_


def test_transformed_model_keeps_ffbs_sampling() -> None:
    model = _model()
    t, y = _data()
    scale, shift = 3.0, -2.0
    outcome = Standardize(1)
    outcome.offset = torch.tensor([shift], dtype=DT)
    outcome.scale = torch.tensor([scale], dtype=DT)
    inputs = Normalize(1).fit(t[:, None])
    inner = StateSpaceGP(ScaleKernel(MaternKernel(nu=1.5)), noise=0.05).to(DT)
    inner.load_state_dict(model.state_dict())
    inner.set_data(inputs(t[:, None]), y)
    wrapped = TransformedModel(inner, inputs, outcome, model_dtype=DT)
    X = torch.tensor([[1.0], [1.2], [4.0]], dtype=DT)
    post = wrapped.posterior(X.float(), observation_noise=True, joint=True)
    assert isinstance(post, StateSpacePosterior) and post.dtype == torch.float32
    ref = inner.posterior(inputs(X), observation_noise=True)
    base = torch.randn(4, *ref.base_sample_shape, dtype=DT)
    draws = post.rsample_from_base_samples(torch.Size([4]), base.float())
    expected = shift + scale * ref.rsample_from_base_samples(torch.Size([4]), base)
    torch.testing.assert_close(draws, expected.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post.covariance_matrix, scale**2 * ref.covariance_matrix.float())

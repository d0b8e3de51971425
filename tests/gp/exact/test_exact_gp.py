"""ExactGP against dense references: value, analytic gradient, posterior, batches, errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from gpytorch.kernels import MaternKernel, RBFKernel, ScaleKernel
from torch.distributions import MultivariateNormal

from bdl.core.linalg import JitterWarning
from gp import ExactGP, GaussianPosterior

DT = torch.float64


def _kernel(kind: str, batch_shape: torch.Size = torch.Size()) -> ScaleKernel:
    base = (
        RBFKernel(batch_shape=batch_shape)
        if kind == "rbf"
        else MaternKernel(nu=1.5, batch_shape=batch_shape)
    )
    return ScaleKernel(base, batch_shape=batch_shape)


def _model(kind: str = "matern", mean: str = "constant") -> ExactGP:
    model = ExactGP(_kernel(kind), noise=0.05, mean=mean).to(DT)
    model.kernel.base_kernel.lengthscale = 0.5
    model.kernel.outputscale = 1.3
    if model.constant is not None:
        with torch.no_grad():
            model.constant.fill_(0.3)
    return model


def _data(n: int = 60, d: int = 2, dtype: torch.dtype = DT) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    X = torch.rand(n, d, generator=g, dtype=DT) * 3
    y = torch.sin(2 * X).sum(-1) + 0.2 * torch.randn(n, generator=g, dtype=DT)
    return X.to(dtype), y.to(dtype)


def _dense_lml(model: ExactGP, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Textbook reference: autograd through torch.distributions.MultivariateNormal."""
    K = model.kernel(X).to_dense()
    K = K + model.noise[..., None, None] * torch.eye(X.shape[-2], dtype=X.dtype)
    mu = model.constant[..., None] if model.constant is not None else torch.zeros(())
    loc = (mu * torch.ones_like(y)).expand(y.shape)
    return MultivariateNormal(loc, covariance_matrix=K).log_prob(y)


def _grads(model: ExactGP, value: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    value.sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["rbf", "matern"])
@pytest.mark.parametrize("mean", ["constant", "zero"])
def test_lml_and_analytic_gradient_equal_dense_reference(kind: str, mean: str) -> None:
    model = _model(kind, mean)
    X, y = _data()
    ours = model.log_marginal_likelihood(X, y)
    ref = _dense_lml(model, X, y)
    assert ours.shape == ()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=0)
    g_ours, g_ref = (
        _grads(model, model.log_marginal_likelihood(X, y)),
        _grads(model, _dense_lml(model, X, y)),
    )
    expected = {"raw_noise", "kernel.raw_outputscale", "kernel.base_kernel.raw_lengthscale"}
    if mean == "constant":
        expected.add("constant")
    assert set(g_ours) == expected
    for name in expected:
        assert g_ref[name].abs().sum() > 0, name
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-8, atol=1e-12, msg=name)


def test_lml_is_a_sum_and_uses_set_data() -> None:
    model = _model()
    X, y = _data(30)
    model.set_data(X, y)
    full = model.log_marginal_likelihood()
    torch.testing.assert_close(full, model.log_marginal_likelihood(X, y))
    # n = 1: closed form, and the sum scales with n (not a mean)
    v = model.kernel.outputscale + model.noise
    one = model.log_marginal_likelihood(X[:1], y[:1])
    expect = -0.5 * ((y[0] - 0.3) ** 2 / v + torch.log(2 * math.pi * v))
    torch.testing.assert_close(one, expect.reshape(()))


@pytest.mark.parametrize("observation_noise", [False, True])
def test_posterior_equals_textbook_formulas(observation_noise: bool) -> None:
    model = _model()
    X, y = _data(40)
    Xs = torch.rand(7, 2, dtype=DT) * 3
    model.set_data(X, y)
    with torch.no_grad():
        post = model.posterior(Xs, observation_noise=observation_noise, joint=True)
        marg = model.posterior(Xs, observation_noise=observation_noise, joint=False)
        K = model.kernel(X).to_dense() + model.noise * torch.eye(40, dtype=DT)
        Ksx, Kss = model.kernel(Xs, X).to_dense(), model.kernel(Xs).to_dense()
        mean = 0.3 + Ksx @ torch.linalg.solve(K, y - 0.3)
        cov = Kss - Ksx @ torch.linalg.solve(K, Ksx.T)
        if observation_noise:
            cov = cov + model.noise * torch.eye(7, dtype=DT)
    assert isinstance(post, GaussianPosterior) and post.is_joint
    assert post.mean.shape == (7, 1) and post.covariance_matrix.shape == (7, 7)
    torch.testing.assert_close(post.mean.squeeze(-1), mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(post.covariance_matrix, cov, rtol=1e-9, atol=1e-10)
    assert not marg.is_joint and marg.variance.shape == (7, 1)
    torch.testing.assert_close(marg.mean, post.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(marg.variance.squeeze(-1), cov.diagonal(), rtol=1e-9, atol=1e-10)


def test_posterior_is_differentiable_in_hyperparameters() -> None:
    model = _model()
    X, y = _data(20)
    model.set_data(X, y)
    post = model.posterior(torch.rand(5, 2, dtype=DT))
    (post.mean.sum() + post.variance.sum()).backward()
    assert model.kernel.base_kernel.raw_lengthscale.grad is not None


def test_jitter_escalation_on_singular_kernel_warns_and_stays_finite() -> None:
    model = ExactGP(RBFKernel(), noise=1e-18, noise_lower_bound=0.0).to(DT)
    x = torch.linspace(0, 1, 40, dtype=DT)
    X = torch.cat([x, x, x]).unsqueeze(-1)  # duplicated inputs: rank-deficient kernel
    y = torch.sin(X.squeeze(-1))
    with pytest.warns(JitterWarning):
        lml = model.log_marginal_likelihood(X, y)
    assert torch.isfinite(lml)
    lml.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.set_data(X, y)
    with pytest.warns(JitterWarning):
        post = model.posterior(x[:5], joint=True)
    assert torch.isfinite(post.mean).all() and torch.isfinite(post.covariance_matrix).all()


def test_bad_input_raises_value_error_naming_the_argument() -> None:
    model = _model()
    X, y = _data(10)
    bad = X.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="X contains NaN"):
        model.log_marginal_likelihood(bad, y)
    bad_y = y.clone()
    bad_y[0] = float("inf")
    with pytest.raises(ValueError, match="y contains NaN or inf"):
        model.set_data(X, bad_y)
    with pytest.raises(ValueError, match="y has shape"):
        model.log_marginal_likelihood(X, y[:-1])
    with pytest.raises(ValueError, match=r"X must have shape \(\.\.\., n, d\) with n >= 1"):
        model.set_data(torch.zeros(0, 2, dtype=DT), torch.zeros(0, dtype=DT))
    model.set_data(X, y)
    with pytest.raises(ValueError, match="X has 3 input dimensions"):
        model.posterior(torch.zeros(4, 3, dtype=DT))
    with pytest.raises(ValueError, match="X contains NaN"):
        model.posterior(torch.full((2, 2), float("nan"), dtype=DT))
    with pytest.raises(ValueError, match="noise"):
        ExactGP(RBFKernel(), noise=-1.0)
    with pytest.raises(ValueError, match="mean"):
        ExactGP(RBFKernel(), mean="linear")
    with pytest.raises(RuntimeError, match="set_data"):
        ExactGP(RBFKernel()).posterior(X)


def test_batch_of_three_equals_three_separate_gps() -> None:
    g = torch.Generator().manual_seed(2)
    X = torch.rand(3, 25, 1, generator=g, dtype=DT) * 4
    y = torch.cos(3 * X.squeeze(-1)) + 0.1 * torch.randn(3, 25, generator=g, dtype=DT)
    Xs = torch.rand(3, 6, 1, generator=g, dtype=DT) * 4
    b = torch.Size([3])
    batched = ExactGP(_kernel("matern", b), noise=torch.tensor([0.05, 0.1, 0.2]), batch_shape=b)
    batched = batched.to(DT)
    batched.kernel.base_kernel.lengthscale = torch.tensor([0.3, 0.5, 0.9], dtype=DT).view(3, 1, 1)
    batched.kernel.outputscale = torch.tensor([1.0, 1.3, 2.0], dtype=DT)
    with torch.no_grad():
        batched.constant.copy_(torch.tensor([0.1, -0.2, 0.3]))
    lml = batched.log_marginal_likelihood(X, y)
    assert lml.shape == (3,)
    lml.sum().backward()
    batched.set_data(X, y)
    post = batched.posterior(Xs, joint=True)
    assert post.mean.shape == (3, 6, 1) and post.covariance_matrix.shape == (3, 6, 6)
    marg = batched.posterior(Xs, joint=False, observation_noise=True)
    for i in range(3):
        single = _model("matern")
        with torch.no_grad():  # copy raw values (python floats would pass through float32)
            single.raw_noise.copy_(batched.raw_noise[i])
            single.kernel.raw_outputscale.copy_(batched.kernel.raw_outputscale[i])
            single.kernel.base_kernel.raw_lengthscale.copy_(
                batched.kernel.base_kernel.raw_lengthscale[i]
            )
            single.constant.copy_(batched.constant[i])
        one = single.log_marginal_likelihood(X[i], y[i])
        torch.testing.assert_close(lml[i], one.detach(), rtol=1e-12, atol=1e-12)
        one.backward()
        torch.testing.assert_close(
            batched.kernel.base_kernel.raw_lengthscale.grad[i].reshape(()),
            single.kernel.base_kernel.raw_lengthscale.grad.reshape(()),
        )
        torch.testing.assert_close(batched.raw_noise.grad[i], single.raw_noise.grad)
        single.set_data(X[i], y[i])
        p1 = single.posterior(Xs[i], joint=True)
        torch.testing.assert_close(post.mean[i], p1.mean)
        torch.testing.assert_close(post.covariance_matrix[i], p1.covariance_matrix)
        p2 = single.posterior(Xs[i], joint=False, observation_noise=True)
        torch.testing.assert_close(marg.variance[i], p2.variance)


def test_shared_hyperparameters_over_a_batch_of_data() -> None:
    model = _model()
    X = torch.rand(2, 15, 2, dtype=DT)
    y = torch.randn(2, 15, dtype=DT)
    lml = model.log_marginal_likelihood(X, y)
    assert lml.shape == (2,)
    for i in range(2):
        torch.testing.assert_close(lml[i], model.log_marginal_likelihood(X[i], y[i]))


def test_state_dict_round_trip() -> None:
    model = _model()
    model.noise = 0.123
    X, y = _data(20)
    other = _model()
    other.noise = 1.0
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(
        other.log_marginal_likelihood(X, y), model.log_marginal_likelihood(X, y)
    )
    assert {"raw_noise", "constant", "kernel.raw_outputscale"} <= set(model.state_dict())
    torch.testing.assert_close(other.noise, torch.tensor(0.123, dtype=DT))


def test_float32_is_finite_and_close_to_float64() -> None:
    X64, y64 = _data(200, d=1)
    m64 = _model()
    m32 = _model().float()
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error", JitterWarning)
        l32 = m32.log_marginal_likelihood(X64.float(), y64.float())
    assert l32.dtype == torch.float32 and torch.isfinite(l32)
    l64 = m64.log_marginal_likelihood(X64, y64)
    assert abs(l32.double().item() - l64.item()) <= 1e-4 * abs(l64.item())
    l32.backward()
    assert all(torch.isfinite(p.grad).all() for p in m32.parameters())
    m32.set_data(X64.float(), y64.float())
    post = m32.posterior(torch.linspace(0, 3, 11).unsqueeze(-1), joint=True)
    assert post.dtype == torch.float32 and torch.isfinite(post.covariance_matrix).all()


# ------------------------------------------------------------------ model protocol (bdl.core)
def test_fit_is_type_ii_maximum_likelihood_with_history() -> None:
    X, y = _data(40)
    model = _model()
    before = float(model.log_marginal_likelihood(X, y))
    assert model.fit((X, y), max_iter=30) is model
    after = float(model.log_marginal_likelihood())
    assert after > before
    assert model.history_[0] == pytest.approx(-before) and model.history_[-1] == pytest.approx(
        -after
    )
    adam = _model().fit((X, y), optimizer="adam", epochs=5)
    assert len(adam.history_) == 6
    with pytest.raises(ValueError, match="batch_size"):
        model.fit(batch_size=10)
    with pytest.raises(ValueError, match="epochs or max_iter"):
        model.fit(epochs=3, max_iter=4)


def test_noise_has_a_gpytorch_lower_bound() -> None:
    from gpytorch.constraints import GreaterThan

    from gp.likelihoods import NOISE_LOWER_BOUND

    model = ExactGP(RBFKernel())
    assert isinstance(model.raw_noise_constraint, GreaterThan)
    assert model.noise_lower_bound == pytest.approx(NOISE_LOWER_BOUND)
    with torch.no_grad():
        model.raw_noise.fill_(-1e3)  # as far down as the optimiser could push it
    assert float(model.noise) == pytest.approx(NOISE_LOWER_BOUND)
    with pytest.raises(ValueError, match="noise_lower_bound"):
        model.noise = 1e-9
    loose = ExactGP(RBFKernel(), noise=1e-9, noise_lower_bound=1e-12).to(DT)
    assert float(loose.noise) == pytest.approx(1e-9, rel=1e-6)
    with pytest.raises(ValueError, match="noise_lower_bound"):
        ExactGP(RBFKernel(), noise_lower_bound=-1.0)


@pytest.mark.parametrize("joint", [False, True])
def test_posterior_follows_the_dtype_of_x_and_is_differentiable_in_x(joint: bool) -> None:
    model = _model()
    X, y = _data(30)
    model.set_data(X, y)
    assert model.num_outputs == 1 and model.batch_shape == torch.Size([])
    Xs = torch.rand(2, 3, 2, dtype=DT)
    post32 = model.posterior(Xs.float(), joint=joint)
    post64 = model.posterior(Xs, joint=joint)
    assert post32.dtype == torch.float32 and post64.dtype == DT
    assert post64.mean.shape == (2, 3, 1)
    torch.testing.assert_close(post32.mean, post64.mean.float())

    def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        post = model.posterior(x, joint=joint, observation_noise=True)
        return post.mean, post.variance

    assert torch.autograd.gradcheck(moments, (Xs.clone().requires_grad_(True),))
    with pytest.raises(TypeError):
        model.posterior(Xs, True)

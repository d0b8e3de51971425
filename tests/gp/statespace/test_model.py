"""``StateSpaceGP`` API: construction, validation, dtype/device, serialisation."""

from __future__ import annotations

import io
import math

import pytest
import torch
from gpytorch.kernels import MaternKernel, RBFKernel, ScaleKernel

import gp
from bdl.core.posterior import GaussianPosterior
from gp.statespace import StateSpaceGP

DT = torch.float64


def _model(noise: float = 0.1) -> StateSpaceGP:
    kernel = ScaleKernel(MaternKernel(nu=1.5)) + MaternKernel(nu=0.5)
    return StateSpaceGP(kernel, noise=noise).to(DT)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tensor([0.3, 2.0, 1.1, 1.1, 4.5, 3.2], dtype=DT)
    return t, torch.cos(t)


def test_public_names() -> None:
    assert gp.StateSpaceGP is StateSpaceGP
    assert callable(gp.kernel_to_sde)


def test_noise_parameterisation() -> None:
    model = StateSpaceGP(MaternKernel(nu=0.5), noise=0.25, noise_lower_bound=1e-8)
    assert math.isclose(model.noise.item(), 0.25, rel_tol=1e-6)
    assert {name for name, _ in model.named_parameters()} == {
        "raw_noise",
        "kernel.raw_lengthscale",
    }
    model.noise = 1e-6
    assert math.isclose(model.noise.item(), 1e-6, rel_tol=1e-5)
    model.noise = torch.tensor(3.0)
    assert math.isclose(model.noise.item(), 3.0, rel_tol=1e-6)


@pytest.mark.parametrize("noise", [-0.1, 0.0, float("nan"), float("inf"), "a", None])
def test_bad_noise_raises(noise: object) -> None:
    with pytest.raises(ValueError, match="noise"):
        StateSpaceGP(MaternKernel(nu=0.5), noise=noise)
    model = StateSpaceGP(MaternKernel(nu=0.5))
    with pytest.raises(ValueError, match="noise"):
        model.noise = noise


def test_unsupported_kernel_raises_at_construction() -> None:
    with pytest.raises(ValueError, match=r"RBFKernel.*MaternKernel\(nu=2.5\)"):
        StateSpaceGP(ScaleKernel(RBFKernel()))


def test_state_dict_round_trip() -> None:
    model = _model(noise=0.3)
    with torch.no_grad():
        model.kernel.kernels[0].base_kernel.raw_lengthscale.fill_(0.4)
        model.kernel.kernels[0].raw_outputscale.fill_(-0.2)
        model.kernel.kernels[1].raw_lengthscale.fill_(1.7)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    loaded = _model(noise=1.0)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    t, y = _data()
    assert torch.equal(loaded.log_marginal_likelihood(t, y), model.log_marginal_likelihood(t, y))
    assert "raw_noise" in model.state_dict()
    assert not any(key.startswith("train_") for key in model.state_dict())  # data is not state


def test_set_data_and_stored_data_lml() -> None:
    model = _model()
    t, y = _data()
    assert model.set_data(t, y) is model
    torch.testing.assert_close(model.log_marginal_likelihood(), model.log_marginal_likelihood(t, y))


def test_column_inputs_are_accepted() -> None:
    model = _model()
    t, y = _data()
    torch.testing.assert_close(
        model.log_marginal_likelihood(t[:, None], y[:, None]), model.log_marginal_likelihood(t, y)
    )
    a = model.set_data(t, y).posterior(t[:2, None])
    assert isinstance(a, GaussianPosterior) and a.mean.shape == (2, 1)


def test_posterior_and_lml_without_data_raise() -> None:
    model = _model()
    with pytest.raises(RuntimeError, match="set_data"):
        model.posterior(torch.zeros(3, dtype=DT))
    with pytest.raises(RuntimeError, match="set_data"):
        model.log_marginal_likelihood()


@pytest.mark.parametrize(
    "t, y, pattern",
    [
        (torch.tensor([0.0, float("nan")]), torch.zeros(2), "t contains NaN"),
        (torch.tensor([0.0, float("inf")]), torch.zeros(2), "t contains NaN or inf"),
        (torch.zeros(3, 2), torch.zeros(3), "y has 3 values but t has 2"),  # (3, 2) = batch
        (torch.zeros(2, 3), torch.zeros(4, 3), "t has batch shape .* must broadcast"),
        (torch.tensor(1.0), torch.zeros(1), "t must have shape"),
        (torch.zeros(0), torch.zeros(0), "t is empty"),
        (torch.zeros(3), torch.zeros(4), "y has 4 values but t has 3"),
        (torch.zeros(3), torch.zeros(3, 2), "y must have shape"),
        (torch.arange(3.0), torch.tensor([0.0, float("inf"), 1.0]), "y contains inf"),
        (torch.zeros(2, dtype=torch.complex64), torch.zeros(2), "t must hold real"),
    ],
)
def test_bad_data_raises(t: torch.Tensor, y: torch.Tensor, pattern: str) -> None:
    model = _model()
    with pytest.raises(ValueError, match=pattern):
        model.log_marginal_likelihood(t, y)
    with pytest.raises(ValueError, match=pattern):
        model.set_data(t, y)


def test_only_one_of_t_and_y_raises() -> None:
    with pytest.raises(ValueError, match="both t and y"):
        _model().log_marginal_likelihood(torch.zeros(3, dtype=DT))


@pytest.mark.parametrize(
    "t_new, pattern",
    [
        (torch.tensor([1.0, float("nan")], dtype=DT), "X contains NaN"),
        (torch.zeros(2, 2, dtype=DT), "X must have 1 input dimensions"),
        (torch.zeros(0, dtype=DT), r"X must have shape \(\.\.\., n, d\) with n >= 1"),
    ],
)
def test_bad_prediction_times_raise(t_new: torch.Tensor, pattern: str) -> None:
    model = _model().set_data(*_data())
    with pytest.raises(ValueError, match=pattern):
        model.posterior(t_new)


def test_integer_times_and_lists_are_accepted() -> None:
    model = StateSpaceGP(MaternKernel(nu=0.5))
    lml = model.log_marginal_likelihood([0, 1, 2], [0.5, -0.2, 0.1])
    assert lml.dtype == torch.get_default_dtype() and torch.isfinite(lml)


def test_dtype_follows_the_data() -> None:
    t, y = _data()
    model32 = StateSpaceGP(MaternKernel(nu=2.5), noise=0.1)  # float32 parameters
    lml64 = model32.log_marginal_likelihood(t, y)
    assert lml64.dtype == DT
    lml64.backward()  # gradients flow back to the float32 parameters
    assert model32.raw_noise.grad is not None and model32.raw_noise.grad.dtype == torch.float32
    model64 = StateSpaceGP(MaternKernel(nu=2.5), noise=0.1).to(DT)
    assert model64.log_marginal_likelihood(t.float(), y.float()).dtype == torch.float32
    post = model64.set_data(t.float(), y.float()).posterior(t.float())
    assert post.dtype == torch.float32
    assert model64.posterior(t).dtype == DT  # mixed: promoted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    model = _model()
    t, y = _data()
    y[2] = float("nan")
    t_new = torch.linspace(-1, 6, 9, dtype=DT)
    lml_cpu = model.log_marginal_likelihood(t, y)
    post_cpu = model.set_data(t, y).posterior(t_new)
    cuda = torch.device("cuda")
    lml = model.log_marginal_likelihood(t.to(cuda), y.to(cuda))  # CPU parameters are moved
    assert lml.device.type == "cuda"
    torch.testing.assert_close(lml.cpu(), lml_cpu, rtol=1e-10, atol=0)
    post = model.to(cuda).set_data(t.to(cuda), y.to(cuda)).posterior(t_new.to(cuda))
    assert post.device.type == "cuda"
    torch.testing.assert_close(post.mean.cpu(), post_cpu.mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(post.variance.cpu(), post_cpu.variance, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="device"):
        model.set_data(t.to(cuda), y)

"""fit_hyperparameters: increases the LML to a stationary point that matches scipy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gpytorch.kernels import MaternKernel, ScaleKernel
from scipy.optimize import minimize

from gp import ExactGP, StateSpaceGP, fit_hyperparameters

DT = torch.float64
TRUE = {"outputscale": 1.5, "lengthscale": 0.7, "noise": 0.05}


def _sample_data(nu: float, n: int = 80, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``y = f + eps`` from a Matérn GP with the hyperparameters ``TRUE``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(n, generator=g, dtype=DT) * 6).values
    kernel = ScaleKernel(MaternKernel(nu=nu)).to(DT)
    kernel.outputscale = TRUE["outputscale"]
    kernel.base_kernel.lengthscale = TRUE["lengthscale"]
    K = kernel(t.unsqueeze(-1)).to_dense().detach() + TRUE["noise"] * torch.eye(n, dtype=DT)
    y = torch.linalg.cholesky(K) @ torch.randn(n, generator=g, dtype=DT)
    return t, y


def _exact(nu: float) -> ExactGP:
    return ExactGP(ScaleKernel(MaternKernel(nu=nu)), noise=0.1, mean="zero").to(DT)


def _hypers(model) -> np.ndarray:
    k = model.kernel
    return np.array([float(k.outputscale), float(k.base_kernel.lengthscale), float(model.noise)])


def _lml(model) -> float:
    with torch.no_grad():
        return float(model.log_marginal_likelihood())


def _grad_norm(model) -> float:
    model.zero_grad()
    (-model.log_marginal_likelihood()).backward()
    return float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())


def _dense_neg_lml(log_theta: np.ndarray, t: np.ndarray, y: np.ndarray) -> float:
    """Reference ``-log N(y; 0, s k_{5/2}(l) + noise I)`` in numpy (independent code)."""
    s, ell, noise = np.exp(log_theta)
    r = np.sqrt(5.0) * np.abs(t[:, None] - t[None, :]) / ell
    K = s * (1 + r + r**2 / 3) * np.exp(-r) + noise * np.eye(len(t))
    L = np.linalg.cholesky(K)
    alpha = np.linalg.solve(L.T, np.linalg.solve(L, y))
    return 0.5 * y @ alpha + np.log(np.diag(L)).sum() + 0.5 * len(t) * np.log(2 * np.pi)


def test_lbfgs_increases_lml_to_a_stationary_point():
    t, y = _sample_data(2.5)
    model = _exact(2.5).set_data(t.unsqueeze(-1), y)
    before = _lml(model)
    history = fit_hyperparameters(model)
    after = _lml(model)
    assert after > before + 1.0
    assert history[0] == pytest.approx(-before) and history[-1] == pytest.approx(-after)
    assert min(history) == pytest.approx(history[-1])
    assert _grad_norm(model) < 1e-3


def test_lbfgs_matches_scipy_on_the_dense_lml():
    t, y = _sample_data(2.5)
    model = _exact(2.5).set_data(t.unsqueeze(-1), y)
    fit_hyperparameters(model, max_iter=200)
    ref = minimize(
        _dense_neg_lml, np.log(_hypers(_exact(2.5))), args=(t.numpy(), y.numpy()),
        method="L-BFGS-B", options={"ftol": 1e-14, "gtol": 1e-9, "maxiter": 1000},
    )  # fmt: skip
    assert ref.success
    ours = -_lml(model)
    assert ours == pytest.approx(ref.fun, abs=1e-6)
    np.testing.assert_allclose(_hypers(model), np.exp(ref.x), rtol=1e-3)


def test_noise_only_fit_matches_a_fine_grid():
    t, y = _sample_data(2.5, seed=3)
    model = _exact(2.5).set_data(t.unsqueeze(-1), y)
    model.kernel.outputscale = TRUE["outputscale"]
    model.kernel.base_kernel.lengthscale = TRUE["lengthscale"]
    for p in model.kernel.parameters():
        p.requires_grad_(False)
    fit_hyperparameters(model)
    grid = np.exp(np.linspace(np.log(1e-3), np.log(1.0), 20001))  # log-step 3.5e-4
    base = np.log([TRUE["outputscale"], TRUE["lengthscale"]])
    values = [_dense_neg_lml(np.r_[base, np.log(s)], t.numpy(), y.numpy()) for s in grid]
    best = grid[int(np.argmin(values))]
    assert float(model.noise) == pytest.approx(best, rel=1e-3)
    assert float(model.kernel.outputscale) == pytest.approx(TRUE["outputscale"])  # frozen


def test_statespace_reaches_the_exact_gp_optimum():
    t, y = _sample_data(1.5, n=60)
    ss = StateSpaceGP(ScaleKernel(MaternKernel(nu=1.5)), noise=0.1).to(DT).set_data(t, y)
    exact = _exact(1.5).set_data(t.unsqueeze(-1), y)
    fit_hyperparameters(ss)
    fit_hyperparameters(exact)
    assert _grad_norm(ss) < 1e-3
    np.testing.assert_allclose(_hypers(ss), _hypers(exact), rtol=1e-3)
    assert _lml(ss) == pytest.approx(_lml(exact), abs=1e-6)


def test_adam_approaches_the_lbfgs_optimum():
    t, y = _sample_data(2.5)
    lbfgs = _exact(2.5).set_data(t.unsqueeze(-1), y)
    fit_hyperparameters(lbfgs)
    adam = _exact(2.5).set_data(t.unsqueeze(-1), y)
    history = fit_hyperparameters(adam, optimizer="adam", max_iter=300, lr=0.05)
    assert len(history) == 301
    assert history[-1] < history[0]
    assert history[-1] == pytest.approx(-_lml(lbfgs), abs=0.05)


def test_max_iter_zero_and_verbose():
    t, y = _sample_data(2.5, n=20)
    model = _exact(2.5).set_data(t.unsqueeze(-1), y)
    before = _hypers(model)
    history = fit_hyperparameters(model, max_iter=0)
    assert len(history) == 1 and np.array_equal(_hypers(model), before)
    assert len(fit_hyperparameters(model, max_iter=3, verbose=True)) >= 2


def test_bad_arguments_raise():
    t, y = _sample_data(2.5, n=10)
    model = _exact(2.5).set_data(t.unsqueeze(-1), y)
    with pytest.raises(ValueError, match="optimizer"):
        fit_hyperparameters(model, optimizer="sgd")
    with pytest.raises(ValueError, match="max_iter"):
        fit_hyperparameters(model, max_iter=-1)
    with pytest.raises(ValueError, match="lr"):
        fit_hyperparameters(model, lr=0.0)
    with pytest.raises(ValueError, match="log_marginal_likelihood"):
        fit_hyperparameters(torch.nn.Linear(2, 2))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit_hyperparameters(model)


def test_hyperparameter_priors_make_the_fit_map():
    """A kernel with a lengthscale prior is fitted by type-II MAP: the objective is
    -log p(y) - log p(lengthscale), and a sharp prior pins the lengthscale near its mode."""
    import math

    from gpytorch.kernels import RBFKernel
    from gpytorch.priors import LogNormalPrior

    from gp.fitting import log_prior

    gen = torch.Generator().manual_seed(0)
    X = torch.rand(30, 1, generator=gen, dtype=torch.float64)
    y = torch.sin(6 * X[:, 0]) + 0.1 * torch.randn(30, generator=gen, dtype=torch.float64)
    free = ExactGP(RBFKernel()).double().set_data(X, y)
    fit_hyperparameters(free)
    prior = LogNormalPrior(math.log(3.0), 0.01)  # mode 3.0 (up to exp(-1e-4))
    pinned = ExactGP(RBFKernel(lengthscale_prior=prior)).double().set_data(X, y)
    history = fit_hyperparameters(pinned)
    assert float(free.kernel.lengthscale) < 1.0
    assert abs(float(pinned.kernel.lengthscale) - 3.0) < 0.1
    with torch.no_grad():
        expected = -pinned.log_marginal_likelihood() - log_prior(pinned)
    assert history[-1] == pytest.approx(float(expected))

"""Thompson sampling: function draws against the posterior they come from; proposals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("botorch")

import bdl  # noqa: E402
import gp  # noqa: E402
from bdl.bo import NoFunctionDraws, draw_functions, thompson_candidates  # noqa: E402

DT = torch.float64
S = 4000


def _data(n=30, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((n, 2))
    return X, np.sin(5 * X[:, 0]) + X[:, 1] + 0.1 * rng.standard_normal(n)


@pytest.fixture(scope="module")
def vbll():
    return bdl.VBLLRegressor(random_state=0).fit(*_data())


@pytest.fixture(scope="module")
def exact_gp():
    return gp.GPRegressor(random_state=0).fit(*_data())


def test_last_layer_draws_have_the_posterior_moments(vbll):
    Xt = torch.rand(5, 2, dtype=DT)
    with torch.no_grad():
        values = draw_functions(vbll, S, seed=0)(Xt)[..., 0]  # (S, 5)
        post = vbll.posterior(Xt, joint=True)
    sd = post.stddev[..., 0]
    # exact Gaussian draws: the sample mean is within 5 standard errors
    assert bool(((values.mean(0) - post.mean[..., 0]).abs() < 5 * sd / S**0.5).all())
    # sample covariance in units of the posterior sds: standard error about 1 / sqrt(S) on
    # every entry (sqrt(2 / S) on the diagonal); 5 standard errors
    scaled = torch.cov(values.T) / (sd[:, None] * sd)
    reference = post.covariance_matrix / (sd[:, None] * sd)
    torch.testing.assert_close(scaled, reference, rtol=0, atol=5 * (2 / S) ** 0.5)


def test_gp_path_draws_match_the_posterior(exact_gp):
    Xt = torch.rand(5, 2, dtype=DT)
    with torch.no_grad():
        values = draw_functions(exact_gp, S, seed=0)(Xt)[..., 0]
        post = exact_gp.posterior(Xt)
    sd = post.stddev[..., 0]
    assert bool(((values.mean(0) - post.mean[..., 0]).abs() < 5 * sd / S**0.5 + 0.05 * sd).all())
    # random Fourier features approximate the prior: spread within 15 %
    ratio = values.std(0) / sd
    assert bool(((ratio > 0.85) & (ratio < 1.15)).all()), ratio


def test_ensemble_draws_are_members():
    X, y = _data()
    est = bdl.SGMCMCRegressor(random_state=0).fit(X, y)
    Xt = torch.rand(4, 2, dtype=DT)
    with torch.no_grad():
        values = draw_functions(est, 3, seed=0)(Xt)
        members = est.posterior(Xt).samples  # (S, 4, 1)
    for draw in values:
        assert bool(((members - draw).abs().amax((-2, -1)) < 1e-10).any())
    assert len({tuple(v.flatten().tolist()) for v in values}) == 3  # without replacement


def test_draws_are_fixed_functions_and_seeded(vbll):
    Xt = torch.rand(3, 2, dtype=DT)
    f = draw_functions(vbll, 2, seed=1)
    torch.testing.assert_close(f(Xt), f(Xt))
    torch.testing.assert_close(f(Xt), draw_functions(vbll, 2, seed=1)(Xt))
    assert f(Xt.unsqueeze(0).expand(4, 3, 2)).shape == (2, 4, 3, 1)


def test_proposals_maximise_the_draws(exact_gp):
    bounds = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=DT)
    X = thompson_candidates(exact_gp, bounds, q=3, seed=0)
    assert X.shape == (3, 2) and bool(((X >= 0) & (X <= 1)).all())
    torch.testing.assert_close(X, thompson_candidates(exact_gp, bounds, q=3, seed=0))
    # the data's maximum is near x = (0.31, 1): a well-determined GP proposes close to it
    assert bool(((X - torch.tensor([0.31, 1.0], dtype=DT)).norm(dim=-1) < 0.2).all()), X
    low = thompson_candidates(exact_gp, bounds, q=1, maximize=False, seed=0)
    assert float(low[0, 1]) < 0.5


def test_models_without_draws_use_a_candidate_set():
    est = gp.SparseGPRegressor(num_inducing=16, epochs=20, random_state=0).fit(*_data())
    with pytest.raises(NoFunctionDraws):
        draw_functions(est, 2)
    bounds = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=DT)
    X = thompson_candidates(est, bounds, q=2, seed=0, num_candidates=256)
    assert X.shape == (2, 2) and bool(((X >= 0) & (X <= 1)).all())


def test_bad_arguments(exact_gp):
    with pytest.raises(ValueError, match="bounds"):
        thompson_candidates(exact_gp, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), q=1)
    with pytest.raises(ValueError, match="num_samples"):
        draw_functions(exact_gp, 0)


def test_conditioned_models_use_their_conditioned_posterior(vbll):
    """Draws of the last fit would ignore the conditioning data: candidate-set sampling on the
    conditioned posterior instead."""
    from bdl.bo import as_botorch_model

    model = as_botorch_model(vbll)
    Xn = torch.rand(10, 2, dtype=DT)
    conditioned = model.condition_on_observations(Xn, torch.full((10, 1), 5.0, dtype=DT))
    with pytest.raises(NoFunctionDraws, match="conditioned"):
        draw_functions(conditioned, 2)
    bounds = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=DT)
    X = thompson_candidates(conditioned, bounds, q=2, seed=0, num_candidates=512)
    # the conditioned posterior is high (about 5) near the new points: proposals go there
    assert float(torch.cdist(X, Xn).min(-1).values.max()) < 0.3

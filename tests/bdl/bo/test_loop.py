"""bdl.bo.BayesOpt: solves small problems, resumes bit-identically, refuses bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("botorch")

from bdl.bo import BayesOpt  # noqa: E402

FAST = dict(num_restarts=4, raw_samples=64)


def quadratic(X):
    """Minimum 0 at x = 0.3 (one input in [0, 1])."""
    return (np.asarray(X)[:, 0] - 0.3) ** 2


def branin(X):
    x1, x2 = X[:, 0], X[:, 1]
    b, c, r, s, t = 5.1 / (4 * np.pi**2), 5 / np.pi, 6.0, 10.0, 1 / (8 * np.pi)
    return (x2 - b * x1**2 + c * x1 - r) ** 2 + s * (1 - t) * np.cos(x1) + s


BRANIN_BOUNDS = [(-5.0, 10.0), (0.0, 15.0)]


def test_a_one_dimensional_problem_is_solved_in_a_few_iterations():
    bo = BayesOpt([(0.0, 1.0)], seed=0, **FAST).run(quadratic, 6)
    assert len(bo.y) == 4 + 6
    assert bo.best_y < 1e-4 and abs(bo.best_x[0] - 0.3) < 1e-2
    best = bo.history["best"]
    assert np.all(np.diff(best) <= 0) and best[-1] == bo.best_y


def test_maximize_flips_the_objective():
    bo = BayesOpt([(0.0, 1.0)], seed=0, maximize=True, **FAST)
    bo.run(lambda X: -quadratic(X), 6)
    assert bo.best_y > -1e-4
    assert np.all(np.diff(bo.history["best"]) >= 0)


@pytest.mark.parametrize(
    "acquisition, q", [("qlognei", 2), ("qucb", 2), ("logei", 1), ("ucb", 1), ("ts", 2)]
)
def test_every_acquisition_runs(acquisition, q):
    bo = BayesOpt(BRANIN_BOUNDS, acquisition=acquisition, q=q, seed=0, **FAST).run(branin, 2)
    assert len(bo.y) == 6 + 2 * q
    assert set(bo.history["batch"]) == {0, 1, 2}


@pytest.mark.parametrize("surrogate", ["svgp", "vbll", "sgmcmc", "ssvi"])
def test_every_surrogate_runs(surrogate):
    bo = BayesOpt(BRANIN_BOUNDS, surrogate=surrogate, seed=0, **FAST).run(branin, 2)
    assert np.isfinite(bo.y).all() and bo.best_y <= bo.y[:6].min()


def test_ensembles_are_refitted_when_conditioning_is_not_possible():
    bo = BayesOpt(BRANIN_BOUNDS, surrogate="sgmcmc", refit_every=3, seed=0, **FAST)
    bo.run(branin, 2)
    assert len(bo.y) == 8 and bo._fitted["n"] == 7  # refitted on the batch before the last


def test_noise_free_objectives_with_clustered_points():
    """The GP surrogate's noise floor keeps the kernel matrix factorisable as points pile up."""
    bo = BayesOpt([(0.0, 1.0)], acquisition="ucb", beta=0.01, seed=0, **FAST)
    bo.run(quadratic, 12)
    assert np.isfinite(bo.y).all()
    assert np.sum(np.abs(bo.X[:, 0] - 0.3) < 1e-2) >= 3  # exploitation clusters points


@pytest.mark.parametrize("surrogate, refit_every", [("gp", 1), ("vbll", 2)])
def test_resume_from_pickle_and_state_dict_is_bit_identical(surrogate, refit_every):
    kwargs = dict(surrogate=surrogate, refit_every=refit_every, q=2, seed=3, **FAST)
    straight = BayesOpt(BRANIN_BOUNDS, **kwargs).run(branin, 4)
    first = BayesOpt(BRANIN_BOUNDS, **kwargs).run(branin, 2)
    pending = first.ask()  # asked, not told, when saved
    resumed = pickle.loads(pickle.dumps(first))
    np.testing.assert_array_equal(resumed.ask(), pending)
    resumed.run(branin, 2)
    np.testing.assert_array_equal(resumed.X, straight.X)
    loaded = BayesOpt(BRANIN_BOUNDS, **kwargs)
    path_state = first.state_dict()
    loaded.load_state_dict(path_state).run(branin, 2)
    np.testing.assert_array_equal(loaded.X, straight.X)


def test_state_dict_loads_with_torch_weights_only(tmp_path):
    bo = BayesOpt([(0.0, 1.0)], seed=0, **FAST).run(quadratic, 1)
    torch.save(bo.state_dict(), tmp_path / "bo.pt")
    state = torch.load(tmp_path / "bo.pt", weights_only=True)
    again = BayesOpt([(0.0, 1.0)], seed=0, **FAST).load_state_dict(state)
    np.testing.assert_array_equal(again.y, bo.y)


def test_ask_is_idempotent_and_tell_checks_its_input():
    bo = BayesOpt([(0.0, 1.0), (0.0, 2.0)], seed=0, n_init=3)
    X = bo.ask()
    assert X.shape == (3, 2)
    np.testing.assert_array_equal(bo.ask(), X)
    with pytest.raises(ValueError, match="y has 2 values"):
        bo.tell(X, [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        bo.tell(X, [1.0, np.nan, 2.0])
    with pytest.raises(ValueError, match="outside bounds"):
        bo.tell(X + 5, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="X must have shape"):
        bo.tell(X[:, :1], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="no observations"):
        _ = bo.best_y


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bounds=[(1.0, 0.0)]), "lower < upper"),
        (dict(bounds=[[0.0, 1.0, 2.0]]), "bounds must have shape"),
        (dict(bounds=[(0.0, 1.0)], surrogate="forest"), "surrogate"),
        (dict(bounds=[(0.0, 1.0)], acquisition="ei"), "acquisition"),
        (dict(bounds=[(0.0, 1.0)], acquisition="logei", q=2), "analytic"),
        (dict(bounds=[(0.0, 1.0)], q=0), "q must be"),
        (dict(bounds=[(0.0, 1.0)], refit_every=0), "refit_every"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BayesOpt(**kwargs)


def test_plot_regret(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    bo = BayesOpt([(0.0, 1.0)], seed=0, **FAST).run(quadratic, 2)
    ax = bo.plot(optimum=0.0, label="gp")
    assert ax.get_yscale() == "log"
    ax.figure.savefig(tmp_path / "regret.png")


def test_a_failed_refit_keeps_the_last_fit_with_a_warning():
    import gp

    class Fragile(gp.GPRegressor):
        def fit(self, X, y):
            if len(y) > 7:
                raise RuntimeError("cholesky failed")
            return super().fit(X, y)

    bo = BayesOpt(BRANIN_BOUNDS, surrogate=lambda seed: Fragile(random_state=seed), seed=0, **FAST)
    with pytest.warns(RuntimeWarning, match="conditioned on the new observations"):
        bo.run(branin, 3)
    assert len(bo.y) == 9 and bo._fitted["n"] == 7  # the fit on 7 points, then conditioned

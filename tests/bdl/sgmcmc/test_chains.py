"""Many chains: merging collectors, gathering one chain per rank (two processes on loopback,
gloo), and cross-chain diagnostics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bdl.core import distributed
from bdl.core.training import tensor_batches, train
from bdl.sgmcmc import (
    SGLD,
    SampleCollector,
    SGMCMCClassifier,
    SGMCMCRegressor,
    chain_diagnostics,
    chain_seed,
    gather_chains,
    merge_chains,
)
from bdl.sgmcmc.chains import chain_draws, multichain_active

DT = torch.float64
ESTIMATOR = dict(hidden_sizes=(8,), epochs=6, batch_size=9, n_cycles=2, samples_per_cycle=3)


def _data(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 3, generator=gen, dtype=DT) * 4 - 2
    return X, torch.sin(X).sum(-1) + 0.1 * torch.randn(n, generator=gen, dtype=DT)


def sgld_chain(seed: int) -> SampleCollector:
    """A torch-level chain: an SGLD-sampled tanh MLP, initialised and driven by ``seed``."""
    X, y = _data()
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    noise = torch.Generator().manual_seed(seed + 1)
    opt = SGLD(net.parameters(), lr=1e-2, num_data=len(X), prior_precision=1.0, generator=noise)
    collector = SampleCollector(net, burn_in=6, thin=3, task="regression")
    train(
        lambda xb, yb: (net(xb)[:, 0] - yb).pow(2).mean(), opt,
        tensor_batches((X, y), 10, torch.Generator().manual_seed(seed)), 5,
        after_step=collector.update,
    )  # fmt: skip
    return collector


def _fit(kind: str, random_state: int):
    X, y = _data()
    if kind == "regressor":
        return SGMCMCRegressor(random_state=random_state, **ESTIMATOR).fit(X.numpy(), y.numpy())
    labels = (y > y.median()).long().numpy()
    return SGMCMCClassifier(random_state=random_state, **ESTIMATOR).fit(X.numpy(), labels)


def chains_worker() -> dict:
    """One chain per rank: a torch-level chain gathered by hand, and the two estimators."""
    X, _ = _data()
    gathered = gather_chains(sgld_chain(chain_seed(10)))
    out = {"samples": gathered.samples, "chain_sizes": gathered.chain_sizes}
    for kind in ("regressor", "classifier"):
        est = _fit(kind, 3)
        out[kind] = {
            "samples": est.model_.model.samples,
            "chain_sizes": est.model_.model.chain_sizes,
            "n_chains": est.n_chains_,
            "diagnostics": est.chain_diagnostics_,
            "prediction": est.predict(X.numpy())
            if kind == "regressor"
            else est.predict_proba(X.numpy()),
        }
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return distributed.spawn(chains_worker, 2, timeout=120, join_timeout=300)


# -- two ranks, one chain each --------------------------------------------------------------
def test_gathered_chains_equal_the_same_chains_run_in_one_process(two_ranks):
    """Rank r's chain is seeded 10 + r; every rank holds both chains, in rank order."""
    reference = merge_chains([sgld_chain(10), sgld_chain(11)])
    for result in two_ranks:
        assert result["chain_sizes"] == reference.chain_sizes == [len(sgld_chain(10))] * 2
        torch.testing.assert_close(result["samples"], reference.samples, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["regressor", "classifier"])
def test_estimator_fit_in_a_process_group_runs_and_gathers_one_chain_per_rank(two_ranks, kind):
    single = [_fit(kind, seed) for seed in (3, 4)]  # the chains of ranks 0 and 1
    samples = torch.cat([est.model_.model.samples for est in single])
    sizes = [est.n_samples_ for est in single]
    X, _ = _data()
    if kind == "regressor":  # a mixture of equally many samples per chain: the mean of means
        expected = np.mean([est.predict(X.numpy()) for est in single], axis=0)
    else:
        expected = np.mean([est.predict_proba(X.numpy()) for est in single], axis=0)
    for result in two_ranks:
        got = result[kind]
        assert got["n_chains"] == 2 and got["chain_sizes"] == sizes
        torch.testing.assert_close(got["samples"], samples, rtol=0, atol=0)
        np.testing.assert_allclose(got["prediction"], expected, rtol=1e-5, atol=1e-6)
        diagnostics = got["diagnostics"]
        assert diagnostics["num_chains"] == 2 and diagnostics["draws_per_chain"] == sizes[0]
        for key in ("rhat_max", "ess_min", "function_rhat_max", "function_ess_median"):
            assert math.isfinite(diagnostics[key]), key
        assert 1.0 <= diagnostics["function_rhat_median"] <= diagnostics["function_rhat_max"]
    assert two_ranks[0][kind]["diagnostics"] == two_ranks[1][kind]["diagnostics"]


# -- one process ----------------------------------------------------------------------------
def test_outside_a_process_group_there_is_one_chain():
    assert not multichain_active() and chain_seed(5) == 5
    est = _fit("regressor", 3)
    assert est.n_chains_ == 1 and est.chain_diagnostics_ is None
    assert est.model_.model.chain_sizes is None
    collector = sgld_chain(1)
    alone = gather_chains(collector)
    assert alone.chain_sizes == [len(collector)] and alone is not collector
    torch.testing.assert_close(alone.samples, collector.samples)


def _filled(samples: torch.Tensor) -> SampleCollector:
    """A collector of nn.Linear(2, 1) (3 parameters) holding ``samples`` (S, 3)."""
    collector = SampleCollector(nn.Linear(2, 1).double(), task="regression")
    collector.load_state_dict(
        {"samples": samples, "buffer_samples": torch.empty(len(samples), 0),
         "num_steps": len(samples), "num_collected": len(samples)}
    )  # fmt: skip
    return collector


def test_merge_chains_concatenates_and_counts_chains():
    a, b = _filled(torch.randn(5, 3, dtype=DT)), _filled(torch.randn(7, 3, dtype=DT))
    merged = merge_chains([a, b])
    assert merged.chain_sizes == [5, 7] and len(merged) == 12 and merged.max_samples is None
    assert merged.num_steps == 12 and a.chain_sizes is None
    torch.testing.assert_close(merged.samples, torch.cat([a.samples, b.samples]))
    again = merge_chains([merged, _filled(torch.randn(2, 3, dtype=DT))])
    assert again.chain_sizes == [5, 7, 2]
    X = torch.randn(4, 2, dtype=DT)
    mixture = merged.posterior(X).samples
    torch.testing.assert_close(mixture, torch.cat([a.posterior(X).samples, b.posterior(X).samples]))
    # the last min(S) draws of every chain
    draws = chain_draws(merged)
    assert draws.shape == (2, 5, 3)
    torch.testing.assert_close(draws[1], b.samples[2:])


def test_chain_sizes_survive_a_state_dict_round_trip_and_are_checked():
    merged = merge_chains([_filled(torch.randn(4, 3, dtype=DT))] * 2)
    state = merged.state_dict()
    assert state["chain_sizes"] == [4, 4]
    fresh = SampleCollector(nn.Linear(2, 1).double(), task="regression")
    fresh.load_state_dict(state)
    assert fresh.chain_sizes == [4, 4]
    with pytest.raises(ValueError, match="add up"):
        fresh.load_state_dict({**state, "chain_sizes": [4, 5]})
    bounded = SampleCollector(nn.Linear(2, 1).double(), max_samples=5, task="regression")
    bounded.load_state_dict(state)  # the oldest were dropped: no longer two whole chains
    assert bounded.chain_sizes is None and len(bounded) == 5
    merged.collect()  # one more sample after merging: the chains no longer add up
    with pytest.raises(ValueError, match="do not add up"):
        chain_diagnostics(merged)


def test_merge_chains_checks_its_arguments():
    with pytest.raises(ValueError, match="non-empty"):
        merge_chains([])
    with pytest.raises(ValueError, match="same network"):
        merge_chains([_filled(torch.randn(2, 3)), SampleCollector(nn.Linear(3, 1))])
    with pytest.raises(ValueError, match="SampleCollector"):
        merge_chains([_filled(torch.randn(2, 3)), "chain"])


def test_chain_diagnostics_tell_mixed_chains_from_stuck_ones():
    gen = torch.Generator().manual_seed(0)
    mixed = merge_chains([_filled(torch.randn(200, 3, generator=gen, dtype=DT)) for _ in range(4)])
    stuck = merge_chains(
        [_filled(torch.randn(200, 3, generator=gen, dtype=DT) + 3 * k) for k in range(4)]
    )
    good = chain_diagnostics(mixed, torch.randn(10, 2, dtype=DT))
    bad = chain_diagnostics(stuck)
    assert good["num_chains"] == 4 and good["draws_per_chain"] == 200
    assert good["rhat_max"] < 1.05 and bad["rhat_median"] > 2.0
    assert good["ess_min"] > 400 and bad["ess_median"] < 50
    assert good["function_rhat_max"] < 1.05 and "function_rhat_max" not in bad
    one = chain_diagnostics(_filled(torch.randn(20, 3, dtype=DT)))
    assert one["num_chains"] == 1 and math.isnan(one["rhat_max"]) and one["ess_min"] > 0
    few = chain_diagnostics(merge_chains([_filled(torch.randn(3, 3, dtype=DT))] * 2))
    assert math.isnan(few["rhat_max"])  # R-hat needs 4 draws per chain
    capped = chain_diagnostics(stuck, max_coordinates=2)
    assert capped["rhat_median"] > 2.0

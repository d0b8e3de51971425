r"""ESS and R-hat on chains with known answers, and agreement with Pyro.

Tolerances
----------
ESS on AR(1) chains: ``R`` independent coordinates of length ``S`` with coefficient ``rho``
have ESS ``S (1 - rho) / (1 + rho)`` (integrated autocorrelation time
``tau = (1 + rho) / (1 - rho)``). The mean over coordinates of ``ESS_hat / ESS`` is compared
with 1 within ``4 sd / sqrt(R)`` (Monte Carlo error, ``sd`` the empirical spread over
coordinates) plus a truncation-bias allowance: Geyer's sequence keeps roughly one pair sum
past the point where the true pair sums vanish, and a clamped pair of standard deviation
``sigma_P ~ sqrt(2 tau / S)`` (Bartlett) adds at most ``~2 sigma_P`` to ``tau``, i.e. a
relative bias ``2 sqrt(2 / (tau S))``.

R-hat on iid chains: with ``m = 2C`` half-chains of ``n`` draws, ``B/W ~ chi2_{m-1}/(m-1)``
(mean 1, sd ``sqrt(2/(m-1))``) and ``R_hat - 1 ~ (B/W - 1) / (2n)``, so
``|R_hat - 1| <= 4 sqrt(2/(m-1)) / (2n)`` at 4 sigma.
"""

from __future__ import annotations

import math

import numpy as np
import pyro.ops.stats as pyro_stats
import pytest
import torch
from scipy.signal import lfilter

from bdl.sgmcmc import effective_sample_size, rhat


def ar1(num_steps: int, num_coords: int, rho: float, seed: int) -> np.ndarray:
    """Stationary AR(1) chains ``x_t = rho x_{t-1} + sqrt(1 - rho^2) e_t``, shape (S, R)."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((num_steps, num_coords)) * math.sqrt(1 - rho**2)
    e[0] /= math.sqrt(1 - rho**2)  # x_0 ~ N(0, 1): start in stationarity
    return lfilter([1.0], [1.0, -rho], e, axis=0)


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_ess_of_ar1_chain(rho: float) -> None:
    num_steps, num_coords = 4000, 200
    x = ar1(num_steps, num_coords, rho, seed=1)
    ess = effective_sample_size(x)
    assert ess.shape == (num_coords,)
    ratio = ess / (num_steps * (1 - rho) / (1 + rho))
    tau = (1 + rho) / (1 - rho)
    tol = 4 * ratio.std().item() / math.sqrt(num_coords) + 2 * math.sqrt(2 / (tau * num_steps))
    assert abs(ratio.mean().item() - 1.0) < tol


def test_ess_matches_pyro() -> None:
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 51, 3), (3, 40, 2), (2, 2, 1)]:
        x = torch.randn(*shape, generator=g, dtype=torch.float64).cumsum(1)
        ours = effective_sample_size(x, multichain=True)
        torch.testing.assert_close(ours, pyro_stats.effective_sample_size(x), rtol=1e-12, atol=0)
    single = torch.randn(30, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        effective_sample_size(single), pyro_stats.effective_sample_size(single.unsqueeze(0))
    )
    assert effective_sample_size(torch.randn(10)).shape == ()


def test_ess_is_linear_in_memory_for_many_draws() -> None:
    # Pyro's own cummin would allocate (S/2)^2 * P = 2.5e9 numbers here.
    x = torch.randn(10_000, 100)
    assert torch.isfinite(effective_sample_size(x)).all()


@pytest.mark.parametrize("rank_normalise", [True, False])
def test_rhat_iid_chains_close_to_one(rank_normalise: bool) -> None:
    g = torch.Generator().manual_seed(2)
    num_chains, num_draws = 4, 1000
    x = torch.randn(num_chains, num_draws, 3, generator=g, dtype=torch.float64)
    r = rhat(x, rank_normalise=rank_normalise)
    assert r.shape == (3,)
    m, n = 2 * num_chains, num_draws // 2
    assert (r - 1).abs().max() < 4 * math.sqrt(2 / (m - 1)) / (2 * n)


@pytest.mark.parametrize("rank_normalise", [True, False])
def test_rhat_detects_shifted_chain(rank_normalise: bool) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 500, 2, generator=g, dtype=torch.float64)
    x[3] += 2.0
    assert (rhat(x, rank_normalise=rank_normalise) > 1.1).all()


def test_rank_normalised_rhat_detects_scale_difference_and_is_rank_invariant() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 1000, generator=g, dtype=torch.float64)
    x[0] *= 4.0  # same mean, different scale: plain split-R-hat misses it, the tail R-hat not
    assert rhat(x, rank_normalise=False) < 1.1
    assert rhat(x) > 1.1
    y = torch.randn(4, 200, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(rhat(torch.exp(y)), rhat(y))  # invariant to monotone maps


def test_plain_rhat_matches_pyro() -> None:
    x = torch.randn(3, 101, 2, dtype=torch.float64)
    torch.testing.assert_close(
        rhat(x, rank_normalise=False), pyro_stats.split_gelman_rubin(x), rtol=1e-12, atol=0
    )


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="chain"):
        effective_sample_size(torch.randn(1, 3))
    with pytest.raises(ValueError, match="chain"):
        effective_sample_size(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="chains"):
        rhat(torch.randn(1, 10))
    with pytest.raises(ValueError, match="chains"):
        rhat(torch.randn(2, 3))
    with pytest.raises(ValueError, match="chains"):
        rhat(torch.randn(5))

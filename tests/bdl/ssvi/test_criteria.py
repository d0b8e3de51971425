"""Closed-form removal scores against Monte Carlo (2e6 draws)."""

from __future__ import annotations

import pytest
import torch

from bdl.ssvi import CRITERIA, removal_score
from bdl.ssvi.criteria import folded_normal_moments

N = 2_000_000
MU = torch.tensor([0.3, -1.2, 0.0, 2.0, 0.05], dtype=torch.float64)
SD = torch.tensor([0.5, 0.3, 1.0, 0.7, 0.02], dtype=torch.float64)


@pytest.fixture(scope="module")
def draws():
    gen = torch.Generator().manual_seed(0)
    return (MU + SD * torch.randn(N, 5, generator=gen, dtype=torch.float64)).abs()


def _close(exact, samples):
    """Exact moment within 5 Monte Carlo standard errors of the sample mean."""
    se = samples.std(0) / N**0.5
    assert bool(((exact - samples.mean(0)).abs() < 5 * se + 1e-12).all()), (exact, samples.mean(0))


def test_folded_normal_moments(draws):
    mean_abs, var_abs = folded_normal_moments(MU, SD)
    _close(mean_abs, draws)
    _close(var_abs, (draws - draws.mean(0)) ** 2)


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_exponential_moment(draws, lam):
    _close(removal_score(MU, SD, "exp_abs", lam), torch.exp(lam * draws))


def test_signal_to_noise_scores(draws):
    e = torch.exp(draws)
    # ratios of sample moments: a few 1e-3 relative error at 2e6 draws (more for the
    # heavy-tailed exp |theta| at sd 1)
    snr = draws.mean(0) / draws.std(0)
    torch.testing.assert_close(removal_score(MU, SD, "snr_abs"), snr, rtol=5e-3, atol=0)
    snr_exp = e.mean(0) / e.std(0)
    torch.testing.assert_close(removal_score(MU, SD, "snr_exp_abs"), snr_exp, rtol=1e-2, atol=0)
    torch.testing.assert_close(removal_score(MU, SD, "snr"), MU.abs() / SD)
    torch.testing.assert_close(removal_score(MU, SD, "mean"), MU.abs())


def test_zero_scale_is_finite_and_unknown_criteria_named():
    for c in CRITERIA:
        s = removal_score(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0]), c)
        assert bool(torch.isfinite(s).all())
    with pytest.raises(ValueError, match="criterion"):
        removal_score(MU, SD, "magnitude")

"""Degenerate posteriors: zero variance is a point mass, invalid moments are refused.

A Gaussian with zero variance is the point mass at its mean; its ``log_prob`` is the log of
a probability mass (0 at the mean, -inf elsewhere), never NaN. Negative, NaN or infinite
variances and non-finite means are refused when the posterior is built (as torch's
``Normal`` does with argument validation).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bdl.core import CategoricalPosterior, GaussianPosterior, SamplePosterior

DT = torch.float64


def test_negative_or_nan_variance_is_refused_at_construction():
    mean = torch.zeros(3, 1, dtype=DT)
    for bad in (-1.0, float("nan"), float("inf")):
        var = torch.ones(3, 1, dtype=DT)
        var[1, 0] = bad
        with pytest.raises(ValueError, match="variance"):
            GaussianPosterior(mean, variance=var)
        cov = torch.diag_embed(var[:, 0])
        with pytest.raises(ValueError, match="covariance"):
            GaussianPosterior(mean, covariance=cov)


def test_non_finite_mean_is_refused_at_construction():
    for bad in (float("nan"), float("inf")):
        mean = torch.zeros(3, 1, dtype=DT)
        mean[0, 0] = bad
        with pytest.raises(ValueError, match="mean"):
            GaussianPosterior(mean, variance=torch.ones(3, 1, dtype=DT))


def test_non_finite_covariance_entry_is_refused():
    cov = torch.eye(3, dtype=DT)
    cov[0, 1] = cov[1, 0] = float("nan")
    with pytest.raises(ValueError, match="covariance"):
        GaussianPosterior(torch.zeros(3, 1, dtype=DT), covariance=cov)


def test_zero_variance_is_a_point_mass():
    mean = torch.tensor([[0.5], [1.0], [2.0]], dtype=DT)
    var = torch.tensor([[0.0], [4.0], [0.0]], dtype=DT)
    post = GaussianPosterior(mean, variance=var)
    y = torch.tensor([[0.5], [1.5], [2.5]], dtype=DT)
    lp = post.log_prob(y)
    # point 0 sits on its atom (log mass 0), point 2 misses it (-inf), point 1 is N(1, 4)
    normal = torch.distributions.Normal(torch.tensor(1.0, dtype=DT), torch.tensor(2.0, dtype=DT))
    expected = torch.tensor([0.0, float(normal.log_prob(torch.tensor(1.5, dtype=DT))), -math.inf])
    torch.testing.assert_close(lp, expected.to(DT))
    assert float(post.joint_log_prob(y)) == -math.inf
    assert float(post.joint_log_prob(mean)) == pytest.approx(float(normal.log_prob(mean[1, 0])))
    # draws sit on the atom; stddev and intervals collapse there
    draws = post.rsample(torch.Size([4]))
    torch.testing.assert_close(draws[:, 0], mean[0].expand(4, 1))
    lower, upper = post.confidence_region(0.9)
    assert lower[0, 0] == upper[0, 0] == mean[0, 0]


def test_zero_variance_log_prob_has_finite_gradients():
    mean = torch.zeros(2, 1, dtype=DT, requires_grad=True)
    var = torch.tensor([[0.0], [1.0]], dtype=DT, requires_grad=True)
    lp = GaussianPosterior(mean, variance=var).log_prob(torch.tensor([[0.0], [0.3]], dtype=DT))
    lp.sum().backward()
    assert bool(torch.isfinite(mean.grad).all()) and bool(torch.isfinite(var.grad).all())
    # only the non-degenerate point contributes: d/dmu log N(0.3 | mu, 1) = 0.3 - mu
    torch.testing.assert_close(mean.grad, torch.tensor([[0.0], [0.3]], dtype=DT))


def test_all_zero_joint_posterior_samples_and_scores_without_nan():
    mean = torch.arange(3, dtype=DT).unsqueeze(-1)
    post = GaussianPosterior(mean, covariance=torch.zeros(3, 3, dtype=DT))
    torch.testing.assert_close(post.rsample(torch.Size([2])), mean.expand(2, 3, 1))
    assert not bool(torch.isnan(post.log_prob(mean)).any())


def test_joint_with_a_zero_variance_point_factorises_exactly():
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=DT)
    cov = torch.zeros(3, 3, dtype=DT)
    cov[0::2, 0::2] = A  # point 1 has zero variance (so zero covariance with the others)
    mean = torch.tensor([[0.1], [0.2], [0.3]], dtype=DT)
    post = GaussianPosterior(mean, covariance=cov)
    y = torch.tensor([[0.4], [0.2], [-0.1]], dtype=DT)
    gaussian = torch.distributions.MultivariateNormal(mean[0::2, 0], covariance_matrix=A)
    expected = gaussian.log_prob(y[0::2, 0])
    torch.testing.assert_close(post.joint_log_prob(y), expected)
    assert float(post.joint_log_prob(y + 0.01)) == -math.inf  # off the atom
    # draws: exact on the atom, the right covariance elsewhere
    base = torch.randn(20000, 3, 1, dtype=DT, generator=torch.Generator().manual_seed(0))
    draws = post.rsample_from_base_samples(torch.Size([20000]), base)[..., 0]
    assert bool((draws[:, 1] == 0.2).all())
    torch.testing.assert_close(post.scale_tril @ post.scale_tril.mT, cov)


def test_one_draw_sample_posterior_is_the_point_mass_at_the_draw():
    draw = torch.tensor([[[1.0], [2.0]]], dtype=DT)  # S = 1, n = 2, m = 1
    post = SamplePosterior(draw)
    assert float(post.variance.abs().max()) == 0.0
    torch.testing.assert_close(post.log_prob(draw[0]), torch.zeros(2, dtype=DT))
    off = draw[0] + torch.tensor([[0.0], [0.1]], dtype=DT)
    torch.testing.assert_close(post.log_prob(off), torch.tensor([0.0, -math.inf], dtype=DT))
    assert float(post.joint_log_prob(draw[0])) == 0.0
    assert float(post.joint_log_prob(off)) == -math.inf
    torch.testing.assert_close(post.rsample(torch.Size([3])), draw.expand(3, 2, 1))


def test_identical_draws_are_a_point_mass_too():
    draws = torch.full((4, 2, 1), 0.25, dtype=DT)
    post = SamplePosterior(draws)
    assert float(post.log_prob(draws[0]).sum()) == 0.0


def test_sample_posterior_with_zero_noise_components_never_gives_nan():
    draws = torch.tensor([[[0.0]], [[1.0]]], dtype=DT)  # S = 2, n = 1
    noise = torch.tensor([[[0.0]], [[1.0]]], dtype=DT)  # the first member is noiseless
    post = SamplePosterior(draws, noise_variance=noise)
    # y off the atom: only the Gaussian member has density, (1/2) N(y | 1, 1)
    y = torch.tensor([[0.5]], dtype=DT)
    normal = torch.distributions.Normal(torch.tensor(1.0, dtype=DT), torch.tensor(1.0, dtype=DT))
    expected = float(normal.log_prob(torch.tensor(0.5, dtype=DT))) - math.log(2.0)
    assert float(post.log_prob(y)) == pytest.approx(expected)
    assert not bool(torch.isnan(post.log_prob(torch.zeros(1, 1, dtype=DT))).any())


def test_sample_posterior_refuses_nan_noise_variance():
    with pytest.raises(ValueError, match="noise_variance"):
        SamplePosterior(torch.zeros(2, 3, 1), noise_variance=float("nan"))


def test_categorical_log_prob_with_string_labels_points_to_classes():
    post = CategoricalPosterior(torch.full((3, 2), 0.5))
    with pytest.raises(ValueError, match="classes_"):
        post.log_prob(np.array(["a", "b", "a"]))
    with pytest.raises(ValueError, match="y"):
        post.joint_log_prob(["a", "b", "a"])


def test_log_prob_refuses_non_finite_observations():
    gauss = GaussianPosterior(torch.zeros(3, 1, dtype=DT), variance=torch.ones(3, 1, dtype=DT))
    samples = SamplePosterior(torch.randn(4, 3, 1, dtype=DT), noise_variance=0.1)
    for post in (gauss, samples):
        for bad in (float("nan"), float("inf")):
            y = torch.zeros(3, 1, dtype=DT)
            y[1, 0] = bad
            with pytest.raises(ValueError, match="y contains NaN or inf"):
                post.log_prob(y)
            with pytest.raises(ValueError, match="y contains NaN or inf"):
                post.joint_log_prob(y)

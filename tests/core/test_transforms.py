"""Input and outcome transforms: statistics, round trips, posteriors in original units."""

from __future__ import annotations

import pytest
import torch

from bdl.core import GaussianPosterior, SamplePosterior
from bdl.core.transforms import Normalize, Standardize

DT = torch.float64


def _data(n=50, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen, dtype=DT) * torch.tensor([1.0, 5.0, 0.1], dtype=DT) + 3


def test_normalize_zscore_statistics_and_round_trip():
    X = _data()
    t = Normalize(3).fit(X)
    Z = t(X)
    torch.testing.assert_close(Z.mean(0), torch.zeros(3, dtype=DT), atol=1e-12, rtol=0)
    torch.testing.assert_close(Z.std(0, unbiased=False), torch.ones(3, dtype=DT))
    torch.testing.assert_close(t.untransform(Z), X)


def test_normalize_bounds_maps_to_unit_cube():
    X = _data()
    t = Normalize(3, method="bounds").fit(X)
    Z = t(X)
    torch.testing.assert_close(Z.amin(0), torch.zeros(3, dtype=DT))
    torch.testing.assert_close(Z.amax(0), torch.ones(3, dtype=DT))
    fixed = Normalize(2, method="bounds", bounds=torch.tensor([[0.0, -1.0], [2.0, 1.0]]))
    fixed.fit(torch.randn(5, 2))  # explicit bounds are kept
    torch.testing.assert_close(fixed(torch.tensor([[1.0, 0.0]])), torch.tensor([[0.5, 0.5]]))


def test_constant_columns_keep_unit_scale():
    X = torch.cat([torch.full((10, 1), 7.0, dtype=DT), torch.arange(10.0, dtype=DT)[:, None]], 1)
    t = Normalize(2).fit(X)
    assert float(t.scale[0]) == 1.0
    assert bool(torch.isfinite(t(X)).all())
    s = Standardize(1).fit(torch.full((10,), 3.5, dtype=DT))
    assert float(s.scale[0]) == 1.0 and float(s.offset[0]) == 3.5


def test_transforms_are_differentiable_and_keep_dtype():
    t = Normalize(3).fit(_data())
    X = torch.randn(2, 4, 3, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(t, (X,))
    assert t(X.float()).dtype == torch.float32


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="X"):
        Normalize(3).fit(torch.tensor([[float("nan"), 1.0, 2.0]]))
    with pytest.raises(ValueError, match="columns"):
        Normalize(3).fit(torch.randn(4, 2))
    with pytest.raises(ValueError, match="method"):
        Normalize(3, method="minmax")
    with pytest.raises(ValueError, match="Y"):
        Standardize(1).fit(torch.empty(0, 1))


def test_standardize_untransforms_gaussian_posteriors_exactly():
    Y = _data()[:, :2]
    t = Standardize(2).fit(Y)
    gen = torch.Generator().manual_seed(3)
    mean = torch.randn(4, 2, generator=gen, dtype=DT)
    A = torch.randn(8, 8, generator=gen, dtype=DT)
    cov = A @ A.mT + torch.eye(8, dtype=DT)
    post = t.untransform_posterior(GaussianPosterior(mean, covariance=cov))
    s = t.scale.repeat(4)  # interleaved (point, output) order
    torch.testing.assert_close(post.mean, mean * t.scale + t.offset)
    torch.testing.assert_close(post.covariance_matrix, cov * s[:, None] * s[None, :])
    # samples of the transformed posterior equal transformed samples of the original one
    base = torch.randn(5, 4, 2, generator=gen, dtype=DT)
    orig = GaussianPosterior(mean, covariance=cov).rsample_from_base_samples(torch.Size([5]), base)
    torch.testing.assert_close(
        post.rsample_from_base_samples(torch.Size([5]), base), orig * t.scale + t.offset
    )


def test_standardize_log_det_jacobian_converts_densities():
    Y = _data()[:, :1]
    t = Standardize(1).fit(Y)
    z = t(Y)
    post_z = GaussianPosterior(torch.zeros_like(z), variance=torch.ones_like(z))
    post_y = t.untransform_posterior(post_z)
    torch.testing.assert_close(
        post_y.joint_log_prob(Y), post_z.joint_log_prob(z) - t.log_det_jacobian(len(Y))
    )


def test_standardize_on_sample_posteriors_scales_noise():
    t = Standardize(1).fit(torch.tensor([[0.0], [2.0]], dtype=DT))  # mean 1, sd 1
    t.scale.fill_(2.0)
    post = SamplePosterior(torch.randn(7, 3, 1, dtype=DT), noise_variance=0.5)
    out = t.untransform_posterior(post)
    torch.testing.assert_close(out.samples, post.samples * 2 + 1)
    torch.testing.assert_close(out.noise_variance, torch.full_like(post.samples, 2.0))


def test_state_dict_round_trip():
    t = Normalize(3).fit(_data())
    fresh = Normalize(3)
    fresh.load_state_dict(t.state_dict())
    X = _data(seed=1)
    torch.testing.assert_close(fresh(X), t(X))

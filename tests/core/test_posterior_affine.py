"""``Posterior.affine`` and ``Posterior.to`` on every kind."""

from __future__ import annotations

import pytest
import torch

from bdl.core import CategoricalPosterior, GaussianPosterior, SamplePosterior

DT = torch.float64


def test_gaussian_affine_diagonal_and_joint():
    mean = torch.randn(3, 2, dtype=DT)
    var = torch.rand(3, 2, dtype=DT)
    scale, shift = torch.tensor([2.0, 0.5], dtype=DT), torch.tensor([1.0, -1.0], dtype=DT)
    out = GaussianPosterior(mean, variance=var).affine(scale, shift)
    torch.testing.assert_close(out.mean, mean * scale + shift)
    torch.testing.assert_close(out.variance, var * scale**2)
    A = torch.randn(6, 6, dtype=DT)
    joint = GaussianPosterior(mean, covariance=A @ A.mT + torch.eye(6, dtype=DT))
    out = joint.affine(scale, shift)
    S = torch.diag(scale.repeat(3))  # interleaved order: row i*m + j is point i, output j
    torch.testing.assert_close(out.covariance_matrix, S @ joint.covariance_matrix @ S)
    torch.testing.assert_close(out.variance, joint.variance * scale**2)
    assert out.is_joint


def test_sample_affine_matches_transformed_draws():
    samples = torch.randn(5, 4, 1, dtype=DT)
    out = SamplePosterior(samples).affine(3.0, 2.0)
    torch.testing.assert_close(out.samples, 3 * samples + 2)
    lo, hi = SamplePosterior(samples).confidence_region(0.9)
    lo2, hi2 = out.confidence_region(0.9)
    torch.testing.assert_close(lo2, 3 * lo + 2)
    torch.testing.assert_close(hi2, 3 * hi + 2)


def test_categorical_affine_only_identity_and_no_confidence_region():
    post = CategoricalPosterior(torch.softmax(torch.randn(4, 3, dtype=DT), -1))
    assert post.affine(1.0, 0.0) is post
    with pytest.raises(ValueError, match="class labels"):
        post.affine(2.0, 0.0)
    with pytest.raises(NotImplementedError, match="prediction_set"):
        post.confidence_region()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_affine_rejects_bad_scale(bad):
    post = GaussianPosterior(torch.zeros(2, 1, dtype=DT), variance=torch.ones(2, 1, dtype=DT))
    with pytest.raises(ValueError, match="scale"):
        post.affine(bad, 0.0)


def test_affine_rejects_wrong_width():
    post = GaussianPosterior(torch.zeros(2, 2, dtype=DT), variance=torch.ones(2, 2, dtype=DT))
    with pytest.raises(ValueError, match="shape"):
        post.affine(torch.ones(3, dtype=DT), 0.0)


def test_to_dtype_on_every_kind_keeps_gradients():
    mean = torch.randn(3, 1, dtype=DT, requires_grad=True)
    kinds = [
        GaussianPosterior(mean, variance=mean.exp()),
        GaussianPosterior(mean, covariance=torch.diag_embed(mean.exp()[:, 0])),
        SamplePosterior(mean.unsqueeze(0).expand(4, 3, 1), noise_variance=0.1),
        CategoricalPosterior(torch.softmax(mean.expand(3, 2), -1)),
    ]
    for post in kinds:
        low = post.to(torch.float32)
        assert low.mean.dtype == torch.float32 and low.variance.dtype == torch.float32
        low.mean.sum().backward()
    assert mean.grad is not None

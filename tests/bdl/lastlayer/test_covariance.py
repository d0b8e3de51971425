"""Covariance families and the Gaussian-weights KL.

Tolerances: every identity here is algebraic (matrix determinant lemma, tr(L L^T) = ||L||_F^2,
phi^T L L^T phi = ||L^T phi||^2) on float64 matrices of size <= 6 with condition numbers
~1e2, so the only error is round-off, far below the ``1e-10`` used. Where two families are
set to the *same* matrix (zero off-diagonals / zero factor), the formulas reduce to the same
floating-point operations up to reordering, so the comparison is also at ``1e-12``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from bdl.lastlayer._base import GaussianWeights
from bdl.lastlayer._covariance import (
    DenseCovariance,
    DiagonalCovariance,
    LowRankCovariance,
    make_covariance,
)

DT = torch.float64
K, D, B = 3, 6, 11


def random_spd(k: int, d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(k, d, d, generator=g, dtype=DT)
    return a @ a.mT / d + 0.5 * torch.eye(d, dtype=DT)


def fill_random(cov, g: torch.Generator) -> None:
    with torch.no_grad():
        cov.log_diag.copy_(0.3 * torch.randn(cov.log_diag.shape, generator=g, dtype=DT))
        if isinstance(cov, DenseCovariance):
            cov.off_diag.copy_(0.5 * torch.randn(cov.off_diag.shape, generator=g, dtype=DT))
        if isinstance(cov, LowRankCovariance):
            cov.factor.copy_(0.7 * torch.randn(cov.factor.shape, generator=g, dtype=DT))


def check_against_matrix(cov, phi: torch.Tensor, tol: float = 1e-10) -> None:
    mat = cov.matrix()
    assert mat.shape == (cov.k, cov.d, cov.d)
    torch.testing.assert_close(mat, mat.mT, rtol=0, atol=1e-14)
    quad = torch.einsum("bi,kij,bj->bk", phi, mat, phi)
    torch.testing.assert_close(cov.quad(phi), quad, rtol=tol, atol=tol)
    torch.testing.assert_close(
        cov.trace(), mat.diagonal(dim1=-2, dim2=-1).sum(-1), rtol=tol, atol=tol
    )
    torch.testing.assert_close(cov.logdet(), torch.logdet(mat), rtol=tol, atol=tol)
    torch.testing.assert_close(cov.cross(phi, phi[:4]), phi @ mat @ phi[:4].T, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["dense", "diagonal", "lowrank"])
@pytest.mark.parametrize("k", [1, K])
def test_primitives_match_dense_matrix(kind, k):
    g = torch.Generator().manual_seed(0)
    cov = make_covariance(kind, k, D, 0.5, rank=2).to(DT)
    fill_random(cov, g)
    phi = torch.randn(B, D, generator=g, dtype=DT)
    check_against_matrix(cov, phi)


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_degenerate_families_equal_diagonal(kind):
    g = torch.Generator().manual_seed(1)
    diag = DiagonalCovariance(K, D, 1.0).to(DT)
    fill_random(diag, g)
    other = make_covariance(kind, K, D, 1.0, rank=3).to(DT)
    with torch.no_grad():
        other.log_diag.copy_(diag.log_diag)
        if kind == "dense":
            # the upper triangle (and diagonal) of off_diag is masked out: filling it with
            # noise must change nothing
            other.off_diag.copy_(torch.randn(K, D, D, generator=g, dtype=DT).triu(0))
        else:
            other.factor.zero_()
    phi = torch.randn(B, D, generator=g, dtype=DT)
    for name in ("quad", "trace", "logdet", "matrix"):
        a = getattr(other, name)(phi) if name == "quad" else getattr(other, name)()
        b = getattr(diag, name)(phi) if name == "quad" else getattr(diag, name)()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)


def test_assign_round_trip():
    g = torch.Generator().manual_seed(2)
    target = random_spd(K, D, g)
    dense = DenseCovariance(K, D, 1.0).to(DT)
    dense.assign(target)
    torch.testing.assert_close(dense.matrix(), target, rtol=0, atol=1e-12)
    diag = DiagonalCovariance(K, D, 1.0).to(DT)
    diag.assign(target)
    torch.testing.assert_close(
        diag.matrix(), torch.diag_embed(target.diagonal(dim1=-2, dim2=-1)), rtol=0, atol=1e-12
    )
    # low rank: exact on the diagonal (the remainder absorbs it) and exact whenever the target
    # itself is rank-r plus diagonal with a generous diagonal
    low = LowRankCovariance(K, D, 1.0, rank=2).to(DT)
    low.assign(target)
    torch.testing.assert_close(
        low.matrix().diagonal(dim1=-2, dim2=-1),
        target.diagonal(dim1=-2, dim2=-1),
        rtol=0,
        atol=1e-12,
    )
    u = torch.randn(K, D, 2, generator=g, dtype=DT)
    lowrank_target = u @ u.mT
    low.assign(lowrank_target + 1e-3 * torch.eye(D, dtype=DT))
    # the top eigenpairs are shrunk by 0.99 to keep the diagonal remainder positive: the
    # off-diagonal error is then at most 1% of the low-rank part
    err = (low.matrix() - lowrank_target).abs().max()
    assert err <= 0.011 * lowrank_target.abs().max() + 2e-3


def test_sample_noise_has_the_right_covariance():
    # sample_noise is a linear map x -> A x with A A^T = S: feed it the identity basis
    g = torch.Generator().manual_seed(3)
    for kind in ("dense", "diagonal", "lowrank"):
        cov = make_covariance(kind, K, D, 0.5, rank=2).to(DT)
        fill_random(cov, g)
        basis = torch.eye(D, dtype=DT).unsqueeze(1).expand(D, K, D)  # (D draws, K, D)
        cols = cov.sample_noise(basis)  # (D, K, D): column j of A_k is cols[j, k]
        a = cols.permute(1, 2, 0)
        torch.testing.assert_close(a @ a.mT, cov.matrix(), rtol=0, atol=1e-12, msg=kind)


@pytest.mark.parametrize("kind", ["dense", "diagonal", "lowrank"])
def test_kl_matches_torch(kind):
    g = torch.Generator().manual_seed(4)
    weights = GaussianWeights(
        K, D, covariance=kind, rank=2, prior_variance=0.37, init_std=0.3, mean_init_std=1.0
    ).to(DT)
    fill_random(weights.cov, g)
    with torch.no_grad():
        weights.mean.copy_(torch.randn(K, D, generator=g, dtype=DT))
    # s_p is stored as a log in the module's dtype: read it back rather than assume 0.37
    s_p = weights.prior_variance
    assert s_p == pytest.approx(0.37, rel=1e-6)
    q = MultivariateNormal(weights.mean, covariance_matrix=weights.cov.matrix())
    p = MultivariateNormal(torch.zeros(K, D, dtype=DT), s_p * torch.eye(D, dtype=DT))
    expected = kl_divergence(q, p).sum()
    torch.testing.assert_close(weights.kl_divergence(), expected, rtol=1e-10, atol=1e-10)
    # the KL vanishes exactly at q = p
    with torch.no_grad():
        weights.mean.zero_()
    weights.cov.assign(s_p * torch.eye(D, dtype=DT).expand(K, D, D))
    if kind != "lowrank":  # low-rank assign is a best fit, not exact
        assert abs(weights.kl_divergence().item()) < 1e-12


@pytest.mark.parametrize("kind", ["dense", "diagonal"])
def test_assign_from_precision(kind):
    g = torch.Generator().manual_seed(5)
    prec = random_spd(K, D, g)
    mean = torch.randn(K, D, generator=g, dtype=DT)
    weights = GaussianWeights(
        K, D, covariance=kind, rank=None, prior_variance=1.0, init_std=1.0, mean_init_std=1.0
    ).to(DT)
    weights.assign_from_precision(mean, prec)
    torch.testing.assert_close(weights.mean, mean, rtol=0, atol=0)
    if kind == "dense":
        torch.testing.assert_close(weights.cov.matrix(), torch.linalg.inv(prec), rtol=0, atol=1e-12)
    else:
        # mean-field optimum of KL(q || N(mean, prec^-1)) is S_ii = 1 / prec_ii
        expected = torch.diag_embed(1.0 / prec.diagonal(dim1=-2, dim2=-1))
        torch.testing.assert_close(weights.cov.matrix(), expected, rtol=0, atol=1e-12)
        # ... and it is a stationary point of that KL in the log-std parameters
        log_diag = weights.cov.log_diag.detach().clone().requires_grad_(True)
        var = torch.exp(2 * log_diag)
        kl = 0.5 * ((prec.diagonal(dim1=-2, dim2=-1) * var).sum() - 2 * log_diag.sum())
        (grad,) = torch.autograd.grad(kl, log_diag)
        assert grad.abs().max().item() < 1e-12


def test_dense_gradients_only_touch_the_lower_triangle():
    cov = DenseCovariance(2, 4, 1.0).to(DT)
    phi = torch.randn(5, 4, dtype=DT)
    (cov.quad(phi).sum() + cov.trace().sum()).backward()
    upper = cov.off_diag.grad.triu(0)
    assert bool((upper == 0).all())
    assert cov.off_diag.grad.tril(-1).abs().sum() > 0


def test_make_covariance_errors():
    with pytest.raises(ValueError, match="covariance"):
        make_covariance("foo", 1, 2, 1.0, rank=None)
    with pytest.raises(ValueError, match="rank"):
        make_covariance("lowrank", 1, 2, 1.0, rank=None)
    with pytest.raises(ValueError, match="rank"):
        make_covariance("lowrank", 1, 2, 1.0, rank=0)
    with pytest.raises(ValueError, match="covariance"):
        GaussianWeights(
            1, 2, covariance="full", rank=None, prior_variance=1.0, init_std=1.0, mean_init_std=0
        )


def test_init_std_convention():
    # one convention for all families: exp(log_diag) is a standard deviation
    for kind in ("dense", "diagonal", "lowrank"):
        cov = make_covariance(kind, 2, 3, 0.25, rank=1).to(DT)
        var = cov.matrix().diagonal(dim1=-2, dim2=-1)
        # lowrank adds a 1e-3-relative random factor: relative error ~1e-6
        torch.testing.assert_close(var, torch.full_like(var, 0.0625), rtol=1e-5, atol=0, msg=kind)
        assert math.isclose(cov.logdet()[0].item(), 3 * math.log(0.0625), rel_tol=1e-5)

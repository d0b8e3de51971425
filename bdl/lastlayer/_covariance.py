"""Covariance families for a stack of ``k`` independent Gaussians over ``d`` dimensions.

One convention throughout (the vbll package mixes three): the raw parameter ``log_diag`` is
always the log of a *standard deviation*-like quantity:

- ``diagonal``: ``S = diag(exp(2 log_diag))``
- ``dense``: ``S = L L^T`` with ``L = strict_lower(off_diag) + diag(exp(log_diag))``
- ``lowrank``: ``S = U U^T + diag(exp(2 log_diag))`` with ``U`` of shape ``(d, r)``

Each family provides what the VBLL objectives need in O(k d^2) or less: the quadratic forms
``phi^T S_j phi`` for a batch, ``tr S_j`` and ``log |S_j|``, plus the dense matrices for
inspection and closed-form assignment.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from bdl.core.linalg import psd_safe_cholesky

COVARIANCE_KINDS = ("dense", "diagonal", "lowrank")


class Covariance(nn.Module, ABC):
    """Base class: ``k`` covariance matrices of size ``d x d``."""

    def __init__(self, k: int, d: int, init_std: float) -> None:
        super().__init__()
        self.k, self.d = k, d
        self.log_diag = nn.Parameter(torch.full((k, d), math.log(init_std)))

    @abstractmethod
    def quad(self, phi: Tensor) -> Tensor:
        """``phi_b^T S_j phi_b`` for every row ``b`` and matrix ``j``; (B, d) -> (B, k)."""

    @abstractmethod
    def trace(self) -> Tensor:
        """``tr S_j``, shape (k,)."""

    @abstractmethod
    def logdet(self) -> Tensor:
        """``log |S_j|``, shape (k,)."""

    @abstractmethod
    def matrix(self) -> Tensor:
        """Dense ``S``, shape (k, d, d)."""

    @abstractmethod
    def assign(self, cov: Tensor) -> None:
        """Set the parameters so that :meth:`matrix` equals ``cov`` (k, d, d) (or best fit)."""

    def cross(self, phi_a: Tensor, phi_b: Tensor) -> Tensor:
        """``phi_a,i^T S_j phi_b,l`` for all pairs; (..., n, d), (..., p, d) -> (..., k, n, p)."""
        return phi_a.unsqueeze(-3) @ self.matrix() @ phi_b.unsqueeze(-3).mT

    @abstractmethod
    def sample_noise(self, base: Tensor) -> Tensor:
        """Map standard normals ``base`` (..., k, d) to ``N(0, S_j)`` draws (..., k, d)."""


class DiagonalCovariance(Covariance):
    """``S_j = diag(exp(2 log_diag_j))``; O(B k d) quadratic forms."""

    def variances(self) -> Tensor:
        return torch.exp(2.0 * self.log_diag)

    def quad(self, phi: Tensor) -> Tensor:
        return (phi * phi) @ self.variances().T

    def trace(self) -> Tensor:
        return self.variances().sum(-1)

    def logdet(self) -> Tensor:
        return 2.0 * self.log_diag.sum(-1)

    def matrix(self) -> Tensor:
        return torch.diag_embed(self.variances())

    def assign(self, cov: Tensor) -> None:
        with torch.no_grad():
            self.log_diag.copy_(0.5 * cov.diagonal(dim1=-2, dim2=-1).clamp_min(1e-30).log())

    def sample_noise(self, base: Tensor) -> Tensor:
        return base * self.log_diag.exp()


class DenseCovariance(Covariance):
    """``S_j = L_j L_j^T`` with a log-Cholesky diagonal; quadratic forms as ``||L_j^T phi||^2``."""

    def __init__(self, k: int, d: int, init_std: float) -> None:
        super().__init__(k, d, init_std)
        self.off_diag = nn.Parameter(torch.zeros(k, d, d))
        self.register_buffer("_strict_lower", torch.ones(d, d).tril(-1), persistent=False)

    def cholesky(self) -> Tensor:
        """Lower-triangular factor ``L``, shape (k, d, d)."""
        return self.off_diag * self._strict_lower + torch.diag_embed(self.log_diag.exp())

    def quad(self, phi: Tensor) -> Tensor:
        chol = self.cholesky()
        if self.k == 1:
            return (phi @ chol[0]).pow(2).sum(-1, keepdim=True)
        # one GEMM for all k: (B, d) @ (d, k*d) -> (B, k, d); never a (B, k, d, d) tensor
        proj = phi @ chol.transpose(0, 1).reshape(self.d, self.k * self.d)
        return proj.view(phi.shape[0], self.k, self.d).pow(2).sum(-1)

    def trace(self) -> Tensor:
        return self.cholesky().pow(2).sum((-2, -1))

    def logdet(self) -> Tensor:
        return 2.0 * self.log_diag.sum(-1)

    def matrix(self) -> Tensor:
        chol = self.cholesky()
        return chol @ chol.mT

    def assign(self, cov: Tensor) -> None:
        chol = psd_safe_cholesky(cov.double()).to(self.off_diag.dtype)
        with torch.no_grad():
            self.off_diag.copy_(chol.tril(-1))
            self.log_diag.copy_(chol.diagonal(dim1=-2, dim2=-1).log())

    def sample_noise(self, base: Tensor) -> Tensor:
        return (self.cholesky() @ base.unsqueeze(-1)).squeeze(-1)


class LowRankCovariance(Covariance):
    """``S_j = U_j U_j^T + diag(exp(2 log_diag_j))``; determinant lemma for ``log |S_j|``."""

    def __init__(self, k: int, d: int, init_std: float, rank: int) -> None:
        super().__init__(k, d, init_std)
        self.rank = rank
        # small deterministic-scale factor; a zero factor would have zero gradient
        self.factor = nn.Parameter(1e-3 * init_std * torch.randn(k, d, rank))

    def quad(self, phi: Tensor) -> Tensor:
        diag = torch.exp(2.0 * self.log_diag)
        low = phi @ self.factor.transpose(0, 1).reshape(self.d, self.k * self.rank)
        low = low.view(phi.shape[0], self.k, self.rank).pow(2).sum(-1)
        return (phi * phi) @ diag.T + low

    def trace(self) -> Tensor:
        return torch.exp(2.0 * self.log_diag).sum(-1) + self.factor.pow(2).sum((-2, -1))

    def logdet(self) -> Tensor:
        # log|D + U U^T| = log|D| + log|I_r + U^T D^{-1} U|
        inv_diag = torch.exp(-2.0 * self.log_diag).unsqueeze(-1)
        capacitance = self.factor.mT @ (inv_diag * self.factor)
        capacitance = capacitance + torch.eye(
            self.rank, dtype=capacitance.dtype, device=capacitance.device
        )
        chol = torch.linalg.cholesky(capacitance)
        return 2.0 * self.log_diag.sum(-1) + 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    def matrix(self) -> Tensor:
        return self.factor @ self.factor.mT + torch.diag_embed(torch.exp(2.0 * self.log_diag))

    def assign(self, cov: Tensor) -> None:
        """Best rank-``r`` plus diagonal fit: top eigenpairs, then the diagonal remainder."""
        evals, evecs = torch.linalg.eigh(cov.to(self.factor.dtype))
        top_vals = evals[..., -self.rank :].clamp_min(0)
        top_vecs = evecs[..., -self.rank :]
        # keep the low-rank part strictly inside cov so the diagonal remainder stays positive
        factor = top_vecs * (0.99 * top_vals).sqrt().unsqueeze(-2)
        remainder = (cov.diagonal(dim1=-2, dim2=-1) - factor.pow(2).sum(-1)).clamp_min(1e-12)
        with torch.no_grad():
            self.factor.copy_(factor)
            self.log_diag.copy_(0.5 * remainder.log())

    def sample_noise(self, base: Tensor) -> Tensor:
        # one base vector of size d per draw: go through the dense Cholesky of S (O(d^3), rare)
        return (torch.linalg.cholesky(self.matrix()) @ base.unsqueeze(-1)).squeeze(-1)


def make_covariance(kind: str, k: int, d: int, init_std: float, rank: int | None) -> Covariance:
    """Factory for the three covariance families (``kind`` in :data:`COVARIANCE_KINDS`)."""
    if kind == "dense":
        return DenseCovariance(k, d, init_std)
    if kind == "diagonal":
        return DiagonalCovariance(k, d, init_std)
    if kind == "lowrank":
        if rank is None or rank < 1:
            raise ValueError(
                f"rank must be a positive integer for covariance='lowrank', got {rank}"
            )
        return LowRankCovariance(k, d, init_std, rank)
    raise ValueError(f"covariance must be one of {COVARIANCE_KINDS}, got {kind!r}")

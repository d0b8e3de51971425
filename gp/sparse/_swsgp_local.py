"""Per-point moments of q(f(x)) and per-point KL terms of the sparse-within-sparse GP.

For a point ``x`` with neighbour set ``a`` (``H`` inducing inputs), prior ``u_a ~ N(0, K)``
(``K = K_aa`` with jitter) and marginal ``q(u_a) = N(m, S)``, ``S = diag(s) + W W^T``
(Tran et al. 2021, unwhitened)::

    mu  = E q(f(x))   = k^T K^-1 m                         = beta^T m,    beta  = K^-1 k
    v   = Var q(f(x)) = k_xx - k^T K^-1 k + beta^T S beta
    KL  = 1/2 [ tr(K^-1 S) + m^T K^-1 m - H + log|K| - log|S| ],          gamma = K^-1 m

The forward pass uses one Cholesky factor ``K = L L^T`` and narrow triangular solves; the KL
needs ``K^-1`` (``cholesky_inverse``) for ``tr(K^-1 S) = sum_j s_j (K^-1)_jj + ||L^-1 W||_F^2``,
and ``log|S| = sum log s + log|I_r + W^T diag(s)^-1 W|`` (matrix determinant lemma, an
``r x r`` Cholesky when ``r < H``). The backward pass is analytic (no autograd through the
batched Cholesky or the solves), with ``delta = K^-1 S beta``::

    dmu/dK = -(beta gamma^T + gamma beta^T)/2   dmu/dk = gamma            dmu/dm = beta
    dv/dK  = beta beta^T - (delta beta^T + beta delta^T)
    dv/dk  = 2 (delta - beta)                   dv/ds  = beta^2           dv/dW  = 2 beta beta^T W
    dKL/dK = (K^-1 - K^-1 S K^-1 - gamma gamma^T)/2                       dKL/dm = gamma
    dKL/ds = (diag K^-1 - diag S^-1)/2          dKL/dW = K^-1 W - S^-1 W

(symmetric gradients with respect to the symmetric ``K``), with ``S^-1`` by Woodbury:
``S^-1 W = D^-1 W C^-1`` and ``diag S^-1 = 1/s - rowsum((D^-1 W) C^-1 * (D^-1 W))``,
``D = diag(s)``, ``C = I_r + W^T D^-1 W``. Cost O(H^3 + H^2 r + H r^2) per point.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from bdl.core.linalg import psd_safe_cholesky

__all__ = ["diag_lowrank_logdet", "fast_cholesky", "local_moments_and_kl"]


def fast_cholesky(K: Tensor) -> Tensor:
    """Cholesky factor; the checked, jittered retry only when the plain one fails."""
    L, info = torch.linalg.cholesky_ex(K)
    return psd_safe_cholesky(K) if bool(info.any()) else L


def _half_logdet(L: Tensor) -> Tensor:
    return L.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def _woodbury_core(s: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """``D^-1 W`` and the Cholesky factor of ``C = I_r + W^T D^-1 W`` (``r < H``)."""
    DW = W / s.unsqueeze(-1)
    core = W.mT @ DW + torch.eye(W.shape[-1], dtype=W.dtype, device=W.device)
    return DW, fast_cholesky(core)


def diag_lowrank_logdet(s: Tensor, W: Tensor) -> Tensor:
    """``log|diag(s) + W W^T|`` for a batch of blocks.

    Parameters
    ----------
    s : Tensor, shape (..., H)
        Positive diagonal.
    W : Tensor, shape (..., H, r)
        Low-rank factor (``r`` may be 0).

    Returns
    -------
    Tensor, shape (...)
    """
    H, r = W.shape[-2], W.shape[-1]
    if r == 0:
        return s.log().sum(-1)
    if r < H:
        # Matrix determinant lemma: |D + W W^T| = |D| |I_r + W^T D^-1 W|.
        _, Lc = _woodbury_core(s, W)
        return s.log().sum(-1) + 2.0 * _half_logdet(Lc)
    S = torch.diag_embed(s) + W @ W.mT
    return 2.0 * _half_logdet(psd_safe_cholesky(S))


def _inverse_pieces(s: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """``diag(S^-1)`` (..., H) and ``S^-1 W`` (..., H, r) for ``S = diag(s) + W W^T``."""
    H, r = W.shape[-2], W.shape[-1]
    if r == 0:
        return 1.0 / s, W
    if r < H:
        DW, Lc = _woodbury_core(s, W)
        DW_Cinv = torch.cholesky_solve(DW.mT, Lc).mT  # D^-1 W C^-1
        return 1.0 / s - (DW_Cinv * DW).sum(-1), DW_Cinv
    S_inv = torch.cholesky_inverse(psd_safe_cholesky(torch.diag_embed(s) + W @ W.mT))
    return S_inv.diagonal(dim1=-2, dim2=-1), S_inv @ W


class _LocalMomentsKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, K, k, kxx, m, s, W, kl_rows):  # noqa: ANN001, ANN205
        H, r = W.shape[-2], W.shape[-1]
        L = fast_cholesky(K)
        solved = torch.linalg.solve_triangular(
            L, torch.cat([k.unsqueeze(-1), m.unsqueeze(-1)], dim=-1), upper=False
        )
        A, Lm = solved[..., 0], solved[..., 1]
        mean = (A * Lm).sum(-1)
        # [beta, gamma] = L^-T [L^-1 k, L^-1 m] = K^-1 [k, m]
        bg = torch.linalg.solve_triangular(L.mT, solved, upper=True)
        beta, gamma = bg[..., 0], bg[..., 1]
        Wt_beta = (W.mT @ beta.unsqueeze(-1)).squeeze(-1)  # (B, r)
        S_beta = s * beta + (W @ Wt_beta.unsqueeze(-1)).squeeze(-1)
        var = kxx - A.square().sum(-1) + (beta * S_beta).sum(-1)
        empty = torch.zeros(0, dtype=K.dtype, device=K.device)
        K_inv = kl = empty
        if kl_rows is not None:
            L_k, s_k, W_k, Lm_k = L[kl_rows], s[kl_rows], W[kl_rows], Lm[kl_rows]
            K_inv = torch.cholesky_inverse(L_k)
            K_inv_W = K_inv @ W_k
            # tr(K^-1 S) = sum_j s_j (K^-1)_jj + tr(W^T K^-1 W)
            trace = (s_k * K_inv.diagonal(dim1=-2, dim2=-1)).sum(-1) + (W_k * K_inv_W).sum((-2, -1))
            kl = 0.5 * (
                trace
                + Lm_k.square().sum(-1)
                - H
                + 2.0 * _half_logdet(L_k)
                - diag_lowrank_logdet(s_k, W_k)
            )
        ctx.kl_rows = kl_rows
        ctx.rank = r
        ctx.save_for_backward(L, beta, gamma, Wt_beta, S_beta, K_inv, s, W)
        return mean, var, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, g_mean, g_var, g_kl):  # noqa: ANN001, ANN205
        L, beta, gamma, Wt_beta, S_beta, K_inv, s, W = ctx.saved_tensors
        gm, gv = g_mean.unsqueeze(-1), g_var.unsqueeze(-1)  # (B, 1)
        delta = torch.cholesky_solve(S_beta.unsqueeze(-1), L).squeeze(-1)  # K^-1 S beta
        u = 0.5 * gm * gamma + gv * delta
        # Rank-one terms of dL/dK from the mean and variance: gv beta beta^T - (beta u^T + u beta^T)
        left = [gv * beta, -beta, -u]
        right = [beta, u, beta]
        g_k = gm * gamma + 2.0 * gv * (delta - beta)
        g_m = gm * beta
        g_s = gv * beta.square()
        g_W = 2.0 * gv.unsqueeze(-1) * beta.unsqueeze(-1) * Wt_beta.unsqueeze(-2)
        g_K = torch.stack(left, dim=-1) @ torch.stack(right, dim=-1).mT
        rows = ctx.kl_rows
        if rows is not None:
            gk = g_kl.unsqueeze(-1)
            s_k, W_k, gamma_k = s[rows], W[rows], gamma[rows]
            K_inv_W = K_inv @ W_k
            # K^-1 S K^-1 = (K^-1 diag(s)) K^-1 + (K^-1 W)(K^-1 W)^T
            KSK = (K_inv * s_k.unsqueeze(-2)) @ K_inv
            if ctx.rank > 0:
                KSK = KSK + K_inv_W @ K_inv_W.mT
            g_K_kl = K_inv - KSK - gamma_k.unsqueeze(-1) * gamma_k.unsqueeze(-2)
            g_K.index_add_(0, rows, (0.5 * gk).unsqueeze(-1) * g_K_kl)
            S_inv_diag, S_inv_W = _inverse_pieces(s_k, W_k)
            g_m = g_m.index_add(0, rows, gk * gamma_k)
            g_s = g_s.index_add(0, rows, 0.5 * gk * (K_inv.diagonal(dim1=-2, dim2=-1) - S_inv_diag))
            g_W = g_W.index_add(0, rows, gk.unsqueeze(-1) * (K_inv_W - S_inv_W))
        return g_K, g_k, g_var, g_m, g_s, g_W, None


def local_moments_and_kl(
    K_aa: Tensor,
    k_xa: Tensor,
    k_xx: Tensor,
    m_a: Tensor,
    s_a: Tensor,
    W_a: Tensor,
    *,
    with_kl: bool = True,
    kl_rows: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Moments of ``q(f(x_i))`` and ``KL(q(u_a) || p(u_a))`` for a batch of points.

    Differentiable in every argument through the analytic backward pass of the module
    docstring.

    Parameters
    ----------
    K_aa : Tensor, shape (B, H, H)
        Prior covariance of each point's neighbour block (jitter included).
    k_xa : Tensor, shape (B, H)
        Cross-covariances ``k(x_i, z_a)``.
    k_xx : Tensor, shape (B,)
        Prior variances ``k(x_i, x_i)``.
    m_a : Tensor, shape (B, H)
        Variational means of the neighbour blocks.
    s_a : Tensor, shape (B, H)
        Diagonal part of ``S_aa`` (positive).
    W_a : Tensor, shape (B, H, r)
        Rows of the low-rank factor for the neighbours.
    with_kl : bool, default True
        Also return KL terms.
    kl_rows : Tensor, shape (k,), dtype long, optional
        Points whose KL terms are computed (default all ``B``).

    Returns
    -------
    mean : Tensor, shape (B,)
    variance : Tensor, shape (B,)
    kl : Tensor, shape (k,) or None
        ``KL(N(m_a, S_aa) || N(0, K_aa))`` of the points ``kl_rows``.
    """
    if with_kl and kl_rows is None:
        kl_rows = torch.arange(K_aa.shape[0], device=K_aa.device)
    mean, var, kl = _LocalMomentsKL.apply(
        K_aa, k_xa, k_xx, m_a, s_a, W_a, kl_rows if with_kl else None
    )
    return mean, var, (kl if with_kl else None)

"""Hand-differentiated training losses for the VBLL heads (the speed path).

A VBLL loss written op by op is some 40 small autograd nodes, whose per-node overhead
dominates a training step on a CPU. Here the whole per-datum negative ELBO of a head is one
``autograd.Function`` whose backward applies the closed-form gradients below. The op-by-op
definitions (``expected_log_likelihood``, ``kl_divergence``) stay in the heads as the
reference; the tests check value and every gradient against autograd through them.

Notation (per minibatch of size B): ``mu = phi W^T + b``, ``q_ik = phi_i^T S_k phi_i``,
``w_ik = dL/dq_ik``. Every covariance family supplies the gradient of ``sum_ik w_ik q_ik``
and of ``c_tr * sum_k tr S_k + c_ld * sum_k log|S_k|``:

- diagonal ``S = diag(v)``, ``v = exp(2 l)``: ``d/dphi = 2 phi * (w v)``,
  ``d/dl = 2 v * (w^T phi^2)``; ``d tr/dl = 2 v``, ``d log|S| / dl = 2``.
- dense ``S = L L^T``, ``Z_k = phi L_k``: ``d/dL_k = 2 phi^T (w_k * Z_k)``,
  ``d/dphi = 2 sum_k (w_k * Z_k) L_k^T``; ``d tr/dL = 2 L``; ``d log|S|/dl = 2``.
- low rank ``S = U U^T + diag(v)``, ``C = I + U^T D^-1 U``: the diagonal terms plus
  ``d/dU_k = 2 phi^T (w_k * phi U_k)``; ``d log|S|/dU = 2 D^-1 U C^-1`` and
  ``d log|S|/dl = 2 - 2 diag(U C^-1 U^T) / v`` (matrix determinant lemma).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from bdl.lastlayer._covariance import (
    Covariance,
    DenseCovariance,
    DiagonalCovariance,
    LowRankCovariance,
)

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# -- covariance families: forward quantities and hand gradients -----------------------------
def _cov_forward(
    cov: Covariance, params: tuple[Tensor, ...], phi: Tensor
) -> tuple[Tensor, Tensor, Tensor, tuple]:
    """``q = phi_i^T S_k phi_i`` (B, k), ``sum_k tr S_k``, ``sum_k log|S_k|`` and a cache."""
    k, d = cov.k, cov.d
    log_diag = params[0]
    if isinstance(cov, DenseCovariance):
        # log|S| = 2 sum log_diag; the factor is built once and shared with the trace
        chol = torch.diagonal_scatter(params[1] * cov._strict_lower, log_diag.exp(), 0, -2, -1)
        if k == 1:
            z = (phi @ chol[0]).unsqueeze(1)
        else:
            z = (phi @ chol.transpose(0, 1).reshape(d, k * d)).view(-1, k, d)
        return z.pow(2).sum(-1), chol.pow(2).sum(), 2.0 * log_diag.sum(), (chol, z)
    v = torch.exp(2.0 * log_diag)
    phi2 = phi * phi
    q = phi2 @ v.T
    if isinstance(cov, DiagonalCovariance):
        return q, v.sum(), 2.0 * log_diag.sum(), (v, phi2)
    factor = params[1]
    r = factor.shape[-1]
    y = (phi @ factor.transpose(0, 1).reshape(d, k * r)).view(-1, k, r)
    scaled = factor / v.unsqueeze(-1)  # D^-1 U
    eye = torch.eye(r, dtype=factor.dtype, device=factor.device)
    cap_chol = torch.linalg.cholesky(eye + factor.mT @ scaled)
    logdet = 2.0 * (log_diag.sum() + cap_chol.diagonal(dim1=-2, dim2=-1).log().sum())
    trace = v.sum() + factor.pow(2).sum()
    return q + y.pow(2).sum(-1), trace, logdet, (v, phi2, y, scaled, cap_chol)


def _cov_backward(
    cov: Covariance,
    params: tuple[Tensor, ...],
    phi: Tensor,
    cache: tuple,
    w: Tensor,
    c_tr: Tensor,
    c_ld: Tensor,
    need_phi: bool,
) -> tuple[Tensor | None, list[Tensor]]:
    """Gradients of ``sum_ik w_ik q_ik + c_tr sum tr S + c_ld sum log|S|``.

    Returns the gradient for ``phi`` (None unless ``need_phi``) and for each parameter.
    """
    k, d = cov.k, cov.d
    log_diag = params[0]
    if isinstance(cov, DenseCovariance):
        chol, z = cache
        wz = w.unsqueeze(-1) * z  # (B, k, d)
        # d/dL_k = 2 phi^T (w_k z_k) + 2 c_tr L_k, as one batched GEMM per class
        g_chol = torch.baddbmm(
            chol * (2.0 * c_tr), phi.T.expand(k, d, -1), wz.transpose(0, 1), alpha=2.0
        )
        g_phi = None
        if need_phi:
            g_phi = (wz.reshape(-1, k * d) @ chol.transpose(1, 2).reshape(k * d, d)).mul_(2.0)
        g_log_diag = g_chol.diagonal(dim1=-2, dim2=-1) * log_diag.exp() + 2.0 * c_ld
        return g_phi, [g_log_diag, g_chol.mul_(cov._strict_lower)]
    if isinstance(cov, DiagonalCovariance):
        v, phi2 = cache
    else:
        v, phi2, y, scaled, cap_chol = cache
    g_phi = (phi * (w @ v)).mul_(2.0) if need_phi else None
    g_log_diag = (w.T @ phi2).add_(c_tr).mul_(v).mul_(2.0)
    if isinstance(cov, DiagonalCovariance):
        return g_phi, [g_log_diag.add_(2.0 * c_ld)]
    factor = params[1]
    r = factor.shape[-1]
    wy = w.unsqueeze(-1) * y  # (B, k, r)
    g_factor = torch.baddbmm(
        factor * (2.0 * c_tr), phi.T.expand(k, d, -1), wy.transpose(0, 1), alpha=2.0
    )
    if need_phi:
        g_phi.add_(wy.reshape(-1, k * r) @ factor.transpose(1, 2).reshape(k * r, d), alpha=2.0)
    s_inv_u = scaled @ torch.cholesky_inverse(cap_chol)  # S^-1 U = D^-1 U C^-1
    g_log_diag = g_log_diag + c_ld * (2.0 - 2.0 * (s_inv_u * factor).sum(-1))
    return g_phi, [g_log_diag, g_factor + (2.0 * c_ld) * s_inv_u]


# -- the losses ------------------------------------------------------------------------------
@dataclass
class LossSpec:
    """Non-tensor settings of a fused loss."""

    task: str  # "regression" or "classification"
    cov: Covariance
    num_data: int
    wishart_scale: float | None
    dof: float


class FusedVBLLLoss(torch.autograd.Function):
    """Per-datum negative ELBO of ``VBLLRegression`` / ``VBLLClassification``, one node.

    ``loss = data + (KL(q || p) - log p(noise)) / N`` with ``data`` the minibatch mean of the
    negative expected log-likelihood (regression) or of the negative Jensen bound
    (classification).
    """

    @staticmethod
    def forward(ctx, spec, phi, target, mean_w, bias, log_noise, log_sp, *cov_params):
        batch = phi.shape[0]
        k, d = mean_w.shape
        n = spec.num_data
        mu = phi @ mean_w.T if bias is None else torch.addmm(bias, phi, mean_w.T)
        q, trace, logdet, cov_cache = _cov_forward(spec.cov, cov_params, phi)
        inv_noise = torch.exp(-2.0 * log_noise)  # sigma^-2, (k,)
        if spec.task == "regression":
            resid = mu - target
            colsum = torch.addcmul(q, resid, resid).sum(0)  # sum_i (r^2 + q), (k,)
            # per output: 0.5 colsum / (B sigma^2) + log sigma (+ 0.5 log 2 pi)
            data = (colsum * inv_noise).sum() * (0.5 / batch) + log_noise.sum()
            data = data + k * _HALF_LOG_2PI
            saved = (resid, inv_noise, colsum)
        else:
            # z = mu + v / 2 with v = q + sigma^2; log-sum-exp by hand so that the softmax
            # weights the backward needs come out of the same pass
            z = q.add_(inv_noise.reciprocal()).mul_(0.5).add_(mu)
            z_max = z.amax(-1, keepdim=True)
            expz = z.sub_(z_max).exp_()
            total = expz.sum(-1, keepdim=True)
            lse_sum = total.log().sum() + z_max.sum()
            data = (lse_sum - mu.gather(-1, target.unsqueeze(-1)).sum()) / batch
            saved = (expz.div_(total), inv_noise)
        sq_norm = mean_w.pow(2).sum() + trace
        inv_sp = torch.exp(-log_sp)
        reg = 0.5 * (sq_norm * inv_sp - logdet + k * d * (log_sp - 1.0))
        if spec.wishart_scale is not None:
            nu = 0.5 * (spec.dof + log_noise.numel() + 1.0)
            reg = reg + 2.0 * nu * log_noise.sum() + 0.5 * spec.wishart_scale * inv_noise.sum()
        ctx.spec, ctx.cov_cache, ctx.saved = spec, cov_cache, saved
        ctx.extra = (sq_norm, inv_sp)
        ctx.save_for_backward(phi, target, mean_w, log_noise, *cov_params)
        return data + reg / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        spec = ctx.spec
        phi, target, mean_w, log_noise, *cov_params = ctx.saved_tensors
        batch = phi.shape[0]
        k, d = mean_w.shape
        n = spec.num_data
        sq_norm, inv_sp = ctx.extra
        # every gradient below is pre-multiplied by the incoming scalar ``grad``
        g_n = grad / n
        if spec.task == "regression":
            resid, inv_noise, colsum = ctx.saved
            scale = inv_noise * (grad / batch)  # (k,)
            g_mu = resid * scale
            w_quad = (0.5 * scale).expand(batch, k)
            g_log_noise = grad - colsum * scale
        else:
            probs, inv_noise = ctx.saved
            g_mu = probs.scatter_add(
                -1, target.unsqueeze(-1), torch.full_like(probs[:, :1], -1.0)
            ).mul_(grad / batch)
            w_quad = probs * (0.5 * grad / batch)
            # d/dlog sigma_k of 0.5 sum_i p_ik sigma_k^2 / B
            g_log_noise = (2.0 / inv_noise) * w_quad.sum(0)
        if spec.wishart_scale is not None:
            nu = 0.5 * (spec.dof + log_noise.numel() + 1.0)
            g_log_noise = g_log_noise + g_n * (2.0 * nu - spec.wishart_scale * inv_noise)
        need_phi = ctx.needs_input_grad[1]
        c_tr = (0.5 * inv_sp) * g_n
        g_phi, g_cov = _cov_backward(
            spec.cov, tuple(cov_params), phi, ctx.cov_cache, w_quad, c_tr, -0.5 * g_n, need_phi
        )
        if need_phi:
            g_phi = torch.addmm(g_phi, g_mu, mean_w)
        g_mean = torch.addcmul(g_mu.T @ phi, mean_w, 2.0 * c_tr)
        g_bias = g_mu.sum(0) if ctx.needs_input_grad[4] else None
        g_log_sp = None
        if ctx.needs_input_grad[6]:
            g_log_sp = 0.5 * g_n * (k * d - sq_norm * inv_sp)
        g_target = -g_mu if spec.task == "regression" and ctx.needs_input_grad[2] else None
        return (None, g_phi, g_target, g_mean, g_bias, g_log_noise, g_log_sp, *g_cov)


def fused_loss(
    spec: LossSpec,
    phi: Tensor,
    target: Tensor,
    mean_w: Tensor,
    bias: Tensor | None,
    log_noise: Tensor,
    log_sp: Tensor,
) -> Tensor:
    """Apply :class:`FusedVBLLLoss` with the covariance parameters taken from ``spec.cov``."""
    cov = spec.cov
    cov_params = (
        (cov.log_diag,)
        if isinstance(cov, DiagonalCovariance)
        else (
            (cov.log_diag, cov.off_diag)
            if isinstance(cov, DenseCovariance)
            else (cov.log_diag, cov.factor)
        )
    )
    assert isinstance(cov, (DiagonalCovariance, DenseCovariance, LowRankCovariance))
    return FusedVBLLLoss.apply(spec, phi, target, mean_w, bias, log_noise, log_sp, *cov_params)

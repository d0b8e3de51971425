"""Neighbour-block prior covariances ``K_aa + jitter I`` for a batch of points.

For ``RBFKernel`` and ``ScaleKernel(RBFKernel)`` (ARD and a kernel batch shape, one set of
hyperparameters per GP of a batch, allowed) the block is evaluated by a custom autograd function
with the analytic gradient, reading the hyperparameters off the gpytorch kernel; any other gpytorch
kernel is evaluated by gpytorch itself. The special case exists because a training step evaluates
``B x H x H`` entries (a million for B = 1,024, H = 32) and gpytorch's generic path for inputs that
require grad (learned inducing inputs) makes about fifteen passes over them forward and backward;
this makes four.
With ``z = Z_a / lengthscale`` (autograd handles that division) and ``E_ij = exp(-|z_i - z_j|^2
/ 2)``::

    K = outputscale * E + jitter I
    dL/doutputscale = sum(G * E)      (summed per GP with a batch kernel)
    dL/dz_i = outputscale * sum_j P_ij (z_j - z_i),   P = (G + G^T) * E

Tested against gpytorch's values and gradients.
"""

from __future__ import annotations

import torch
from gpytorch.kernels import Kernel, RBFKernel, ScaleKernel
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["block_covariance"]


class _RBFBlock(torch.autograd.Function):
    # z (..., B, H, d); outputscale of shape () or broadcastable to (..., 1, 1, 1).
    @staticmethod
    def forward(ctx, z, outputscale, jitter):  # noqa: ANN001, ANN205
        sq = z.square().sum(-1)
        if z.dim() == 3:
            E = torch.baddbmm(sq.unsqueeze(-1), z, z.mT, alpha=-2.0)  # |z_i|^2 - 2 z_i.z_j
        else:
            zf = z.reshape(-1, *z.shape[-2:])
            E = torch.baddbmm(sq.reshape(-1, sq.shape[-1], 1), zf, zf.mT, alpha=-2.0)
            E = E.reshape(*z.shape[:-1], z.shape[-2])
        E.add_(sq.unsqueeze(-2)).clamp_min_(0.0).mul_(-0.5).exp_()
        ctx.save_for_backward(z, outputscale, E)
        K = E * outputscale
        K.diagonal(dim1=-2, dim2=-1).add_(jitter)
        return K

    @staticmethod
    @once_differentiable
    def backward(ctx, G):  # noqa: ANN001, ANN205
        z, outputscale, E = ctx.saved_tensors
        g_os = None
        if ctx.needs_input_grad[1]:
            g_os = (G * E).sum_to_size(outputscale.shape)
        g_z = None
        if ctx.needs_input_grad[0]:
            P = (G + G.mT).mul_(E)
            g_z = (P @ z - P.sum(-1, keepdim=True) * z) * outputscale
        return g_z, g_os, None


def _rbf_parts(kernel: Kernel) -> tuple[RBFKernel, Tensor | None] | None:
    """``(rbf, outputscale or None)`` when the kernel is a plain or scaled RBF, else None."""
    outputscale = None
    base = kernel
    if isinstance(kernel, ScaleKernel):
        outputscale, base = kernel.outputscale, kernel.base_kernel
    if type(base) is not RBFKernel or base.active_dims is not None:
        return None
    if kernel.active_dims is not None:
        return None
    return base, outputscale


def block_covariance(kernel: Kernel, Z_a: Tensor, jitter: float) -> Tensor:
    """``k(Z_a, Z_a) + jitter I`` for every block of a batch.

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel
    Z_a : Tensor, shape (B, H, d) or (*batch, B, H, d)
        Inducing inputs of each point's neighbour set; with batch dimensions, for each GP of
        a batch whose kernel has a ``batch_shape`` broadcastable to ``batch``.
    jitter : float
        Added to every diagonal.

    Returns
    -------
    Tensor, shape (B, H, H) or (*batch, B, H, H)
    """
    parts = _rbf_parts(kernel)
    if parts is None:
        # gpytorch broadcasts the kernel's batch shape against the leading dims, so the
        # points' dim goes in front of the GPs' batch dims.
        Zt = Z_a.movedim(-3, 0) if Z_a.dim() > 3 else Z_a
        K = kernel(Zt, Zt)
        K = K.to_dense() if hasattr(K, "to_dense") else K
        K = K.movedim(0, -3) if Z_a.dim() > 3 else K
        eye = torch.eye(Z_a.shape[-2], dtype=Z_a.dtype, device=Z_a.device)
        return K + jitter * eye
    rbf, outputscale = parts
    if outputscale is None:
        outputscale = torch.ones((), dtype=Z_a.dtype, device=Z_a.device)
    elif outputscale.dim() > 0:  # batch shape (*batch,) -> (*batch, 1, 1, 1)
        outputscale = outputscale.reshape(*outputscale.shape, 1, 1, 1)
    ls = rbf.lengthscale  # (*kernel_batch, 1, 1 or d)
    z = Z_a / (ls.unsqueeze(-3) if ls.dim() > 2 else ls)
    # Centre each block (as gpytorch's sq_dist does) so the quadratic expansion of the squared
    # distances does not cancel catastrophically for inputs far from the origin.
    z = z - z.mean(-2, keepdim=True).detach()
    if outputscale.numel() == 1:
        outputscale = outputscale.reshape(())
    return _RBFBlock.apply(z, outputscale, float(jitter))

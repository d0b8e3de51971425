"""Neighbour-block prior covariances ``K_aa + jitter I`` for a batch of points.

For ``RBFKernel`` and ``ScaleKernel(RBFKernel)`` (no kernel batch shape; ARD allowed) the
block is evaluated by a custom autograd function with the analytic gradient, reading the
hyperparameters off the gpytorch kernel; any other gpytorch kernel is evaluated by gpytorch
itself. The special case exists because a training step evaluates ``B x H x H`` entries (a
million for B = 1,024, H = 32) and gpytorch's generic path for inputs that require grad (learned
inducing inputs) makes about fifteen passes over them forward and backward; this makes four.
With ``z = Z_a / lengthscale`` (autograd handles that division) and ``E_ij = exp(-|z_i - z_j|^2
/ 2)``::

    K = outputscale * E + jitter I
    dL/doutputscale = sum(G * E)
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
    @staticmethod
    def forward(ctx, z, outputscale, jitter):  # noqa: ANN001, ANN205
        sq = z.square().sum(-1)
        E = torch.baddbmm(sq.unsqueeze(-1), z, z.mT, alpha=-2.0)  # |z_i|^2 - 2 z_i.z_j
        E.add_(sq.unsqueeze(-2)).clamp_min_(0.0).mul_(-0.5).exp_()
        ctx.save_for_backward(z, outputscale, E)
        K = E * outputscale
        K.diagonal(dim1=-2, dim2=-1).add_(jitter)
        return K

    @staticmethod
    @once_differentiable
    def backward(ctx, G):  # noqa: ANN001, ANN205
        z, outputscale, E = ctx.saved_tensors
        g_os = (G * E).sum().reshape(outputscale.shape) if ctx.needs_input_grad[1] else None
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
    if (
        type(base) is not RBFKernel
        or base.batch_shape != torch.Size()
        or base.active_dims is not None
    ):
        return None
    if kernel.batch_shape != torch.Size() or kernel.active_dims is not None:
        return None
    return base, outputscale


def block_covariance(kernel: Kernel, Z_a: Tensor, jitter: float) -> Tensor:
    """``k(Z_a, Z_a) + jitter I`` for every block of a batch.

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel
    Z_a : Tensor, shape (B, H, d)
        Inducing inputs of each point's neighbour set.
    jitter : float
        Added to every diagonal.

    Returns
    -------
    Tensor, shape (B, H, H)
    """
    parts = _rbf_parts(kernel)
    if parts is None:
        K = kernel(Z_a, Z_a)
        K = K.to_dense() if hasattr(K, "to_dense") else K
        eye = torch.eye(Z_a.shape[-2], dtype=Z_a.dtype, device=Z_a.device)
        return K + jitter * eye
    rbf, outputscale = parts
    if outputscale is None:
        outputscale = torch.ones((), dtype=Z_a.dtype, device=Z_a.device)
    z = Z_a / rbf.lengthscale  # lengthscale (1, 1) or (1, d)
    # Centre each block (as gpytorch's sq_dist does) so the quadratic expansion of the squared
    # distances does not cancel catastrophically for inputs far from the origin.
    z = z - z.mean(-2, keepdim=True).detach()
    return _RBFBlock.apply(z, outputscale.reshape(()), float(jitter))

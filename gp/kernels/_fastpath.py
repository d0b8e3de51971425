"""Tiles of stationary gpytorch kernels (RBF, Matérn, scaled or not) from one GEMM each.

gpytorch evaluates ``RBFKernel`` and ``MaternKernel`` as: divide the inputs by the
lengthscale, form squared distances by the quadratic expansion
``|x|^2 + |z|^2 - 2 x z^T`` (one GEMM on inputs padded with the norms), clamp, then map
the distances elementwise; a ``ScaleKernel`` multiplies the result by the outputscale. The
functions here compute the same values for one row tile with fewer passes over the tile:
the padding puts the norms (and for the RBF the factor ``-1/2``) inside the GEMM, the
elementwise map runs in place when no gradient is needed, and the outputscale multiplies
``V`` (``m x k``) instead of the ``rows x m`` tile. All operations are differentiable torch
operations, so gradients reach the lengthscale, the outputscale, ``X``, ``Z`` and ``V``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from gpytorch.kernels import Kernel, MaternKernel, RBFKernel, ScaleKernel
from torch import Tensor

__all__ = ["Stationary", "prepare", "stationary_spec", "tile_matvec"]

# exp(a) = exp2(a log2(e)), with the factor folded into the GEMM for the RBF: torch's
# vectorised exp2 is typically cheaper than its exp on CPUs (exp2 reduces its argument by
# rounding to an integer, exp by multiples of ln 2), and the elementwise map is a large part
# of a tile's cost.
_LOG2E = 1.0 / math.log(2.0)

# gpytorch's Matérn distance is ``cdist(...).clamp_min(1e-15)`` (gpytorch.kernels.kernel.dist);
# the same floor on the squared distance keeps the square root differentiable at 0.
_MIN_SQ_DIST = 1e-30


@dataclass(frozen=True)
class Stationary:
    """A supported kernel read off as ``outputscale * g(|x - z| / lengthscale)``.

    Attributes
    ----------
    family : str
        ``"rbf"`` or ``"matern"``.
    nu : float
        Matérn smoothness (0.5, 1.5 or 2.5); ``inf`` for the RBF.
    lengthscale : Tensor, shape (*kernel_batch, 1, 1 or d)
        The kernel's (constrained) lengthscale, in the graph of its raw parameter.
    outputscale : Tensor or None, shape (*kernel_batch)
        The ``ScaleKernel`` outputscale, or ``None`` for an unscaled kernel.
    """

    family: str
    nu: float
    lengthscale: Tensor
    outputscale: Tensor | None


def stationary_spec(kernel: Kernel) -> Stationary | None:
    """Describe ``kernel`` if it is an RBF or Matérn kernel, optionally in a ``ScaleKernel``.

    Only the exact gpytorch classes qualify (a subclass may override ``forward``), and
    neither kernel may restrict its inputs with ``active_dims``.

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel

    Returns
    -------
    Stationary or None
        ``None`` when the kernel is of any other kind.
    """
    outputscale = None
    base = kernel
    if type(kernel) is ScaleKernel:
        if kernel.active_dims is not None:
            return None
        outputscale, base = kernel.outputscale, kernel.base_kernel
    if base.active_dims is not None:
        return None
    if type(base) is RBFKernel:
        return Stationary("rbf", math.inf, base.lengthscale, outputscale)
    if type(base) is MaternKernel and base.nu in (0.5, 1.5, 2.5):
        return Stationary("matern", float(base.nu), base.lengthscale, outputscale)
    return None


def prepare(spec: Stationary, Z: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-call quantities shared by all tiles.

    Parameters
    ----------
    spec : Stationary
    Z : Tensor, shape (..., m, d)
    V : Tensor, shape (..., m, k)

    Returns
    -------
    center : Tensor, shape (..., 1, d)
        Mean of ``Z``; both inputs are centred on it, which keeps the quadratic expansion
        accurate (its rounding error grows with the squared norms).
    scale : Tensor, shape (*kernel_batch, 1, 1 or d)
        Inputs are multiplied by it: ``1 / lengthscale`` for the RBF,
        ``sqrt(2 nu) / lengthscale`` for Matérn.
    Z_padded_t : Tensor, shape (..., d + 2, m)
        Transposed padded ``Z``: rows ``z``, ``|z|^2``, ``1`` for Matérn and ``z``,
        ``-|z|^2 / 2``, ``1`` for the RBF (scaled and centred ``z``; all of it times
        ``log2(e)`` for the RBF, whose tiles are then ``exp2`` of the GEMM).
    V_scaled : Tensor, shape (..., m, k)
        ``outputscale * V``.
    """
    center = Z.mean(dim=-2, keepdim=True).detach()
    if spec.family == "rbf":
        scale = spec.lengthscale.reciprocal()
    else:
        scale = spec.lengthscale.reciprocal() * math.sqrt(2.0 * spec.nu)
    Zs = (Z - center) * scale
    norm = Zs.square().sum(dim=-1, keepdim=True)
    if spec.family == "rbf":
        norm = norm * -0.5
    Z_padded_t = torch.cat([Zs, norm, torch.ones_like(norm)], dim=-1).transpose(-2, -1)
    if spec.family == "rbf":
        Z_padded_t = Z_padded_t * _LOG2E
    V_scaled = V
    if spec.outputscale is not None:
        V_scaled = V * spec.outputscale[..., None, None]
    return center, scale, Z_padded_t.contiguous(), V_scaled


def _kernel_tile(
    spec: Stationary, X_tile: Tensor, center: Tensor, scale: Tensor, Z_padded_t: Tensor
) -> Tensor:
    """Unscaled kernel block ``g(|x - z| / lengthscale)``, shape (..., rows, m)."""
    Xs = (X_tile - center) * scale
    norm = Xs.square().sum(dim=-1, keepdim=True)
    inplace = not torch.is_grad_enabled() or not (
        X_tile.requires_grad or Z_padded_t.requires_grad or scale.requires_grad
    )
    if spec.family == "rbf":
        # [x, 1, -|x|^2/2] . log2(e) [z, -|z|^2/2, 1] = -log2(e) |x - z|^2 / 2, k = exp2(that).
        # gpytorch clamps |x - z|^2 at 0 first; skipping that pass changes k only where
        # rounding left the exponent in (0, eps |x|^2], by a relative O(eps |x|^2), the
        # expansion's own rounding error.
        X_padded = torch.cat([Xs, torch.ones_like(norm), norm * -0.5], dim=-1)
        expo = torch.matmul(X_padded, Z_padded_t)
        return expo.exp2_() if inplace else expo.exp2()
    if spec.nu == 0.5:
        # exp(-r) has a kink at r = 0, so sqrt of the GEMM expansion's rounding error (relative
        # eps |x|^2) would show up at first order (~1e-3 in float32 near coincident points):
        # direct differences instead. Z_padded_t holds the centred, scaled Z in its first rows.
        Zs = Z_padded_t[..., : Xs.shape[-1], :].mT
        r = torch.cdist(Xs, Zs, compute_mode="donot_use_mm_for_euclid_dist")
        return r.mul_(-_LOG2E).exp2_() if inplace else torch.exp2(r * -_LOG2E)
    # [-2x, 1, |x|^2] . [z, |z|^2, 1] = |x - z|^2, here already multiplied by 2 nu
    X_padded = torch.cat([Xs * -2.0, torch.ones_like(norm), norm], dim=-1)
    sq = torch.matmul(X_padded, Z_padded_t)
    floor = _MIN_SQ_DIST * 2.0 * spec.nu
    # s = sqrt(2 nu) r / lengthscale; k = p(s) exp(-s) with p = 1, 1 + s, 1 + s + s^2 / 3
    if inplace:
        s = sq.clamp_min_(floor).sqrt_()
        poly = s + 1.0 if spec.nu == 1.5 else torch.addcmul(s + 1.0, s, s, value=1.0 / 3.0)
        return poly.mul_(s.mul_(-_LOG2E).exp2_())
    s = sq.clamp_min(floor).sqrt()
    e = torch.exp2(s * -_LOG2E)
    poly = s + 1.0 if spec.nu == 1.5 else torch.addcmul(s + 1.0, s, s, value=1.0 / 3.0)
    return poly * e


def tile_matvec(
    spec: Stationary,
    X_tile: Tensor,
    center: Tensor,
    scale: Tensor,
    Z_padded_t: Tensor,
    V_scaled: Tensor,
) -> Tensor:
    """``K(X_tile, Z) @ V`` for one tile, from the output of :func:`prepare`.

    Returns
    -------
    Tensor, shape (..., rows, k)
    """
    return torch.matmul(_kernel_tile(spec, X_tile, center, scale, Z_padded_t), V_scaled)

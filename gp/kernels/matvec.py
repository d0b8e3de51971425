"""Kernel products and cross-covariances evaluated in row tiles of bounded memory.

For ``n`` rows of ``X`` and ``m`` rows of ``Z`` the full cross-covariance ``K(X, Z)`` has
``n * m`` entries; the functions here only ever hold ``tile_size * m`` of them at a time
(per batch element), so that ``K(X, Z) @ V`` works for ``n`` far larger than fits in memory.
Gradients flow to the kernel hyperparameters, ``X``, ``Z`` and ``V``; with gradients enabled
each tile is recomputed in the backward pass (activation checkpointing), which keeps the
backward pass bounded too.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from gpytorch.kernels import Kernel
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "TILE_BYTES",
    "cross_covariance_chunks",
    "default_tile_size",
    "kernel_diag",
    "kernel_matvec",
]

TILE_BYTES = 64 * 2**20
"""Target size in bytes of one tile of kernel entries (64 MiB)."""


def _dense(value: object) -> Tensor:
    """A gpytorch kernel output (lazy tensor or linear operator) as a dense tensor."""
    return value.to_dense() if hasattr(value, "to_dense") else value


def _check_inputs(X: Tensor, Z: Tensor | None = None) -> None:
    if not isinstance(X, Tensor) or X.dim() < 2:
        raise ValueError(f"X must be a tensor of shape (..., n, d), got {getattr(X, 'shape', X)}")
    if Z is not None:
        if not isinstance(Z, Tensor) or Z.dim() < 2:
            raise ValueError(
                f"Z must be a tensor of shape (..., m, d), got {getattr(Z, 'shape', Z)}"
            )
        if Z.shape[-1] != X.shape[-1]:
            raise ValueError(
                f"Z has {Z.shape[-1]} input dimensions but X has {X.shape[-1]}; they must match"
            )


def default_tile_size(n_cols: int, batch_numel: int = 1, dtype: torch.dtype = torch.float64) -> int:
    """Rows per tile so that one tile of kernel entries takes about :data:`TILE_BYTES`.

    Parameters
    ----------
    n_cols : int
        Number of columns ``m`` of the cross-covariance.
    batch_numel : int, default 1
        Number of batch elements evaluated together.
    dtype : torch.dtype
        Dtype of the kernel entries.

    Returns
    -------
    int
        ``max(1, TILE_BYTES // (n_cols * batch_numel * itemsize))``.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, TILE_BYTES // max(1, n_cols * batch_numel * itemsize))


def _resolve_tile(tile_size: int | None, n_cols: int, batch_numel: int, dtype: torch.dtype) -> int:
    if tile_size is None:
        return default_tile_size(n_cols, batch_numel, dtype)
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive int or None, got {tile_size!r}")
    return tile_size


def kernel_diag(kernel: Kernel, X: Tensor) -> Tensor:
    """Diagonal ``k(x_i, x_i)`` of the kernel matrix, without forming the matrix.

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel
    X : Tensor, shape (..., n, d)

    Returns
    -------
    Tensor, shape (..., n)
        Broadcast over the batch shapes of ``X`` and the kernel.
    """
    _check_inputs(X)
    return _dense(kernel(X, X, diag=True))


def cross_covariance_chunks(
    kernel: Kernel, X: Tensor, Z: Tensor, tile_size: int | None = None
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``K(X, Z)`` one tile of rows at a time.

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel
    X : Tensor, shape (..., n, d)
    Z : Tensor, shape (..., m, d)
    tile_size : int, optional
        Rows per tile; default :func:`default_tile_size` (about 64 MiB per tile).

    Yields
    ------
    start : int
        Index of the first row of the tile.
    block : Tensor, shape (..., rows, m)
        ``K(X[..., start:start + rows, :], Z)`` with ``rows <= tile_size``.
    """
    _check_inputs(X, Z)
    n, m = X.shape[-2], Z.shape[-2]
    batch = torch.broadcast_shapes(X.shape[:-2], Z.shape[:-2], kernel.batch_shape)
    tile = _resolve_tile(tile_size, m, batch.numel(), X.dtype)
    for start in range(0, n, tile):
        yield start, _dense(kernel(X[..., start : start + tile, :], Z))


def _tile_product(kernel: Kernel, X_tile: Tensor, Z: Tensor, V: Tensor) -> Tensor:
    return _dense(kernel(X_tile, Z)) @ V


def kernel_matvec(
    kernel: Kernel, X: Tensor, Z: Tensor, V: Tensor, *, tile_size: int | None = None
) -> Tensor:
    """``K(X, Z) @ V`` computed in row tiles, never forming the full ``n x m`` matrix.

    .. math:: (K V)_{i,:} = \\sum_{j=1}^{m} k(x_i, z_j) V_{j,:}

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel
        Any gpytorch kernel (batch kernels included).
    X : Tensor, shape (..., n, d)
    Z : Tensor, shape (..., m, d)
    V : Tensor, shape (..., m, k) or (m,)
        Right-hand sides; a 1-D ``V`` is a single vector.
    tile_size : int, optional
        Rows of ``X`` per tile; default :func:`default_tile_size` (about 64 MiB of kernel
        entries per tile, over the whole batch).

    Returns
    -------
    Tensor, shape (..., n, k) or (..., n) for a 1-D ``V``
        Leading batch shape is the broadcast of those of ``X``, ``Z``, ``V`` and the kernel.

    Notes
    -----
    With gradients enabled and more than one tile, each tile is checkpointed: its kernel
    block is recomputed during ``backward`` instead of being stored, so peak memory stays at
    about one tile in both passes.
    """
    _check_inputs(X, Z)
    if not isinstance(V, Tensor) or V.dim() < 1:
        raise ValueError(f"V must be a tensor of shape (..., m, k) or (m,), got {V!r}")
    vector = V.dim() == 1
    if vector:
        V = V.unsqueeze(-1)
    m = Z.shape[-2]
    if V.shape[-2] != m:
        raise ValueError(f"V has {V.shape[-2]} rows but Z has {m}; they must match")
    n = X.shape[-2]
    batch = torch.broadcast_shapes(X.shape[:-2], Z.shape[:-2], V.shape[:-2], kernel.batch_shape)
    tile = _resolve_tile(tile_size, m, batch.numel(), X.dtype)
    if n <= tile:
        out = _tile_product(kernel, X, Z, V)
    else:
        needs_graph = torch.is_grad_enabled() and (
            X.requires_grad
            or Z.requires_grad
            or V.requires_grad
            or any(p.requires_grad for p in kernel.parameters())
        )
        parts = []
        for start in range(0, n, tile):
            X_tile = X[..., start : start + tile, :]
            if needs_graph:
                part = checkpoint(_tile_product, kernel, X_tile, Z, V, use_reentrant=False)
            else:
                part = _tile_product(kernel, X_tile, Z, V)
            parts.append(part)
        out = torch.cat([p.expand(*batch, p.shape[-2], p.shape[-1]) for p in parts], dim=-2)
    if out.shape[:-2] != batch:
        out = out.expand(*batch, *out.shape[-2:])
    return out.squeeze(-1) if vector else out

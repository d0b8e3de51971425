"""Kernel products and cross-covariances evaluated in row tiles of bounded memory.

For ``n`` rows of ``X`` and ``m`` rows of ``Z`` the full cross-covariance ``K(X, Z)`` has
``n * m`` entries; the functions here only ever hold ``tile_size * m`` of them at a time
(per batch element), so that ``K(X, Z) @ V`` works for ``n`` far larger than fits in memory.
Gradients flow to the kernel hyperparameters, ``X``, ``Z`` and ``V``; with gradients enabled
each tile is recomputed in the backward pass (activation checkpointing), which keeps the
backward pass bounded too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from gpytorch.kernels import Kernel
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ._fastpath import Stationary, prepare, stationary_spec, tile_matvec
from ._keops import keops_matvec

__all__ = [
    "BACKENDS",
    "TILE_BYTES",
    "cross_covariance_chunks",
    "default_tile_size",
    "kernel_diag",
    "kernel_matvec",
]

TILE_BYTES = 16 * 2**20
"""Target size in bytes of one tile of kernel entries (16 MiB).

Each tile is written by the GEMM, rewritten by the elementwise map and read by the product
with ``V``; a tile small enough to stay in a typical CPU's last-level cache between these
passes saves the main-memory traffic between them, while a larger tile only amortises the
per-tile overhead further. ``benchmarks/bench_kernel_matvec.py --sweep`` measures the choice
on a given machine."""


def _dense(value: object) -> Tensor:
    """A gpytorch kernel output (lazy tensor or linear operator) as a dense tensor."""
    return value.to_dense() if hasattr(value, "to_dense") else value


def _check_inputs(X: Tensor, Z: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Shapes, floating dtypes and finiteness of ``X`` and ``Z``; both in their promoted dtype."""
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
    named = {"X": X} if Z is None else {"X": X, "Z": Z}
    X, *rest = _promote_finite(named)
    return X, (rest[0] if rest else None)


def _promote_finite(named: dict[str, Tensor]) -> list[Tensor]:
    """The tensors in their promoted floating dtype; ValueErrors name a non-floating or
    non-finite one (one device sync for the finiteness of all of them)."""
    for name, value in named.items():
        if not value.is_floating_point():
            raise ValueError(f"{name} must have a floating-point dtype, got {value.dtype}")
    finite = torch.stack([torch.isfinite(v).all() for v in named.values()]).tolist()
    for name, ok in zip(named, finite, strict=True):
        if not ok:
            raise ValueError(f"{name} contains NaN or inf")
    dtype = named["X"].dtype
    for value in named.values():
        dtype = torch.promote_types(dtype, value.dtype)
    return [value.to(dtype) for value in named.values()]


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

    Raises
    ------
    ValueError
        ``X`` of a bad shape, not floating point, or with NaN or inf entries.
    """
    X, _ = _check_inputs(X)
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
        Rows per tile; default :func:`default_tile_size` (about :data:`TILE_BYTES` per tile).

    Yields
    ------
    start : int
        Index of the first row of the tile.
    block : Tensor, shape (..., rows, m)
        ``K(X[..., start:start + rows, :], Z)`` with ``rows <= tile_size``, in the promoted
        dtype of ``X`` and ``Z`` (and the kernel's parameters).

    Raises
    ------
    ValueError
        ``X`` or ``Z`` of a bad shape, not floating point, or with NaN or inf entries.
    """
    X, Z = _check_inputs(X, Z)
    n, m = X.shape[-2], Z.shape[-2]
    batch = torch.broadcast_shapes(X.shape[:-2], Z.shape[:-2], kernel.batch_shape)
    tile = _resolve_tile(tile_size, m, batch.numel(), X.dtype)
    for start in range(0, n, tile):
        yield start, _dense(kernel(X[..., start : start + tile, :], Z))


def _tile_product(kernel: Kernel, X_tile: Tensor, Z: Tensor, V: Tensor) -> Tensor:
    return _dense(kernel(X_tile, Z)) @ V


BACKENDS = ("auto", "torch", "gpytorch", "keops")
"""Accepted values of ``kernel_matvec(..., backend=...)``."""


def _check_backend(
    backend: str, spec: Stationary | None, kernel: Kernel, X: Tensor, allow: bool
) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "keops":
        return
    if spec is None:
        raise TypeError(
            "backend='keops' supports gpytorch RBFKernel and MaternKernel (nu = 0.5, 1.5, 2.5), "
            f"optionally inside a ScaleKernel and without active_dims; got {kernel!r}. "
            "Use backend='torch' for other kernels"
        )
    if X.device.type != "cuda" and not allow:
        raise ValueError(
            f"backend='keops' is meant for CUDA tensors, but X is on {X.device}; use "
            "backend='torch' on the CPU (it is faster there), or pass allow_keops_cpu=True "
            "to run KeOps' CPU code anyway"
        )


def _needs_graph(kernel: Kernel, *tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and (
        any(t.requires_grad for t in tensors) or any(p.requires_grad for p in kernel.parameters())
    )


def kernel_matvec(
    kernel: Kernel,
    X: Tensor,
    Z: Tensor,
    V: Tensor,
    *,
    tile_size: int | None = None,
    backend: str = "auto",
    allow_keops_cpu: bool = False,
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
        Rows of ``X`` per tile; default :func:`default_tile_size` (about
        :data:`TILE_BYTES` of kernel entries per tile, over the whole batch). Ignored by
        ``backend="keops"``, which tiles on its own.
    backend : {"auto", "torch", "gpytorch", "keops"}, default "auto"
        ``"torch"``: tiles of torch operations. ``RBFKernel`` and ``MaternKernel``
        (optionally in a ``ScaleKernel``, without ``active_dims``) are evaluated from their
        lengthscale and outputscale by one GEMM per tile (:mod:`gp.kernels._fastpath`);
        other kernels through their gpytorch ``forward``. ``"gpytorch"``: every kernel
        through its gpytorch ``forward``. ``"auto"``: same as ``"torch"``; it never picks
        KeOps. ``"keops"``: a KeOps reduction (needs the optional ``pykeops``; supports
        the RBF and Matérn kernels above; CUDA tensors only unless ``allow_keops_cpu``).
    allow_keops_cpu : bool, default False
        Let ``backend="keops"`` run on CPU tensors (much slower than ``"torch"`` there;
        meant for checking KeOps without a GPU).

    Returns
    -------
    Tensor, shape (..., n, k) or (..., n) for a 1-D ``V``
        Leading batch shape is the broadcast of those of ``X``, ``Z``, ``V`` and the kernel;
        computed in the promoted dtype of ``X``, ``Z``, ``V`` (and the kernel's parameters).

    Raises
    ------
    ValueError
        Bad shapes, ``tile_size`` or ``backend``; ``X``, ``Z`` or ``V`` not floating point
        or with NaN or inf entries (named); ``backend="keops"`` on CPU tensors without
        ``allow_keops_cpu``.
    TypeError
        ``backend="keops"`` with a kernel it does not support.
    ImportError
        ``backend="keops"`` without ``pykeops`` installed.

    Notes
    -----
    With gradients enabled and more than one tile, each tile is checkpointed: its kernel
    block is recomputed during ``backward`` instead of being stored, so peak memory stays at
    about one tile in both passes. Without gradients the result is written into one
    preallocated output, so the extra memory is one tile plus ``O(n k + m d)``.
    """
    if not isinstance(V, Tensor) or V.dim() < 1:
        raise ValueError(f"V must be a tensor of shape (..., m, k) or (m,), got {V!r}")
    _check_inputs(X, Z)  # shapes
    X, Z, V = _promote_finite({"X": X, "Z": Z, "V": V})
    vector = V.dim() == 1
    if vector:
        V = V.unsqueeze(-1)
    m = Z.shape[-2]
    if V.shape[-2] != m:
        raise ValueError(f"V has {V.shape[-2]} rows but Z has {m}; they must match")
    spec = stationary_spec(kernel) if backend in ("auto", "torch", "keops") else None
    _check_backend(backend, spec, kernel, X, allow_keops_cpu)
    n = X.shape[-2]
    batch = torch.broadcast_shapes(X.shape[:-2], Z.shape[:-2], V.shape[:-2], kernel.batch_shape)
    if backend == "keops":
        out = keops_matvec(spec, X, Z, V)
    else:
        tile = _resolve_tile(tile_size, m, batch.numel(), X.dtype)
        if spec is not None:
            shared = prepare(spec, Z, V)

            def product(X_tile: Tensor) -> Tensor:
                return tile_matvec(spec, X_tile, *shared)

        else:

            def product(X_tile: Tensor) -> Tensor:
                return _tile_product(kernel, X_tile, Z, V)

        out = _tiled(product, X, n, tile, batch, V.shape[-1], _needs_graph(kernel, X, Z, V))
    if out.shape[:-2] != batch:
        out = out.expand(*batch, *out.shape[-2:])
    return out.squeeze(-1) if vector else out


def _tiled(
    product: Callable[[Tensor], Tensor],
    X: Tensor,
    n: int,
    tile: int,
    batch: torch.Size,
    k: int,
    graph: bool,
) -> Tensor:
    """Stack ``product(X[..., rows, :])`` over row tiles (checkpointed when ``graph``)."""
    if n <= tile:
        return product(X)
    if graph:
        parts = [
            checkpoint(product, X[..., start : start + tile, :], use_reentrant=False)
            for start in range(0, n, tile)
        ]
        return torch.cat([p.expand(*batch, p.shape[-2], p.shape[-1]) for p in parts], dim=-2)
    out = None
    for start in range(0, n, tile):
        part = product(X[..., start : start + tile, :])
        if out is None:
            out = part.new_empty(*batch, n, k)
        out[..., start : start + part.shape[-2], :] = part
    return out

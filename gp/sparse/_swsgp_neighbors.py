"""Nearest inducing inputs of each query point: tiled brute force (any device) or a k-d tree.

The selection is not differentiable (it is piecewise constant in the inputs: no gradient
flows through the choice of neighbours); it is recomputed from the current inducing inputs at
every call. For a batch of independent GPs (queries ``(*batch, n, d)`` against their own
inducing inputs ``(*batch, M, d)``) the brute-force search is one batched computation; the
k-d tree and the grid are CPU structures built per inducing set, so they loop over the batch.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
from torch import Tensor

from gp.kernels.matvec import default_tile_size

__all__ = ["NEIGHBOR_METHODS", "nearest_inducing", "resolve_method"]

NEIGHBOR_METHODS = ("auto", "brute", "kdtree", "grid")
_KDTREE_MAX_DIM = 8  # k-d trees lose to brute force in higher dimensions
_GRID_MAX_DIM = 3


def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def resolve_method(method: str, X: Tensor) -> str:
    """The search actually used for ``method`` on inputs like ``X`` (n, d)."""
    if method not in NEIGHBOR_METHODS:
        raise ValueError(f"neighbor_method must be one of {NEIGHBOR_METHODS}, got {method!r}")
    cpu, d = X.device.type == "cpu", X.shape[-1]
    if method == "auto":
        if cpu and d <= _GRID_MAX_DIM and _numba_installed():
            return "grid"
        return "kdtree" if cpu and d <= _KDTREE_MAX_DIM else "brute"
    if method in ("kdtree", "grid") and not cpu:
        raise ValueError(
            f"neighbor_method={method!r} runs on CPU only; use 'brute' on other devices"
        )
    if method == "grid":
        if d > _GRID_MAX_DIM:
            raise ValueError(f"neighbor_method='grid' needs d <= {_GRID_MAX_DIM}, got d = {d}")
        if not _numba_installed():
            raise ValueError("neighbor_method='grid' needs numba (pip install bdlgp[fast])")
    return method


def _brute_force(X: Tensor, Z: Tensor, k: int, tile_size: int | None) -> Tensor:
    # ||x - z||^2 = ||x||^2 - 2 x.z + ||z||^2; ||x||^2 is constant per row, so it is left out
    # of the ranking. One tile holds ``tile x M`` distances per GP of the batch (about 64 MiB
    # in all by default). X (G, n, d) and Z (G, M, d) for a batch of G GPs, else 2-D.
    batched = X.dim() == 3
    G, M = (X.shape[0] if batched else 1), Z.shape[-2]
    tile = default_tile_size(M, G, X.dtype) if tile_size is None else tile_size
    z_sq = Z.pow(2).sum(-1)
    n = X.shape[-2]
    out = torch.empty(*X.shape[:-1], k, dtype=torch.long, device=X.device)
    for start in range(0, n, tile):
        x = X[..., start : start + tile, :]
        if batched:
            scores = torch.baddbmm(z_sq.unsqueeze(-2), x, Z.mT, beta=1.0, alpha=-2.0)
        else:
            scores = torch.addmm(z_sq, x, Z.mT, beta=1.0, alpha=-2.0)
        out[..., start : start + tile, :] = scores.topk(
            k, dim=-1, largest=False, sorted=True
        ).indices
    return out


def _kdtree(X: Tensor, Z: Tensor, k: int) -> Tensor:
    from scipy.spatial import cKDTree

    tree = cKDTree(Z.cpu().numpy().astype(np.float64, copy=False))
    _, idx = tree.query(X.cpu().numpy().astype(np.float64, copy=False), k=k, workers=1)
    idx = np.asarray(idx, dtype=np.int64).reshape(X.shape[0], k)
    return torch.from_numpy(idx).to(X.device)


@torch.no_grad()
def nearest_inducing(
    X: Tensor,
    Z: Tensor,
    k: int,
    *,
    method: str = "auto",
    tile_size: int | None = None,
) -> Tensor:
    """Indices of the ``k`` nearest rows of ``Z`` (Euclidean) for every row of ``X``.

    Parameters
    ----------
    X : Tensor, shape (n, d) or (*batch, n, d)
        Query points; with batch dimensions, each GP's queries against its own ``Z``.
    Z : Tensor, shape (M, d) or (*batch, M, d)
        Inducing inputs (the same batch shape as ``X``).
    k : int
        Neighbours per query, ``1 <= k <= M``.
    method : {"auto", "brute", "kdtree", "grid"}, default "auto"
        ``"brute"``: exact distances in row tiles of bounded memory (``tile_size x M``
        entries), any device. ``"kdtree"``: ``scipy.spatial.cKDTree`` rebuilt on ``Z`` at each
        call (CPU, small ``d``). ``"grid"``: exact search on a uniform cell grid rebuilt at
        each call, compiled with numba (CPU, ``d <= 3``). ``"auto"``: grid on CPU for
        ``d <= 3`` when numba is installed, else the tree on CPU for ``d <= 8``, else brute
        force. All are exact; they can differ only in the order of exactly tied distances.
        With batch dimensions brute force is one batched computation, the tree and the grid
        loop over the batch.
    tile_size : int, optional
        Query rows per brute-force tile; default about 64 MiB of distances per tile.

    Returns
    -------
    Tensor, shape (n, k) or (*batch, n, k), dtype long
        Neighbour indices (into each GP's own ``Z``) sorted by increasing distance.
    """
    if (
        X.dim() < 2
        or Z.dim() != X.dim()
        or X.shape[-1] != Z.shape[-1]
        or X.shape[:-2] != Z.shape[:-2]
    ):
        raise ValueError(
            "X and Z must have shapes (*batch, n, d) and (*batch, M, d) with the same batch "
            f"shape, got {tuple(X.shape)} and {tuple(Z.shape)}"
        )
    if not 1 <= k <= Z.shape[-2]:
        raise ValueError(f"k must lie in [1, M = {Z.shape[-2]}], got {k}")
    if tile_size is not None and (isinstance(tile_size, bool) or tile_size < 1):
        raise ValueError(f"tile_size must be a positive int or None, got {tile_size!r}")
    if X.shape[-2] == 0:
        return torch.empty(*X.shape[:-1], k, dtype=torch.long, device=X.device)
    if X.dim() > 2:
        batch = X.shape[:-2]
        Xf, Zf = X.reshape(-1, *X.shape[-2:]), Z.reshape(-1, *Z.shape[-2:])
        if resolve_method(method, X) == "brute":
            idx = _brute_force(Xf.detach(), Zf.detach().to(X.dtype), k, tile_size)
        else:  # CPU structures built per inducing set
            idx = torch.stack(
                [nearest_inducing(x, z, k, method=method) for x, z in zip(Xf, Zf, strict=True)]
            )
        return idx.reshape(*batch, *idx.shape[-2:])
    resolved = resolve_method(method, X)
    if resolved == "kdtree":
        return _kdtree(X.detach(), Z.detach(), k)
    if resolved == "grid":
        from gp.sparse._swsgp_grid import grid_knn

        idx = grid_knn(Z.detach().double().numpy(), X.detach().double().numpy(), k)
        return torch.from_numpy(idx)
    return _brute_force(X.detach(), Z.detach().to(X.dtype), k, tile_size)

"""Exact k-nearest-neighbour search on a uniform cell grid, compiled with numba (d <= 3).

Private module of :mod:`gp.sparse._swsgp_neighbors`; importing it imports numba (optional,
``pip install bdlgp[fast]``). The inducing inputs are bucketed into cubic cells sized so that a
cell holds about ``k / 4`` of them; each query scans shells of cells around its own cell and
stops once the ``k``-th best distance is no larger than the distance to any unscanned cell, so
the result is exact (not approximate). Rebuilding the grid is O(M), cheap enough to do at
every training step.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["grid_knn"]


@njit(cache=False)
def _bucket(Z, lo, cs, g):  # noqa: ANN001, ANN202
    """Cell start offsets ``counts`` (n_cells + 1) and the rows of ``Z`` ordered by cell."""
    M = Z.shape[0]
    n_cells = g[0] * g[1] * g[2]
    cell_of = np.empty(M, dtype=np.int64)
    counts = np.zeros(n_cells + 1, dtype=np.int64)
    for j in range(M):
        flat = 0
        for i in range(3):
            c = int((Z[j, i] - lo[i]) / cs)
            c = min(max(c, 0), g[i] - 1)
            flat = flat * g[i] + c
        cell_of[j] = flat
        counts[flat + 1] += 1
    for c in range(n_cells):
        counts[c + 1] += counts[c]
    fill = counts[:-1].copy()
    order = np.empty(M, dtype=np.int64)
    for j in range(M):
        order[fill[cell_of[j]]] = j
        fill[cell_of[j]] += 1
    return counts, order


@njit(cache=False)
def _write_sorted(best_d, best_i, k, out_row):  # noqa: ANN001, ANN202
    """Insertion-sort the ``k`` candidates by distance and write their indices to ``out_row``."""
    for a in range(1, k):
        dv, iv = best_d[a], best_i[a]
        b = a - 1
        while b >= 0 and best_d[b] > dv:
            best_d[b + 1] = best_d[b]
            best_i[b + 1] = best_i[b]
            b -= 1
        best_d[b + 1] = dv
        best_i[b + 1] = iv
    for a in range(k):
        out_row[a] = best_i[a]


@njit(cache=False)
def _grid_knn(Z, X, k, lo, cs, g, out):  # noqa: ANN001, ANN202
    n = X.shape[0]
    counts, order = _bucket(Z, lo, cs, g)
    best_d = np.empty(k, dtype=np.float64)
    best_i = np.empty(k, dtype=np.int64)
    cq = np.empty(3, dtype=np.int64)
    for q in range(n):
        x0, x1, x2 = X[q, 0], X[q, 1], X[q, 2]
        for i in range(3):
            c = int(math.floor((X[q, i] - lo[i]) / cs))
            cq[i] = min(max(c, 0), g[i] - 1)
        count = 0  # best_d[:count] is a max-heap of squared distances once count == k
        r = 0
        while True:
            a0, b0 = max(cq[0] - r, 0), min(cq[0] + r, g[0] - 1)
            a1, b1 = max(cq[1] - r, 0), min(cq[1] + r, g[1] - 1)
            a2, b2 = max(cq[2] - r, 0), min(cq[2] + r, g[2] - 1)
            for c0 in range(a0, b0 + 1):
                e0 = abs(c0 - cq[0]) == r
                t = max(lo[0] + c0 * cs - x0, x0 - lo[0] - (c0 + 1) * cs, 0.0)
                box0 = t * t
                for c1 in range(a1, b1 + 1):
                    e1 = e0 or abs(c1 - cq[1]) == r
                    t = max(lo[1] + c1 * cs - x1, x1 - lo[1] - (c1 + 1) * cs, 0.0)
                    box1 = box0 + t * t
                    for c2 in range(a2, b2 + 1):
                        if not (e1 or abs(c2 - cq[2]) == r):
                            continue  # inside the previous shells
                        t = max(lo[2] + c2 * cs - x2, x2 - lo[2] - (c2 + 1) * cs, 0.0)
                        if count == k and box1 + t * t > best_d[0]:
                            continue  # the whole cell is farther than the current k-th
                        flat = (c0 * g[1] + c1) * g[2] + c2
                        for p in range(counts[flat], counts[flat + 1]):
                            j = order[p]
                            t0, t1, t2 = x0 - Z[j, 0], x1 - Z[j, 1], x2 - Z[j, 2]
                            d = t0 * t0 + t1 * t1 + t2 * t2
                            if count < k:
                                best_d[count] = d
                                best_i[count] = j
                                count += 1
                                if count == k:
                                    for h in range(k // 2 - 1, -1, -1):
                                        _sift_down(best_d, best_i, h, k)
                            elif d < best_d[0]:
                                best_d[0] = d
                                best_i[0] = j
                                _sift_down(best_d, best_i, 0, k)
            # Distance from the query to the nearest face of the scanned block that has cells
            # beyond it; every unscanned inducing input is at least that far away.
            bound = np.inf
            for i in range(3):
                if cq[i] - r > 0:
                    bound = min(bound, X[q, i] - (lo[i] + (cq[i] - r) * cs))
                if cq[i] + r < g[i] - 1:
                    bound = min(bound, lo[i] + (cq[i] + r + 1) * cs - X[q, i])
            if bound == np.inf or (count == k and best_d[0] <= bound * bound):
                break
            r += 1
        _write_sorted(best_d, best_i, k, out[q])


@njit(cache=False)
def _sift_down(d, idx, h, k):  # noqa: ANN001, ANN202
    """Restore the max-heap property of ``d[:k]`` (with payload ``idx``) below node ``h``."""
    while True:
        child = 2 * h + 1
        if child >= k:
            return
        if child + 1 < k and d[child + 1] > d[child]:
            child += 1
        if d[child] <= d[h]:
            return
        d[h], d[child] = d[child], d[h]
        idx[h], idx[child] = idx[child], idx[h]
        h = child


def grid_knn(Z: np.ndarray, X: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` nearest rows of ``Z`` for each row of ``X`` (exact, sorted).

    Parameters
    ----------
    Z : ndarray, shape (M, d), d <= 3
    X : ndarray, shape (n, d)
    k : int, 1 <= k <= M

    Returns
    -------
    ndarray, shape (n, k), int64
    """
    M, d = Z.shape
    Z3 = np.zeros((M, 3), dtype=np.float64)
    X3 = np.zeros((X.shape[0], 3), dtype=np.float64)
    Z3[:, :d] = Z
    X3[:, :d] = X
    lo = Z3.min(0)
    extent = Z3.max(0) - lo
    live = extent > 0
    dims = int(live.sum())
    per_cell = max(k / 4.0, 1.0)
    n_cells = max(M / per_cell, 1.0)
    if dims == 0:
        cs = 1.0
    else:
        cs = float(np.prod(extent[live]) / n_cells) ** (1.0 / dims)
        cs = max(cs, float(extent[live].max()) / 256.0)  # at most 256 cells per axis
    g = np.where(live, np.minimum(np.ceil(extent / cs), 256), 1).astype(np.int64)
    g = np.maximum(g, 1)
    out = np.empty((X.shape[0], k), dtype=np.int64)
    _grid_knn(Z3, X3, k, lo, cs, g, out)
    return out

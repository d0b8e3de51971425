"""Choosing inducing inputs from data: k-means++ seeding or a uniformly random subset."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["INIT_METHODS", "nearest_neighbour_noise_variance", "select_inducing_points"]

INIT_METHODS = ("kmeans++", "random")
#: k-means++ seeds from at most this many points (a uniform subsample of larger data sets)
KMEANS_MAX_POINTS = 20_000


#: the nearest-neighbour noise estimate searches at most this many points ...
NN_MAX_POINTS = 50_000
#: ... for the neighbours of at most this many query points
NN_QUERIES = 2_000


def _select_one(X: Tensor, num_inducing: int, method: str, gen: torch.Generator) -> Tensor:
    """``num_inducing`` rows of ``X`` (n, d) chosen by ``method``; shape (num_inducing, d)."""
    n = X.shape[0]
    if method == "random":
        return X[torch.randperm(n, generator=gen)[:num_inducing].to(X.device)].clone()
    pool = X
    if n > max(KMEANS_MAX_POINTS, num_inducing):
        pool = X[torch.randperm(n, generator=gen)[:KMEANS_MAX_POINTS].to(X.device)]
    from sklearn.cluster import kmeans_plusplus  # scikit-learn is loaded on first use

    seed = int(torch.randint(0, 2**31 - 1, (), generator=gen))
    points = pool.detach().cpu().to(torch.float64).numpy()
    _, index = kmeans_plusplus(points, num_inducing, random_state=np.random.RandomState(seed))
    return pool[torch.as_tensor(index, device=X.device)].clone()


def select_inducing_points(
    X: Tensor, num_inducing: int, method: str = "kmeans++", seed: int = 0
) -> Tensor:
    """Inducing inputs chosen among the rows of ``X``.

    ``"kmeans++"`` runs scikit-learn's k-means++ seeding (``sklearn.cluster.kmeans_plusplus``:
    each next point drawn with probability proportional to its squared distance to the points
    already chosen, so the points spread over the data) on at most
    :data:`KMEANS_MAX_POINTS` rows; ``"random"`` takes a uniformly random subset. Both return
    data points, so distinct rows of ``X`` give distinct inducing points.

    Parameters
    ----------
    X : Tensor, shape (..., n, d)
        Finite inputs; each batch element gets its own selection.
    num_inducing : int
        Number ``M`` of inducing points, ``1 <= M <= n``.
    method : {"kmeans++", "random"}, default "kmeans++"
    seed : int, default 0
        Seed of the selection (the global torch random state is untouched).

    Returns
    -------
    Tensor, shape (..., M, d)
    """
    if method not in INIT_METHODS:
        raise ValueError(f"init must be one of {INIT_METHODS}, got {method!r}")
    if not isinstance(X, Tensor) or X.dim() < 2:
        raise ValueError(f"X must be a tensor of shape (..., n, d), got {getattr(X, 'shape', X)}")
    n = X.shape[-2]
    if isinstance(num_inducing, bool) or not isinstance(num_inducing, int) or num_inducing < 1:
        raise ValueError(f"num_inducing must be a positive integer, got {num_inducing!r}")
    if num_inducing > n:
        raise ValueError(
            f"num_inducing = {num_inducing} exceeds the number of data points n = {n}; "
            "inducing points are chosen among the data, so use at most n of them"
        )
    gen = torch.Generator().manual_seed(seed)
    flat = X.reshape(-1, n, X.shape[-1])
    chosen = [_select_one(x, num_inducing, method, gen) for x in flat]
    return torch.stack(chosen).reshape(*X.shape[:-2], num_inducing, X.shape[-1])


def nearest_neighbour_noise_variance(X: Tensor, y: Tensor, seed: int = 0) -> Tensor:
    """Difference-based estimate of the observation-noise variance from nearest neighbours.

    For each of up to :data:`NN_QUERIES` points ``x_i`` with nearest other input ``x_j``
    (searched among up to :data:`NN_MAX_POINTS` points),
    ``E[(y_i - y_j)^2] / 2 = sigma^2 + (f(x_i) - f(x_j))^2 / 2``, so the mean of
    ``(y_i - y_j)^2 / 2`` estimates the noise variance ``sigma^2`` with a positive bias that
    vanishes as neighbours get closer (Rice 1984, in several dimensions). In high dimensions
    neighbours are far apart and the estimate tends to ``Var(y)``; callers clamp it.

    Parameters
    ----------
    X : Tensor, shape (..., n, d)
    y : Tensor, shape (..., n)
        Finite data with ``n >= 2``.
    seed : int, default 0
        Seed of the subsampling.

    Returns
    -------
    Tensor, shape (...)
        One estimate per batch element, in the dtype and on the device of ``y``.
    """
    from sklearn.neighbors import NearestNeighbors  # scikit-learn is loaded on first use

    n, d = X.shape[-2:]
    if n < 2:
        raise ValueError(f"the noise estimate needs at least 2 points, got n = {n}")
    gen = torch.Generator().manual_seed(seed)
    flat_X = X.detach().reshape(-1, n, d).cpu().to(torch.float64)
    flat_y = y.detach().expand(*X.shape[:-1]).reshape(-1, n).cpu().to(torch.float64)
    estimates = []
    for xb, yb in zip(flat_X, flat_y, strict=True):
        pool = torch.randperm(n, generator=gen)[:NN_MAX_POINTS]
        queries = pool[:NN_QUERIES]
        index = NearestNeighbors(n_neighbors=2).fit(xb[pool].numpy())
        _, nn = index.kneighbors(xb[queries].numpy())
        neighbour = pool[torch.as_tensor(nn[:, 1])]  # nn[:, 0] is the query point itself
        estimates.append(0.5 * (yb[queries] - yb[neighbour]).square().mean())
    out = torch.stack(estimates).reshape(X.shape[:-2])
    return out.to(dtype=y.dtype, device=y.device)

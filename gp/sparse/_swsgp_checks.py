"""Argument checks and gather helpers of :class:`gp.sparse.swsgp.SWSGP`."""

from __future__ import annotations

import torch
from gpytorch.kernels import Kernel
from gpytorch.likelihoods import Likelihood
from torch import Tensor

from bdl.core.validation import check_inputs, check_int, check_positive
from gp.likelihoods import make_likelihood
from gp.sparse._swsgp_neighbors import NEIGHBOR_METHODS

__all__ = [
    "SWSGP_LIKELIHOODS",
    "check_swsgp_args",
    "check_swsgp_inputs",
    "check_swsgp_targets",
    "cross_blocks",
    "dense",
    "fits_batch",
    "gather_rows",
    "swsgp_likelihood",
]

SWSGP_LIKELIHOODS = ("gaussian", "bernoulli")


def dense(value: object) -> Tensor:
    """A gpytorch lazy kernel value as a dense tensor."""
    return value.to_dense() if hasattr(value, "to_dense") else value


def fits_batch(shape: torch.Size, batch_shape: torch.Size) -> bool:
    """Whether ``shape`` broadcasts to exactly ``batch_shape``."""
    try:
        return torch.broadcast_shapes(shape, batch_shape) == batch_shape
    except RuntimeError:
        return False


def gather_rows(values: Tensor, idx: Tensor) -> Tensor:
    """``values[..., idx, ...]`` per GP: values (*batch, M, ...), idx (*batch, n, H).

    Returns (*batch, n, H, ...). Without batch dims plain indexing; with them one gather on
    the flattened ``(G M, ...)`` rows (no loop over the GPs).
    """
    batch_dims = idx.dim() - 2
    if batch_dims == 0:
        return values[idx]
    G, M = idx.shape[:batch_dims].numel(), values.shape[batch_dims]
    flat = values.reshape(G * M, *values.shape[batch_dims + 1 :])
    offsets = torch.arange(G, device=idx.device).reshape(*idx.shape[:batch_dims], 1, 1) * M
    return flat[idx + offsets]


def cross_blocks(kernel: Kernel, X: Tensor, Z_a: Tensor) -> Tensor:
    """``k(x_i, Z_a(i))``: X (*batch, B, d), Z_a (*batch, B, H, d) -> (*batch, B, H)."""
    if X.dim() == 2:
        return dense(kernel(X.unsqueeze(-2), Z_a)).squeeze(-2)
    # gpytorch broadcasts a batch kernel against the leading dims: put the points first.
    K = dense(kernel(X.unsqueeze(-2).movedim(-3, 0), Z_a.movedim(-3, 0)))
    return K.squeeze(-2).movedim(0, -2)


def _check_batch_shape(batch_shape: object) -> torch.Size:
    try:
        batch_shape = torch.Size(batch_shape)
    except TypeError as err:
        raise TypeError(f"batch_shape must be a tuple of ints, got {batch_shape!r}") from err
    if any(b < 1 for b in batch_shape):
        raise ValueError(f"batch_shape must hold positive sizes, got {tuple(batch_shape)}")
    return batch_shape


def _check_inducing(Z: object, batch_shape: torch.Size) -> Tensor:
    expected = "(M, d)" if not batch_shape else f"(M, d) or {(*batch_shape, 'M', 'd')}"
    if not isinstance(Z, Tensor) or Z.dim() < 2 or not fits_batch(Z.shape[:-2], batch_shape):
        raise ValueError(
            f"inducing_points must be a tensor of shape {expected}, got {getattr(Z, 'shape', Z)!r}"
        )
    if not Z.dtype.is_floating_point:
        raise TypeError(f"inducing_points must be floating point, got {Z.dtype}")
    if Z.shape[-2] == 0 or Z.shape[-1] == 0:
        raise ValueError(f"inducing_points is empty (shape {tuple(Z.shape)})")
    if not bool(torch.isfinite(Z).all()):
        raise ValueError("inducing_points contains NaN or inf")
    return Z.expand(*batch_shape, *Z.shape[-2:])


def check_swsgp_args(
    kernel: object,
    inducing_points: object,
    batch_shape: object,
    num_neighbors: object,
    rank: object,
    *,
    jitter: object,
    init_variance: object,
    neighbor_method: object,
    chunk_size: object,
    kl_subsample: object,
) -> tuple[torch.Size, Tensor]:
    """Validate the constructor arguments; returns the batch shape and the inducing inputs
    expanded to ``(*batch_shape, M, d)``."""
    if not isinstance(kernel, Kernel):
        raise TypeError(f"kernel must be a gpytorch Kernel, got {type(kernel).__name__}")
    batch_shape = _check_batch_shape(batch_shape)
    if not fits_batch(kernel.batch_shape, batch_shape):
        raise ValueError(
            f"kernel has batch_shape {tuple(kernel.batch_shape)}, which does not broadcast "
            f"to the model's batch_shape {tuple(batch_shape)}"
        )
    Z = _check_inducing(inducing_points, batch_shape)
    M = Z.shape[-2]
    check_int("num_neighbors", num_neighbors)
    if num_neighbors > M:
        raise ValueError(
            f"num_neighbors (H = {num_neighbors}) must not exceed the number of inducing "
            f"points (M = {M})"
        )
    check_int("rank", rank, minimum=0)
    if init_variance is not None:
        check_positive("init_variance", init_variance)
    if jitter is not None:
        check_positive("jitter", jitter, allow_zero=True)
    if neighbor_method not in NEIGHBOR_METHODS:
        raise ValueError(
            f"neighbor_method must be one of {NEIGHBOR_METHODS}, got {neighbor_method!r}"
        )
    check_int("chunk_size", chunk_size)
    if kl_subsample is not None:
        check_int("kl_subsample", kl_subsample)
    return batch_shape, Z


def swsgp_likelihood(likelihood: object, batch_shape: torch.Size) -> Likelihood:
    """The likelihood object: ``"gaussian"`` (one noise variance per GP, bounded below by
    :data:`gp.likelihoods.NOISE_LOWER_BOUND`), ``"bernoulli"`` or a gpytorch likelihood."""
    if isinstance(likelihood, str):
        if likelihood not in SWSGP_LIKELIHOODS:
            raise ValueError(
                f"likelihood must be one of {SWSGP_LIKELIHOODS} or a gpytorch Likelihood, "
                f"got {likelihood!r}"
            )
        return make_likelihood(likelihood, batch_shape=batch_shape)
    if not isinstance(likelihood, Likelihood):
        raise TypeError(
            f"likelihood must be a string or a gpytorch Likelihood, got {type(likelihood)}"
        )
    return likelihood


def _check_device(X: Tensor, Z: Tensor) -> Tensor:
    if X.device != Z.device:
        raise ValueError(
            f"X is on {X.device} but the model is on {Z.device}; move X or the model "
            "(model.to(...))"
        )
    return X.to(Z.dtype)


def check_swsgp_inputs(X: object, Z: Tensor, batch_shape: torch.Size, *, exact: bool) -> Tensor:
    """Validated inputs in the model's dtype.

    With ``exact`` (training data) the batch dims must broadcast to exactly ``batch_shape``
    and the result is expanded to ``(*batch_shape, n, d)``; otherwise (queries) they need
    only broadcast with it, and ``X`` keeps its shape ``(..., n, d)``.
    """
    d = Z.shape[-1]
    expected = f"(n, {d})" if not batch_shape else f"(n, {d}) or {(*batch_shape, 'n', d)}"
    if not exact:
        expected = f"(..., n, {d}) with leading dims broadcastable to {tuple(batch_shape)}"
    if not isinstance(X, Tensor):
        raise TypeError(f"X must be a torch.Tensor of shape {expected}, got {type(X).__name__}")
    if X.dim() == 1 and d == 1:
        X = X.unsqueeze(-1)
    if exact:
        ok = X.dim() >= 2 and fits_batch(X.shape[:-2], batch_shape)
    else:
        ok = X.dim() >= 2 and _broadcasts(X.shape[:-2], batch_shape)
    if not ok or X.shape[-1] != d:
        raise ValueError(
            f"X must have shape {expected} (d matching the inducing points, batch dims "
            f"the model's batch_shape {tuple(batch_shape)}), got {tuple(X.shape)}"
        )
    if X.shape[-2] == 0:
        raise ValueError("X is empty; give at least one point")
    X = _check_device(check_inputs(X, d), Z)
    return X.expand(*batch_shape, *X.shape[-2:]) if exact and batch_shape else X


def _broadcasts(shape: torch.Size, batch_shape: torch.Size) -> bool:
    try:
        torch.broadcast_shapes(shape, batch_shape)
    except RuntimeError:
        return False
    return True


def check_swsgp_targets(y: object, X: Tensor, batch_shape: torch.Size) -> Tensor:
    """Validated targets, shape ``(*batch_shape, n)`` (a shared (n,) is expanded)."""
    n = X.shape[-2]
    expected = f"({n},) or ({n}, 1)" if not batch_shape else f"({n},) or {(*batch_shape, n)}"
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor of shape {expected}, got {type(y).__name__}")
    ok = y.dim() >= 1 and y.shape[-1] == n and fits_batch(y.shape[:-1], batch_shape)
    if not ok and y.dim() >= 2 and y.shape[-2:] == (n, 1):
        y = y.squeeze(-1)
        ok = fits_batch(y.shape[:-1], batch_shape)
    if not ok:
        raise ValueError(
            f"y has shape {tuple(y.shape)} but X has shape {tuple(X.shape)}; expected y of "
            f"shape {expected}"
        )
    y = y.to(X.dtype)
    if not bool(torch.isfinite(y).all()):
        raise ValueError("y contains NaN or inf; targets must be finite")
    return y.expand(*batch_shape, n) if batch_shape else y

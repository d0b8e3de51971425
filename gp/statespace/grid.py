"""Time grids for the Kalman recursions: sorting, merging prediction times, step lengths."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["TimeGrid", "make_grid"]


class TimeGrid(NamedTuple):
    """Sorted time grid(s) with the observations placed on them.

    ``...`` below is the batch shape of independent series. The grid is shared (no batch
    dimensions on ``times``, ``dt``, ``zero_step`` and the index tensors) when the training
    and prediction times are shared by every series, and per series otherwise.

    Attributes
    ----------
    times : Tensor, shape (N,) or (..., N)
        Sorted times (training times, then any prediction times, merged; ties kept).
    y : Tensor, shape (..., N)
        Observations on the grid; NaN where nothing is observed (missing values and
        prediction times).
    dt : Tensor, shape (N - 1,) or (..., N - 1)
        Step lengths ``times[..., k + 1] - times[..., k] >= 0``.
    zero_step : Tensor (bool), shape (N - 1,) or (..., N - 1)
        ``dt == 0`` (repeated timestamps).
    train_index : Tensor (long), shape (n,) or (..., n)
        Grid position of each training time, in the caller's order.
    new_index : Tensor (long), shape (n_new,) or (..., n_new)
        Grid position of each prediction time, in the caller's order (empty without any).
    """

    times: Tensor
    y: Tensor
    dt: Tensor
    zero_step: Tensor
    train_index: Tensor
    new_index: Tensor


def make_grid(t: Tensor, y: Tensor, t_new: Tensor | None = None) -> TimeGrid:
    """Sort training times (and merge prediction times in as missing observations).

    Every series is sorted independently (a stable sort along the last dimension).

    Parameters
    ----------
    t : Tensor, shape (n,) or (..., n)
        Training times, any order, repeats allowed; shared by all series or one row each.
    y : Tensor, shape (n,) or (..., n)
        Observations at ``t`` (NaN = missing); the batch shapes of ``t``, ``y`` and
        ``t_new`` must broadcast.
    t_new : Tensor, shape (n_new,) or (..., n_new), optional
        Prediction times (any order; may coincide with training times).

    Returns
    -------
    TimeGrid
        Positions map back to the caller's order, so outputs on the grid can be un-sorted by
        gathering ``grid_values[..., train_index]`` / ``grid_values[..., new_index]`` along
        the time dimension.
    """
    n = t.shape[-1]
    if t_new is None:
        t_new = t.new_empty(0)
    batch = torch.broadcast_shapes(t.shape[:-1], y.shape[:-1], t_new.shape[:-1])
    if t.dim() > 1 or t_new.dim() > 1:  # per-series grids
        t = t.expand(*batch, n)
        t_new = t_new.expand(*batch, t_new.shape[-1])
    times = torch.cat([t, t_new], dim=-1)
    y = y.expand(*batch, n)
    values = torch.cat([y, y.new_full((*batch, t_new.shape[-1]), float("nan"))], dim=-1)
    times, order = torch.sort(times, dim=-1, stable=True)
    position = torch.empty_like(order)
    ranks = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    position.scatter_(-1, order, ranks)
    values = values[..., order] if order.dim() == 1 else values.gather(-1, order)
    dt = times.diff(dim=-1)
    return TimeGrid(
        times=times,
        y=values,
        dt=dt,
        zero_step=dt == 0,
        train_index=position[..., :n],
        new_index=position[..., n:],
    )

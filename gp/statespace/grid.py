"""Time grids for the Kalman recursions: sorting, merging prediction times, step lengths."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["TimeGrid", "make_grid"]


class TimeGrid(NamedTuple):
    """Sorted time grid with the observations placed on it.

    Attributes
    ----------
    times : Tensor, shape (N,)
        Sorted times (training times, then any prediction times, merged; ties kept).
    y : Tensor, shape (N,)
        Observations on the grid; NaN where nothing is observed (missing values and
        prediction times).
    dt : Tensor, shape (N - 1,)
        Step lengths ``times[k + 1] - times[k] >= 0``.
    zero_step : Tensor (bool), shape (N - 1,)
        ``dt == 0`` (repeated timestamps).
    train_index : Tensor (long), shape (n,)
        Grid position of each training time, in the caller's order.
    new_index : Tensor (long), shape (n_new,)
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

    Parameters
    ----------
    t : Tensor, shape (n,)
        Training times, any order, repeats allowed.
    y : Tensor, shape (n,)
        Observations at ``t`` (NaN = missing).
    t_new : Tensor, shape (n_new,), optional
        Prediction times (any order; may coincide with training times).

    Returns
    -------
    TimeGrid
        Positions map back to the caller's order, so outputs on the grid can be un-sorted by
        ``grid_values[train_index]`` / ``grid_values[new_index]``.
    """
    n = t.shape[0]
    if t_new is None:
        t_new = t.new_empty(0)
    times = torch.cat([t, t_new])
    values = torch.cat([y, y.new_full(t_new.shape, float("nan"))])
    times, order = torch.sort(times, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    dt = times.diff()
    return TimeGrid(
        times=times,
        y=values[order],
        dt=dt,
        zero_step=dt == 0,
        train_index=position[:n],
        new_index=position[n:],
    )

"""State-space (Markovian) Gaussian processes on a 1-D input.

A stationary kernel with a rational spectrum is an LTI SDE (:mod:`.kernels`, :mod:`.sde`);
discretised exactly on the data's time grid (:mod:`.discretise`, :mod:`.grid`), GP regression
becomes Kalman filtering and RTS smoothing at O(n) cost, sequentially (:mod:`.kalman`) or by
parallel-in-time scans (:mod:`.parallel`). The user-facing
model is :class:`StateSpaceGP`.
"""

from .discretise import discretise
from .grid import TimeGrid, make_grid
from .kalman import FilterResult, kalman_filter, rts_smoother
from .kernels import kernel_to_sde, matern_sde
from .model import StateSpaceGP
from .parallel import (
    associative_scan,
    parallel_kalman_filter,
    parallel_rts_smoother,
    resolve_method,
)
from .periodic import cosine_sde, periodic_sde, periodic_series, product_sde
from .sde import LTISDE, stack_sdes

__all__ = [
    "LTISDE",
    "FilterResult",
    "StateSpaceGP",
    "TimeGrid",
    "associative_scan",
    "cosine_sde",
    "discretise",
    "kalman_filter",
    "kernel_to_sde",
    "make_grid",
    "matern_sde",
    "parallel_kalman_filter",
    "parallel_rts_smoother",
    "periodic_sde",
    "periodic_series",
    "product_sde",
    "resolve_method",
    "rts_smoother",
    "stack_sdes",
]

"""State-space (Markovian) Gaussian processes on a 1-D input.

A stationary kernel with a rational spectrum is an LTI SDE (:mod:`.kernels`, :mod:`.sde`);
discretised exactly on the data's time grid (:mod:`.discretise`, :mod:`.grid`), GP regression
becomes Kalman filtering and RTS smoothing at O(n) cost, sequentially (:mod:`.kalman`) or by
parallel-in-time scans (:mod:`.parallel`), for one series or a batch; joint posterior
draws come from forward-filtering backward-sampling (:mod:`.ffbs`, packaged by
:mod:`.smoothing`). The user-facing model is :class:`StateSpaceGP` (a
:class:`bdl.core.Model`); :class:`TrendGP` (in :mod:`.trend`) adds a polynomial mean with
a flat prior on its coefficients, and :class:`StateSpaceGPRegressor` (in :mod:`.estimators`)
wraps both as a scikit-learn estimator. Non-Gaussian likelihoods (the classes of
:mod:`gp.likelihoods`: Bernoulli, Poisson) use conjugate-computation variational inference
on Gaussian sites (:mod:`.cvi`, expectations in :mod:`.likelihoods`).
"""

from .cvi import (
    CVIConfig,
    CVIResult,
    CVISites,
    cvi_elbo,
    cvi_posterior,
    cvi_pseudo_data,
    run_cvi,
)
from .discretise import discretise
from .ffbs import StateSpacePosterior, backward_sample, psd_factor
from .grid import TimeGrid, make_grid
from .kalman import FilterResult, kalman_filter, rts_smoother
from .kernels import constant_sde, kernel_to_sde, matern_sde, rescale_time
from .likelihoods import (
    BernoulliLogitLikelihood,
    PoissonLikelihood,
    expected_log_lik,
    expected_log_lik_grads,
    predictive_moments,
)
from .model import StateSpaceGP
from .parallel import (
    associative_scan,
    parallel_kalman_filter,
    parallel_rts_smoother,
    resolve_method,
)
from .periodic import cosine_sde, periodic_sde, periodic_series, product_sde
from .sde import LTISDE, stack_sdes
from .smoothing import filter_grid, noise_on_grid, smoothing_posterior
from .trend import TrendGP

__all__ = [
    "LTISDE",
    "BernoulliLogitLikelihood",
    "CVIConfig",
    "CVIResult",
    "CVISites",
    "FilterResult",
    "PoissonLikelihood",
    "StateSpaceGP",
    "StateSpacePosterior",
    "TimeGrid",
    "TrendGP",
    "associative_scan",
    "backward_sample",
    "cosine_sde",
    "cvi_elbo",
    "cvi_posterior",
    "cvi_pseudo_data",
    "discretise",
    "expected_log_lik",
    "expected_log_lik_grads",
    "filter_grid",
    "kalman_filter",
    "constant_sde",
    "kernel_to_sde",
    "make_grid",
    "matern_sde",
    "noise_on_grid",
    "parallel_kalman_filter",
    "parallel_rts_smoother",
    "periodic_sde",
    "periodic_series",
    "predictive_moments",
    "product_sde",
    "psd_factor",
    "rescale_time",
    "resolve_method",
    "rts_smoother",
    "smoothing_posterior",
    "run_cvi",
    "stack_sdes",
]

"""Named surrogates and acquisitions of :class:`bdl.bo.BayesOpt`, and one proposal step.

Surrogates (estimators, refitted on the observations in the unit cube): ``"gp"`` exact GP
(:class:`gp.GPRegressor` with BoTorch's noise floor 1e-4 on the standardised scale, so
noise-free objectives keep a well-conditioned kernel matrix; a kernel with hyperparameter
priors, e.g. BoTorch's dimension-scaled lengthscale prior, can be given through a callable
surrogate and is then fitted by type-II MAP), ``"svgp"``
(:class:`gp.SparseGPRegressor`, float64), ``"vbll"`` (:class:`bdl.VBLLRegressor`),
``"sgmcmc"`` (:class:`bdl.SGMCMCRegressor`) and ``"ssvi"`` (:class:`bdl.SSVIRegressor`); any
scikit-learn regressor of the library
(cloned before each refit) or a callable ``seed -> estimator`` works too.

Acquisitions (all maximised; :class:`BayesOpt` flips the sign of the objective to minimise):
``"logei"`` and ``"ucb"`` (analytic, ``q = 1``), ``"qlogei"``, ``"qlognei"`` and ``"qucb"``
(quasi-Monte Carlo, any ``q``; BoTorch picks the sampler for the posterior kind) and
``"ts"`` (Thompson sampling from function draws, :func:`bdl.bo.thompson_candidates`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from botorch.acquisition import (
    LogExpectedImprovement,
    UpperConfidenceBound,
    qLogExpectedImprovement,
    qLogNoisyExpectedImprovement,
    qUpperConfidenceBound,
)
from botorch.optim import optimize_acqf
from sklearn.base import clone
from torch import Tensor

from bdl.bo.adapter import BotorchModel
from bdl.bo.thompson import thompson_candidates
from bdl.core.training import seeded

__all__ = ["ACQUISITIONS", "SURROGATES", "make_surrogate", "propose"]

SURROGATES = ("gp", "svgp", "vbll", "sgmcmc", "ssvi")
ACQUISITIONS = ("qlogei", "qlognei", "qucb", "logei", "ucb", "ts")
ANALYTIC = ("logei", "ucb")
#: noise-variance floor of the ``"gp"`` surrogate on the standardised scale (BoTorch's)
GP_NOISE_FLOOR = 1e-4


def make_surrogate(surrogate: Any, seed: int, d: int = 1) -> Any:
    """A fresh, unfitted estimator for one refit on ``d`` inputs, seeded with ``seed``."""
    if isinstance(surrogate, str):
        return _named_surrogate(surrogate, seed, d)
    if hasattr(surrogate, "get_params") and hasattr(surrogate, "fit"):
        est = clone(surrogate)
        if "random_state" in est.get_params():
            est.set_params(random_state=seed)
        return est
    if callable(surrogate):
        return surrogate(seed)
    raise ValueError(
        f"surrogate must be one of {SURROGATES}, a regressor of the library or a callable "
        f"seed -> estimator, got {type(surrogate).__name__}"
    )


def _named_surrogate(name: str, seed: int, d: int) -> Any:
    if name == "gp":
        import gp

        return gp.GPRegressor(noise_lower_bound=GP_NOISE_FLOOR, random_state=seed)
    if name == "svgp":
        import gp

        return gp.SparseGPRegressor(dtype="float64", random_state=seed)
    if name == "vbll":
        import bdl

        return bdl.VBLLRegressor(random_state=seed)
    if name == "sgmcmc":
        import bdl

        return bdl.SGMCMCRegressor(random_state=seed)
    if name == "ssvi":
        import bdl

        return bdl.SSVIRegressor(random_state=seed)
    raise ValueError(f"surrogate must be one of {SURROGATES}, got {name!r}")


def check_acquisition(acquisition: str, q: int) -> None:
    """``ValueError`` naming ``acquisition`` or ``q`` when they do not fit together."""
    if acquisition not in ACQUISITIONS:
        raise ValueError(f"acquisition must be one of {ACQUISITIONS}, got {acquisition!r}")
    if acquisition in ANALYTIC and q != 1:
        raise ValueError(
            f"acquisition={acquisition!r} is analytic and proposes one point: use q=1 or an MC "
            "acquisition ('qlogei', 'qlognei', 'qucb') or 'ts'"
        )


def build_acquisition(
    name: str, model: BotorchModel, X: Tensor, y: Tensor, beta: float
) -> Callable[[Tensor], Tensor]:
    """BoTorch acquisition ``name`` on ``model`` given observations ``X`` (n, d), ``y`` (n,)
    (both in the maximisation convention)."""
    if name == "logei":
        return LogExpectedImprovement(model, best_f=y.max())
    if name == "ucb":
        return UpperConfidenceBound(model, beta=beta)
    if name == "qlogei":
        return qLogExpectedImprovement(model, best_f=y.max())
    if name == "qlognei":
        return qLogNoisyExpectedImprovement(model, X_baseline=X, prune_baseline=True)
    if name == "qucb":
        return qUpperConfidenceBound(model, beta=beta)
    raise ValueError(f"acquisition must be one of {ACQUISITIONS}, got {name!r}")


def propose(
    name: str,
    model: BotorchModel,
    X: Tensor,
    y: Tensor,
    q: int,
    *,
    seed: int,
    beta: float = 2.0,
    num_restarts: int = 10,
    raw_samples: int = 512,
) -> Tensor:
    """``q`` new points in the unit cube maximising acquisition ``name``.

    Parameters
    ----------
    model : BotorchModel
        The surrogate on inputs in ``[0, 1]^d``.
    X : Tensor, shape (n, d)
    y : Tensor, shape (n,)
        Observations so far (unit-cube inputs, values to maximise).
    seed : int
        Seeds the acquisition's base samples and the optimiser's random starts.

    Returns
    -------
    Tensor, shape (q, d)
    """
    d = X.shape[-1]
    bounds = torch.stack([torch.zeros(d), torch.ones(d)]).to(X)
    if name == "ts":
        return thompson_candidates(
            model, bounds, q, num_restarts=num_restarts, raw_samples=raw_samples, seed=seed
        )
    with seeded(seed):
        acq = build_acquisition(name, model, X, y, beta)
        candidates, _ = optimize_acqf(
            acq, bounds, q=q, num_restarts=num_restarts, raw_samples=raw_samples
        )
    return candidates.detach()

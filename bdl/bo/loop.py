"""The ask/tell Bayesian-optimisation loop :class:`BayesOpt`."""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bdl.bo.acquisition import SURROGATES, check_acquisition, make_surrogate, propose
from bdl.bo.adapter import BotorchModel, as_botorch_model
from bdl.core.transforms import Normalize, Standardize
from bdl.core.validation import check_int, check_positive

__all__ = ["BayesOpt"]

#: purposes of the per-step seeds (one stream each, so that resuming continues identically)
_INIT, _FIT, _PROPOSE = 0, 1, 2


def _step_seed(seed: int, step: int, purpose: int) -> int:
    return int(np.random.SeedSequence([seed, step, purpose]).generate_state(1)[0])


class BayesOpt:
    """Bayesian optimisation of a black-box function over a box, by ask and tell.

    Parameters
    ----------
    bounds : Tensor of shape (2, d), or array-like of shape (d, 2)
        Lower and upper bounds of each input: a tensor holds the lower bounds in row 0 and
        the upper ones in row 1 (BoTorch's layout, e.g. a test function's ``bounds``); a list
        or array holds one ``(low, high)`` pair per input (scipy's layout; a ``(2, d)`` array
        with ``d != 2`` is recognised too).
    surrogate : {"gp", "svgp", "vbll", "sgmcmc", "ssvi"}, estimator or callable, default "gp"
        The model of the objective (see :mod:`bdl.bo.acquisition`): refitted on the inputs
        mapped to the unit cube (:class:`bdl.core.transforms.Normalize` on ``bounds``) and the
        standardised values (:class:`bdl.core.transforms.Standardize`).
    acquisition : {"qlogei", "qlognei", "qucb", "logei", "ucb", "ts"}, default "qlogei"
        How the next points are chosen.
    q : int, default 1
        Points proposed per batch.
    seed : int, optional
        Seeds the initial design, every surrogate fit and every acquisition optimisation
        (each from its own stream, so a saved and resumed run continues identically). None
        draws one, kept in :attr:`seed`.
    maximize : bool, default False
        Minimise the objective (like scipy and scikit-optimize) or maximise it.
    n_init : int, optional
        Size of the scrambled Sobol initial design; default ``2 (d + 1)``.
    refit_every : int, default 1
        Refit the surrogate from scratch after this many new batches. In between, a Gaussian
        surrogate is conditioned on the new observations with its hyperparameters and
        features fixed (for a Bayesian last layer the exact recursive update of the head;
        :meth:`bdl.bo.BotorchModel.condition_on_observations`); sample ensembles, which cannot
        be conditioned, are refitted every batch.
    beta : float, default 2.0
        Exploration weight of the UCB acquisitions.
    num_restarts, raw_samples : int, default 10, 512
        Multi-start optimisation of the acquisition (``botorch.optim.optimize_acqf``).
    verbose : bool, default False
        Progress bar in :meth:`run`.

    Attributes
    ----------
    X, y : ndarray, shapes (n, d) and (n,)
        Every observation so far, in the user's units.
    best_x, best_y : ndarray, float
        The best observation.
    history : dict of ndarray
        ``"y"``, ``"best"`` (best so far after each evaluation), ``"batch"`` (0 for the
        initial design) and ``"seconds"`` (per batch: surrogate fit plus proposal).
    """

    def __init__(
        self,
        bounds: Any,
        surrogate: Any = "gp",
        acquisition: str = "qlogei",
        q: int = 1,
        seed: int | None = None,
        maximize: bool = False,
        n_init: int | None = None,
        refit_every: int = 1,
        beta: float = 2.0,
        num_restarts: int = 10,
        raw_samples: int = 512,
        verbose: bool = False,
    ) -> None:
        self.bounds = _check_bounds(bounds)
        d = self.bounds.shape[1]
        if isinstance(surrogate, str) and surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
        self.q = check_int("q", q)
        check_acquisition(acquisition, self.q)
        self.surrogate, self.acquisition = surrogate, acquisition
        self.seed = int(np.random.SeedSequence().entropy % 2**32) if seed is None else int(seed)
        self.maximize = bool(maximize)
        self.n_init = 2 * (d + 1) if n_init is None else check_int("n_init", n_init)
        self.refit_every = check_int("refit_every", refit_every)
        self.beta = check_positive("beta", beta)
        self.num_restarts = check_int("num_restarts", num_restarts)
        self.raw_samples = check_int("raw_samples", raw_samples)
        self.verbose = bool(verbose)
        self._normalize = Normalize(d, method="bounds", bounds=self.bounds)
        self._init_design = self._sobol_design()
        self._reset_data()

    # -- state -------------------------------------------------------------------------------
    def _reset_data(self) -> None:
        d = self.bounds.shape[1]
        self.X = np.empty((0, d))
        self.y = np.empty(0)
        self._batch = np.empty(0, dtype=np.int64)
        self._seconds: list[float] = []
        self._pending: np.ndarray | None = None
        self._pending_seconds = 0.0
        self._fitted: dict[str, Any] | None = None  # estimator, its refit size, outcome map

    @property
    def num_batches(self) -> int:
        """Batches told so far (the initial design counts as batch 0)."""
        return int(self._batch.max()) + 1 if self._batch.size else 0

    def _sobol_design(self) -> np.ndarray:
        from torch.quasirandom import SobolEngine

        d = self.bounds.shape[1]
        engine = SobolEngine(d, scramble=True, seed=_step_seed(self.seed, 0, _INIT))
        unit = engine.draw(self.n_init, dtype=torch.float64)
        return self._normalize.untransform(unit).numpy()

    # -- ask / tell --------------------------------------------------------------------------
    def ask(self) -> np.ndarray:
        """The next points to evaluate, shape (k, d): the rest of the initial design first,
        then ``q`` points per batch. Asking again before :meth:`tell` returns the same points."""
        if self._pending is not None:
            return self._pending.copy()
        start = time.perf_counter()
        if len(self.y) < self.n_init:
            points = self._init_design[len(self.y) :]
        else:
            points = self._propose()
        self._pending = points
        self._pending_seconds = time.perf_counter() - start
        return points.copy()

    def tell(self, X: Any, y: Any) -> BayesOpt:
        """Record the values ``y`` (k,) of the objective at ``X`` (k, d); returns self."""
        X, y = self._check_observations(X, y)
        self.X = np.concatenate([self.X, X])
        self.y = np.concatenate([self.y, y])
        self._batch = np.concatenate([self._batch, np.full(len(y), self.num_batches)])
        self._seconds.append(self._pending_seconds)
        self._pending, self._pending_seconds = None, 0.0
        return self

    def run(self, objective: Any, n_iter: int) -> BayesOpt:
        """Evaluate the initial design (if not done) and ``n_iter`` batches; returns self.

        ``objective`` takes a (k, d) array and returns k values; a ``torch.nn.Module`` (e.g. a
        BoTorch test function) is called with a float64 tensor instead.
        """
        n_iter = check_int("n_iter", n_iter, minimum=0)
        if len(self.y) < self.n_init:
            X = self.ask()
            self.tell(X, _evaluate(objective, X))
        from tqdm.auto import tqdm

        for _ in tqdm(range(n_iter), disable=not self.verbose, desc="BayesOpt"):
            X = self.ask()
            self.tell(X, _evaluate(objective, X))
        return self

    # -- the surrogate -----------------------------------------------------------------------
    def _propose(self) -> np.ndarray:
        model, x, t = self._surrogate_model()
        seed = _step_seed(self.seed, self.num_batches, _PROPOSE)
        unit = propose(
            self.acquisition, model, x, t, self.q, seed=seed, beta=self.beta,
            num_restarts=self.num_restarts, raw_samples=self.raw_samples,
        )  # fmt: skip
        return self._normalize.untransform(unit.to(torch.float64)).numpy()

    def _internal_data(self) -> tuple[Tensor, Tensor]:
        """Unit-cube inputs and values to maximise, as float64 tensors."""
        x = self._normalize(torch.as_tensor(self.X, dtype=torch.float64))
        sign = 1.0 if self.maximize else -1.0
        return x, sign * torch.as_tensor(self.y, dtype=torch.float64)

    def _surrogate_model(self) -> tuple[BotorchModel, Tensor, Tensor]:
        """The surrogate on all observations: refitted when due, else the last fit conditioned
        on the observations since; with the standardised values it sees."""
        x, v = self._internal_data()
        n = len(v)
        fitted = self._fitted
        if fitted is None or self._refit_due(fitted):
            fitted = self._fitted = self._refit_or_keep(fitted, x[:n], v[:n])
        outcome, n_fit = fitted["outcome"], fitted["n"]
        t = outcome(v[:, None])[:, 0]
        model = fitted["model"]
        if n > n_fit:
            try:
                model = model.condition_on_observations(x[n_fit:], t[n_fit:, None])
            except NotImplementedError:
                fitted = self._fitted = self._refit(x, v)
                model, t = fitted["model"], fitted["outcome"](v[:, None])[:, 0]
        return model, x, t

    def _refit_or_keep(self, fitted: dict[str, Any] | None, x: Tensor, v: Tensor) -> dict[str, Any]:
        """A refit; if it fails and a Gaussian fit exists, that fit (conditioned on the new
        observations below) with a warning, so one numerical failure does not end the run."""
        try:
            return self._refit(x, v)
        except (RuntimeError, ValueError) as err:
            if fitted is None:
                raise
            warnings.warn(
                f"refitting the surrogate on {len(v)} observations failed ({err}); the last fit "
                f"(on {fitted['n']}) is conditioned on the new observations instead",
                RuntimeWarning,
                stacklevel=3,
            )
            return fitted

    def _refit_due(self, fitted: dict[str, Any]) -> bool:
        batches_since = len(np.unique(self._batch[fitted["n"] :]))
        return batches_since >= self.refit_every or fitted["n"] < self.n_init

    def _refit(self, x: Tensor, v: Tensor) -> dict[str, Any]:
        """A fresh surrogate fitted on ``x``, ``v`` (seeded by the number of batches)."""
        outcome = Standardize(1).fit(v[:, None])
        t = outcome(v[:, None])[:, 0]
        seed = _step_seed(self.seed, self.num_batches, _FIT) % 2**31
        estimator = make_surrogate(self.surrogate, seed, x.shape[1])
        estimator.fit(x.numpy(), t.numpy())
        return {"model": as_botorch_model(estimator), "n": len(v), "outcome": outcome}

    # -- results -----------------------------------------------------------------------------
    @property
    def best_index(self) -> int:
        if not self.y.size:
            raise ValueError("no observations yet: call tell (or run) first")
        return int(np.argmax(self.y) if self.maximize else np.argmin(self.y))

    @property
    def best_x(self) -> np.ndarray:
        return self.X[self.best_index].copy()

    @property
    def best_y(self) -> float:
        return float(self.y[self.best_index])

    @property
    def history(self) -> dict[str, np.ndarray]:
        accumulate = np.maximum.accumulate if self.maximize else np.minimum.accumulate
        return {
            "X": self.X.copy(),
            "y": self.y.copy(),
            "best": accumulate(self.y) if self.y.size else self.y.copy(),
            "batch": self._batch.copy(),
            "seconds": np.asarray(self._seconds),
        }

    def plot(self, optimum: float | None = None, ax: Any = None, label: str | None = None) -> Any:
        """Best value so far (or the simple regret ``|best - optimum|`` on a log scale when
        ``optimum`` is given) against the number of evaluations; returns the matplotlib axes."""
        import matplotlib.pyplot as plt

        ax = plt.gca() if ax is None else ax
        best = self.history["best"]
        evaluations = np.arange(1, len(best) + 1)
        if optimum is None:
            ax.plot(evaluations, best, label=label)
            ax.set_ylabel("best value so far")
        else:
            ax.semilogy(evaluations, np.maximum(np.abs(best - optimum), 1e-12), label=label)
            ax.set_ylabel("simple regret")
        ax.axvline(self.n_init + 0.5, color="0.7", lw=0.8)
        ax.set_xlabel("evaluations")
        return ax

    # -- save / resume -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Observations, pending points and timings (the surrogate is rebuilt from them on
        resume: refitted at the same step with the same seed, then conditioned)."""
        return {
            "seed": self.seed,
            "X": torch.as_tensor(self.X),
            "y": torch.as_tensor(self.y),
            "batch": torch.as_tensor(self._batch),
            "seconds": torch.as_tensor(self._seconds, dtype=torch.float64),
            "pending": None if self._pending is None else torch.as_tensor(self._pending),
            "refit_at": -1 if self._fitted is None else int(self._fitted["n"]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> BayesOpt:
        """Continue a run saved by :meth:`state_dict` (same constructor arguments)."""
        if int(state["seed"]) != self.seed:
            raise ValueError(f"state has seed {int(state['seed'])}, this loop {self.seed}")
        self._reset_data()
        self.X = state["X"].numpy().astype(np.float64).reshape(-1, self.bounds.shape[1])
        self.y = state["y"].numpy().astype(np.float64)
        self._batch = state["batch"].numpy().astype(np.int64)
        self._seconds = state["seconds"].tolist()
        pending = state["pending"]
        self._pending = None if pending is None else pending.numpy().astype(np.float64)
        refit_at = int(state["refit_at"])
        if refit_at > 0:  # the surrogate exactly as it was: refitted at the same step
            self._fitted = self._replay_refit(refit_at)
        return self

    def _replay_refit(self, n: int) -> dict[str, Any]:
        batch = self._batch
        self._batch = batch[:n]  # num_batches as at that refit (its seed)
        try:
            x, v = self._internal_data()
            return self._refit(x[:n], v[:n])
        finally:
            self._batch = batch

    def _check_observations(self, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        d = self.bounds.shape[1]
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if X.ndim == 1 and X.size == d:
            X = X[None]
        if X.ndim != 2 or X.shape[1] != d or X.shape[0] == 0:
            raise ValueError(f"X must have shape (k, {d}) with k >= 1, got {X.shape}")
        if y.shape[0] != X.shape[0]:
            raise ValueError(f"y has {y.shape[0]} values for {X.shape[0]} points in X")
        if not np.isfinite(X).all() or not np.isfinite(y).all():
            raise ValueError("X and y must be finite (evaluate failed points again, or drop them)")
        low, high = self.bounds.numpy()
        if ((X < low - 1e-9 * (high - low)) | (X > high + 1e-9 * (high - low))).any():
            raise ValueError("X lies outside bounds")
        return X, y

    def __repr__(self) -> str:
        return (
            f"BayesOpt(d={self.bounds.shape[1]}, surrogate={self.surrogate!r}, "
            f"acquisition={self.acquisition!r}, q={self.q}, evaluations={len(self.y)})"
        )


def _check_bounds(bounds: Any) -> Tensor:
    """``(2, d)`` float64 bounds. A tensor is ``(2, d)`` (BoTorch's layout); other array-likes
    are ``(d, 2)`` pairs (scipy's), except that a ``(2, d)`` array with ``d != 2`` is
    recognised by its shape."""
    pairs = not isinstance(bounds, Tensor)
    b = torch.as_tensor(np.asarray(bounds, dtype=np.float64))
    if b.dim() == 2 and b.shape[1] == 2 and (pairs or b.shape[0] != 2):
        b = b.T
    if b.dim() != 2 or b.shape[0] != 2 or b.shape[1] == 0:
        raise ValueError(f"bounds must have shape (2, d) or (d, 2), got {tuple(b.shape)}")
    if not bool(torch.isfinite(b).all()) or not bool((b[0] < b[1]).all()):
        raise ValueError("bounds must be finite with lower < upper in every dimension")
    return b.contiguous()


def _evaluate(objective: Any, X: np.ndarray) -> np.ndarray:
    if isinstance(objective, torch.nn.Module):
        with torch.no_grad():
            values = objective(torch.as_tensor(X, dtype=torch.float64))
        return values.detach().cpu().numpy().reshape(-1)
    return np.asarray(objective(X), dtype=np.float64).reshape(-1)

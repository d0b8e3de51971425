"""Type-II maximum likelihood: fit a GP's hyperparameters by maximising its log marginal
likelihood (full-batch L-BFGS with a strong-Wolfe line search by default, Adam optionally),
through the library's one optimisation path (:mod:`bdl.core.training`)."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor, nn

from bdl.core.training import minimize_lbfgs, train
from bdl.core.validation import check_choice, check_int, check_positive

__all__ = ["MarginalLikelihoodFit", "fit_hyperparameters"]

_OPTIMIZERS = ("lbfgs", "adam")


class _HasLML(Protocol):
    """A model holding its data: ``log_marginal_likelihood()`` needs no arguments."""

    def log_marginal_likelihood(self) -> Tensor: ...


def log_prior(model: nn.Module) -> Tensor | float:
    """Sum of the log densities of the hyperparameter priors registered on gpytorch modules
    inside ``model`` (e.g. ``MaternKernel(lengthscale_prior=...)``); 0 without any."""
    total: Tensor | float = 0.0
    for module in model.modules():
        named = getattr(module, "_priors", None)
        if not named:
            continue
        for prior, closure, _ in named.values():
            total = total + prior.log_prob(closure(module)).sum()
    return total


def _objective(model: _HasLML) -> Tensor:
    """``-log p(y) - log p(theta)`` of the model's data (summed over a batch of GPs if there is
    one): type-II maximum a posteriori when the kernel carries hyperparameter priors, as
    gpytorch's marginal log likelihoods add them."""
    try:
        loss = -model.log_marginal_likelihood().sum() - log_prior(model)
    except ValueError as err:
        if "NaN or inf" not in str(err):
            raise
        raise RuntimeError(
            "the kernel matrix became NaN or inf during fitting: a hyperparameter left its "
            "numerically valid range (e.g. a lengthscale underflowed to 0); bound it with a "
            "gpytorch constraint such as lengthscale_constraint=GreaterThan(1e-3)"
        ) from err
    if not bool(torch.isfinite(loss)):
        raise RuntimeError(
            f"the log marginal likelihood is not finite ({-float(loss)}) at the current "
            "hyperparameters; start from other initial values"
        )
    return loss


def fit_hyperparameters(
    model: nn.Module,
    *,
    optimizer: str = "lbfgs",
    max_iter: int = 100,
    lr: float | None = None,
    tolerance_grad: float = 1e-6,
    tolerance_change: float = 1e-10,
    verbose: bool = False,
) -> list[float]:
    """Maximise ``model.log_marginal_likelihood()`` over the model's trainable parameters (plus
    the log density of any gpytorch hyperparameter priors registered in the model).

    Works for any module whose ``log_marginal_likelihood()`` (no arguments) returns the
    differentiable log marginal likelihood of the data it holds (a full sum over the data),
    e.g. :class:`gp.ExactGP` or :class:`gp.StateSpaceGP` after ``set_data``. The
    parameters are updated in place; gradients are enabled inside (so it may be called
    under ``torch.no_grad()``).

    Parameters
    ----------
    model : nn.Module
        Model with data set; every parameter with ``requires_grad`` is optimised (freeze
        one with ``p.requires_grad_(False)``).
    optimizer : {"lbfgs", "adam"}, default "lbfgs"
        Full-batch L-BFGS with a strong-Wolfe line search
        (:func:`bdl.core.training.minimize_lbfgs`; deterministic, converges in few
        iterations on smooth, low-dimensional objectives), or full-batch Adam through
        :func:`bdl.core.training.train` (one step per epoch).
    max_iter : int, default 100
        Budget: L-BFGS makes at most ``ceil(1.25 * max_iter)`` objective evaluations;
        Adam makes ``max_iter`` steps. 0 leaves the model untouched.
    lr : float, optional
        Step size: 1.0 for L-BFGS (its initial step, then the line search decides) and 0.05
        for Adam by default.
    tolerance_grad : float, default 1e-6
        L-BFGS stops when the largest absolute gradient entry falls below this.
    tolerance_change : float, default 1e-10
        L-BFGS stops when the objective or the step changes less than this.
    verbose : bool, default False
        Show a tqdm progress bar.

    Returns
    -------
    list of float
        History of ``-log p(y)``: one entry per objective evaluation for L-BFGS (line-search
        trial points included, so not necessarily monotone) or per Adam step, and always a
        last entry at the returned (final) hyperparameters.

    Raises
    ------
    ValueError
        For a bad option or a model without trainable parameters.
    RuntimeError
        If the objective becomes NaN or inf.
    """
    check_choice("optimizer", optimizer, _OPTIMIZERS)
    check_int("max_iter", max_iter, minimum=0)
    if lr is None:
        lr = 1.0 if optimizer == "lbfgs" else 0.05
    lr = check_positive("lr", lr)
    check_positive("tolerance_grad", tolerance_grad, allow_zero=True)
    check_positive("tolerance_change", tolerance_change, allow_zero=True)
    if not callable(getattr(model, "log_marginal_likelihood", None)):
        raise ValueError(
            f"model must have a log_marginal_likelihood() method, got {type(model).__name__}"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (none with requires_grad)")
    history: list[float] = []
    if max_iter > 0 and optimizer == "lbfgs":
        history = minimize_lbfgs(
            lambda: _objective(model), params, max_iter=max_iter,
            max_eval=math.ceil(1.25 * max_iter), lr=lr, tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change, module=model, verbose=verbose, desc="lbfgs",
        )  # fmt: skip
    elif max_iter > 0:
        history = train(
            lambda: _objective(model), torch.optim.Adam(params, lr=lr), lambda: [()],
            max_iter, batch_len=lambda _: 1, module=model, verbose=verbose, desc="adam",
        )  # fmt: skip
    with torch.no_grad():
        history.append(float(_objective(model)))
    return history


class MarginalLikelihoodFit:
    """``fit`` by type-II maximum likelihood for models with ``set_data`` and
    ``log_marginal_likelihood`` (mixed into :class:`gp.ExactGP` and :class:`gp.StateSpaceGP`)."""

    history_: list[float]

    def fit(
        self,
        data: tuple[Tensor, Tensor] | None = None,
        *,
        epochs: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        verbose: bool = False,
        optimizer: str = "lbfgs",
        max_iter: int | None = None,
    ) -> MarginalLikelihoodFit:
        """Fit the hyperparameters by maximising the log marginal likelihood; returns self.

        Parameters
        ----------
        data : tuple (X, y), optional
            Training data, passed to ``set_data``; default: the data already set.
        epochs, max_iter : int, optional
            The optimiser's budget (two names for one number; give at most one, or equal
            values): L-BFGS evaluations (at most ``ceil(1.25 * max_iter)``) or Adam steps.
            Default 100.
        lr : float, optional
            Step size (see :func:`fit_hyperparameters`).
        batch_size : None
            Type-II maximum likelihood is full batch; anything but None is a ValueError.
        seed : int, optional
            Unused: the fit is deterministic.
        verbose : bool, default False
            Progress bar.
        optimizer : {"lbfgs", "adam"}, default "lbfgs"

        Returns
        -------
        self
            With ``history_``: ``-log p(y)`` per objective evaluation (L-BFGS) or per step
            (Adam), and a last entry at the fitted hyperparameters.
        """
        if batch_size is not None:
            raise ValueError(
                f"batch_size must be None: {type(self).__name__}.fit is full batch, "
                f"got {batch_size!r}"
            )
        if epochs is not None and max_iter is not None and epochs != max_iter:
            raise ValueError(f"give epochs or max_iter, not both ({epochs} != {max_iter})")
        budget = next((v for v in (max_iter, epochs) if v is not None), 100)
        if data is not None:
            if not isinstance(data, (tuple, list)) or len(data) != 2:
                raise ValueError("data must be a tuple (X, y) of tensors")
            self.set_data(*data)
        self.history_ = fit_hyperparameters(
            self, optimizer=optimizer, max_iter=budget, lr=lr, verbose=verbose
        )
        return self

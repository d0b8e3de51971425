"""Type-II maximum likelihood: fit a GP's hyperparameters by maximising its log marginal
likelihood (L-BFGS with a strong-Wolfe line search by default, Adam optionally)."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bdl.core.validation import check_choice, check_int, check_positive

__all__ = ["fit_hyperparameters"]

_OPTIMIZERS = ("lbfgs", "adam")


class _HasLML(Protocol):
    """A model holding its data: ``log_marginal_likelihood()`` needs no arguments."""

    def log_marginal_likelihood(self) -> Tensor: ...


def _objective(model: _HasLML) -> Tensor:
    """``-log p(y)`` of the model's data (summed over a batch of GPs if there is one)."""
    loss = -model.log_marginal_likelihood().sum()
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
    """Maximise ``model.log_marginal_likelihood()`` over the model's trainable parameters.

    Works for any module whose ``log_marginal_likelihood()`` (no arguments) returns the
    differentiable log marginal likelihood of the data it holds, e.g. :class:`gp.ExactGP` or
    :class:`gp.StateSpaceGP` after ``set_data``. The parameters are updated in place.

    Parameters
    ----------
    model : nn.Module
        Model with data set; every parameter with ``requires_grad`` is optimised (freeze
        one with ``p.requires_grad_(False)``).
    optimizer : {"lbfgs", "adam"}, default "lbfgs"
        Full-batch L-BFGS with a strong-Wolfe line search (deterministic, converges in few
        iterations on smooth, low-dimensional objectives), or Adam.
    max_iter : int, default 100
        L-BFGS iterations (at most ``1.25 * max_iter`` objective evaluations) or Adam steps.
        0 leaves the model untouched.
    lr : float, optional
        Step size: 1.0 for L-BFGS (its initial step, then the line search decides) and 0.05
        for Adam by default.
    tolerance_grad : float, default 1e-6
        L-BFGS stops when the largest absolute gradient entry falls below this.
    tolerance_change : float, default 1e-10
        L-BFGS stops when the objective or the step changes less than this.
    verbose : bool, default False
        Show a tqdm progress bar with the current ``-log p(y)``.

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
    if max_iter > 0:
        was_training = model.training
        model.train()
        try:
            if optimizer == "lbfgs":
                _run_lbfgs(model, params, max_iter, lr, tolerance_grad, tolerance_change,
                           history, verbose)  # fmt: skip
            else:
                _run_adam(model, params, max_iter, lr, history, verbose)
        finally:
            model.train(was_training)
    with torch.no_grad():
        history.append(float(_objective(model)))
    return history


def _run_lbfgs(
    model: _HasLML,
    params: list[Tensor],
    max_iter: int,
    lr: float,
    tolerance_grad: float,
    tolerance_change: float,
    history: list[float],
    verbose: bool,
) -> None:
    max_eval = math.ceil(1.25 * max_iter)
    opt = torch.optim.LBFGS(
        params, lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tolerance_grad,
        tolerance_change=tolerance_change, line_search_fn="strong_wolfe",
    )  # fmt: skip
    with tqdm(total=max_eval, desc="lbfgs", disable=not verbose, leave=False) as bar:

        def closure() -> Tensor:
            opt.zero_grad()
            loss = _objective(model)
            loss.backward()
            history.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(neg_lml=f"{history[-1]:.5g}")
            return loss

        opt.step(closure)


def _run_adam(
    model: _HasLML,
    params: list[Tensor],
    max_iter: int,
    lr: float,
    history: list[float],
    verbose: bool,
) -> None:
    opt = torch.optim.Adam(params, lr=lr)
    bar = tqdm(range(max_iter), desc="adam", disable=not verbose, leave=False)
    for _ in bar:
        opt.zero_grad()
        loss = _objective(model)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        bar.set_postfix(neg_lml=f"{history[-1]:.5g}")

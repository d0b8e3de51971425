"""Minibatch training of a sparse GP through :func:`bdl.core.training.train`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bdl.core.training import seeded_generator, tensor_batches, train

__all__ = ["fit_minibatches", "unpack_data"]


def fit_minibatches(
    module: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    optimizers: Sequence[torch.optim.Optimizer],
    X: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int,
    seed: int | None,
    verbose: bool,
    desc: str,
) -> tuple[list[float], list[float]]:
    """Minimise ``loss_fn(X_batch, y_batch)`` over random minibatches of the data.

    Every GP of a batch sees the same minibatch positions at each step (a fresh random
    permutation of the ``N`` points per epoch, drawn from a generator seeded with ``seed``).
    Gradients are enabled inside (training works under ``torch.no_grad()``); the module is
    in training mode while it runs and returns to its previous mode after.

    Parameters
    ----------
    module : nn.Module
        The model being trained.
    loss_fn : callable
        Per-datum loss of a minibatch ``(X_b (..., B, d), y_b (..., B))``.
    optimizers : sequence of Optimizer
        Stepped in order after each minibatch.
    X : Tensor, shape (..., N, d)
    y : Tensor, shape (..., N)
    epochs, batch_size : int
    seed : int or None
        Seed of the minibatch order (None: a fresh random seed).
    verbose : bool
        Show a progress bar.
    desc : str
        Label of the progress bar.

    Returns
    -------
    history : list of float
        Mean loss of every epoch.
    step_losses : list of float
        Loss of every optimisation step.
    """
    batches = tensor_batches((X, y), batch_size, seeded_generator(seed), dims=(-2, -1))
    steps: list[Tensor] = []

    def step_loss(xb: Tensor, yb: Tensor) -> Tensor:
        loss = loss_fn(xb, yb)
        steps.append(loss.detach())
        return loss

    history = train(
        step_loss, list(optimizers), batches, epochs,
        batch_len=lambda batch: batch[0].shape[-2], module=module, verbose=verbose, desc=desc,
    )  # fmt: skip
    step_losses = torch.stack(steps).tolist() if steps else []
    return history, step_losses


def unpack_data(data: object) -> tuple[Tensor, Tensor]:
    """``(X, y)`` from the ``data`` argument of a model's ``fit``."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"data must be a tuple (X, y) of tensors, got {type(data).__name__}")
    return data[0], data[1]

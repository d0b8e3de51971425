"""The one minibatch training loop that estimators and wrappers share."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


def shuffled_batches(
    n: int, batch_size: int, generator: torch.Generator | None, device: torch.device
) -> Iterator[Tensor]:
    """Index tensors of a random partition of ``range(n)`` into batches of ``batch_size``."""
    order = torch.randperm(n, generator=generator).to(device)
    return iter(order.split(batch_size))


def train_epochs(
    optimizer: torch.optim.Optimizer,
    batches: Callable[[], Iterable[tuple[Tensor, ...]]],
    loss_fn: Callable[..., Tensor],
    epochs: int,
    *,
    max_grad_norm: float | None = 1.0,
    desc: str = "fit",
    verbose: bool = False,
    end_of_epoch: Callable[[int], bool] | None = None,
) -> list[float]:
    """Run ``epochs`` passes of zero_grad / loss / backward / clip / step.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
    batches : callable
        Returns a fresh iterable of argument tuples for ``loss_fn`` each epoch.
    loss_fn : callable
        Maps one batch's arguments to a scalar per-datum loss.
    epochs : int
    max_grad_norm : float or None
        Clip the gradient norm of all optimised parameters (None: no clipping).
    desc, verbose
        Progress bar label; the bar is shown only when ``verbose``.
    end_of_epoch : callable, optional
        Called with the epoch index after each epoch; returning True stops training.

    Returns
    -------
    list of float
        Mean training loss of each epoch (one device sync per epoch, none per step).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    history: list[float] = []
    bar = tqdm(range(epochs), desc=desc, disable=not verbose, leave=False)
    for epoch in bar:
        total, count = None, 0
        for batch in batches():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(*batch)
            loss.backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            size = batch[0].shape[0]
            weighted = loss.detach() * size
            total = weighted if total is None else total + weighted
            count += size
        history.append(float(total) / max(count, 1) if total is not None else float("nan"))
        if verbose:
            bar.set_postfix(loss=f"{history[-1]:.4f}")
        if end_of_epoch is not None and end_of_epoch(epoch):
            break
    return history

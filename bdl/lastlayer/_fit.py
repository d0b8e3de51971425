"""Training of the VBLL heads: minibatch Adam on the per-datum negative ELBO.

Every head's ``fit`` and the head-only phases of :func:`~bdl.lastlayer.wrap` and the
estimators go through :func:`train_head`, a thin layer over :func:`bdl.core.training.train`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bdl.core.training import seeded_generator, tensor_batches, train
from bdl.core.validation import check_int, check_positive, check_same_length, check_tensor
from bdl.lastlayer._dtype import module_dtype

__all__ = ["HeadFitMixin", "check_pair", "train_head"]

#: ``fit`` defaults of a head on fixed features: cheap epochs, a large step
HEAD_EPOCHS, HEAD_LR, HEAD_BATCH_SIZE = 100, 1e-2, 128


def check_pair(data: Any, first: str = "features") -> tuple[Tensor, Tensor]:
    """``data`` as a tuple ``(X, y)`` of two equally long, finite tensors."""
    if not (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    ):
        raise ValueError(
            f"data must be a tuple ({first}, y) of two tensors, got {type(data).__name__}"
        )
    x, y = data
    check_tensor(first, x)
    check_tensor("y", y)
    check_same_length(first, x, "y", y)
    return x, y


def train_head(
    head: nn.Module,
    features: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator | None,
    max_grad_norm: float | None = 1.0,
    verbose: bool = False,
    desc: str = "VBLL head",
) -> list[float]:
    """Adam on ``head.loss`` over minibatches of fixed ``features`` (N, d) and targets ``y``.

    Returns the mean loss (negative ELBO per datum) of each epoch. Gradients are enabled for
    the duration (so this works inside ``torch.no_grad()``); the head is in train mode.
    """
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    batches = tensor_batches((features, y), batch_size, generator)
    return train(
        head.loss, optimizer, batches, epochs,
        max_grad_norm=max_grad_norm, module=head, verbose=verbose, desc=desc,
    )  # fmt: skip


class HeadFitMixin:
    """``fit(data, ...)`` for the VBLL heads (a :class:`bdl.core.Model`'s training)."""

    num_data: int | None
    history_: list[float]

    def _fit_tensors(self, data: Any) -> tuple[Tensor, Tensor]:
        """Features and targets of ``data`` on the head's device, in its dtype (labels: long)."""
        features, y = check_pair(data)
        reference = next(iter(self.parameters()))  # type: ignore[attr-defined]
        dtype = module_dtype(self)  # type: ignore[arg-type]
        if features.dim() != 2:
            raise ValueError(f"features must have shape (N, d), got {tuple(features.shape)}")
        features = features.to(device=reference.device, dtype=dtype)
        if y.is_floating_point():
            return features, y.to(device=reference.device, dtype=dtype)
        return features, y.to(reference.device)

    def fit(
        self,
        data: tuple[Tensor, Tensor],
        *,
        epochs: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        verbose: bool = False,
        max_grad_norm: float | None = 1.0,
    ):
        """Fit the head to fixed features: minibatch Adam on the per-datum negative ELBO.

        Parameters
        ----------
        data : tuple (features, y) of Tensor
            ``features`` of shape (N, d) (cast to the head's dtype and device) and the targets
            of :meth:`loss`. ``num_data`` is set to ``N``.
        epochs : int, default 100
        lr : float, default 1e-2
        batch_size : int, default 128
        seed : int, optional
            Seed of the minibatch order (None: torch's global random state).
        verbose : bool, default False
            Show a progress bar.
        max_grad_norm : float or None, default 1.0
            Gradient-norm clipping (covariance parameters are unstable without it).

        Returns
        -------
        self
            With ``history_``, the mean training loss of each epoch.
        """
        features, y = self._fit_tensors(data)
        epochs = check_int("epochs", HEAD_EPOCHS if epochs is None else epochs)
        lr = check_positive("lr", HEAD_LR if lr is None else lr)
        batch_size = check_int("batch_size", HEAD_BATCH_SIZE if batch_size is None else batch_size)
        self.num_data = features.shape[0]
        generator = None if seed is None else seeded_generator(seed)
        self.history_ = train_head(
            self, features, y, epochs=epochs, lr=lr, batch_size=batch_size,  # type: ignore[arg-type]
            generator=generator, max_grad_norm=max_grad_norm, verbose=verbose,
        )  # fmt: skip
        return self

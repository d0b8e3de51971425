"""A feature extractor and a VBLL head as one model on raw inputs, and its joint training.

:class:`VBLLNetwork` is the torch-level model behind the scikit-learn estimators
(``est.model_.model``): ``posterior(X)`` runs the extractor, then the head's posterior.
:func:`train_network` trains extractor and head jointly on the head's per-datum negative
ELBO, with optional early stopping on a validation score.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from bdl.core.model import Model
from bdl.core.posterior import Posterior
from bdl.core.training import (
    EarlyStopping,
    seeded_generator,
    tensor_batches,
    train,
    training_mode,
)
from bdl.core.validation import check_inputs, check_int, check_positive, network_input
from bdl.lastlayer._dtype import module_dtype, posterior_in_input_dtype
from bdl.lastlayer._fit import check_pair

__all__ = ["VBLLNetwork", "heldout_noise_variance", "train_network"]


class VBLLNetwork(nn.Module, Model):
    """A feature extractor ``body`` followed by a VBLL ``head``.

    Parameters
    ----------
    body : nn.Module
        Maps inputs (..., n, d_in) to features (..., n, d).
    head : nn.Module
        A VBLL head with ``in_features = d`` (e.g. :class:`~bdl.lastlayer.VBLLRegression`).
    """

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, head

    @property
    def num_outputs(self) -> int:
        return self.head.num_outputs

    def forward(self, x: Tensor) -> Tensor:
        """The head's mean output at the features of ``x``."""
        return self.head(self.body(x))

    def posterior(
        self, X: Tensor, *, observation_noise: bool = False, joint: bool = False
    ) -> Posterior:
        """The head's posterior at the features of ``X`` (..., n, d_in).

        Computed in the promoted dtype of ``X`` and the network, returned in ``X``'s dtype,
        differentiable in ``X``. ``observation_noise`` and ``joint`` are passed to the head
        (classification heads ignore the first and reject the second).
        """
        X = check_inputs(X)
        return posterior_in_input_dtype(
            self, X, "_posterior", observation_noise=observation_noise, joint=joint
        )

    def _posterior(self, x: Tensor, observation_noise: bool, joint: bool) -> Posterior:
        with network_input(x):
            features = self.body(x)
        return self.head.posterior(features, observation_noise=observation_noise, joint=joint)

    def fit(
        self,
        data: tuple[Tensor, Tensor],
        *,
        epochs: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        verbose: bool = False,
        weight_decay: float = 1e-4,
        max_grad_norm: float | None = 1.0,
    ) -> VBLLNetwork:
        """Train body and head jointly on ``data = (X, y)``; see :func:`train_network`.

        Defaults: ``epochs=30``, ``lr=1e-3``, ``batch_size=32``; ``seed`` fixes the minibatch
        order (None: torch's global random state). The head's ``num_data`` is set to ``N``.
        Returns self, with the per-epoch losses in ``history_``.
        """
        x, y = check_pair(data, "X")
        reference = next(iter(self.parameters()))
        dtype = module_dtype(self)
        x = x.to(device=reference.device, dtype=dtype)
        y = y.to(device=reference.device, dtype=dtype if y.is_floating_point() else None)
        self.head.num_data = x.shape[0]
        self.history_, _ = train_network(
            self, x, y, epochs=30 if epochs is None else epochs, lr=1e-3 if lr is None else lr,
            batch_size=32 if batch_size is None else batch_size, weight_decay=weight_decay,
            generator=None if seed is None else seeded_generator(seed),
            max_grad_norm=max_grad_norm, verbose=verbose,
        )  # fmt: skip
        return self


def train_network(
    net: VBLLNetwork,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    generator: torch.Generator | None,
    max_grad_norm: float | None = 1.0,
    validation: Callable[[VBLLNetwork], float] | None = None,
    patience: int = 10,
    verbose: bool = False,
) -> tuple[list[float], EarlyStopping | None]:
    """Adam on ``net.head.loss(net.body(x), y)`` (weight decay on the body only).

    Parameters
    ----------
    net : VBLLNetwork
    x, y : Tensor
        Training inputs (N, d_in) and targets, in the network's dtype and on its device.
    epochs, lr, batch_size : int, float, int
    weight_decay : float
        L2 penalty on the body's parameters (the head's KL term regularises the head).
    generator : torch.Generator or None
        Source of the minibatch order.
    max_grad_norm : float or None
        Gradient-norm clipping.
    validation : callable, optional
        ``validation(net) -> score`` (lower is better), evaluated in eval mode without
        gradients after every epoch; training stops after ``patience`` epochs without
        improvement and the best state is restored (:class:`~bdl.core.training.EarlyStopping`).
    patience : int
    verbose : bool

    Returns
    -------
    losses : list of float
        Mean training loss of each epoch run.
    stopper : EarlyStopping or None
        Its ``scores`` are the validation scores of each epoch.
    """
    check_int("epochs", epochs)
    check_positive("lr", lr)
    groups = [
        {"params": list(net.body.parameters()), "weight_decay": weight_decay},
        {"params": list(net.head.parameters()), "weight_decay": 0.0},
    ]
    optimizer = torch.optim.Adam([g for g in groups if g["params"]], lr=lr)
    stopper = None if validation is None else EarlyStopping(net, patience)

    def end_of_epoch(epoch: int, loss: float) -> bool:
        if stopper is None:
            return False
        with training_mode(net, False), torch.no_grad():
            return stopper(validation(net))

    losses = train(
        lambda xb, yb: net.head.loss(net.body(xb), yb),
        optimizer,
        tensor_batches((x, y), batch_size, generator),
        epochs,
        max_grad_norm=max_grad_norm,
        end_of_epoch=end_of_epoch,
        module=net,
        verbose=verbose,
        desc="VBLL",
    )
    if stopper is not None:
        stopper.restore()
    return losses, stopper


@torch.no_grad()
def heldout_noise_variance(mean: Tensor, latent_variance: Tensor, y: Tensor) -> Tensor:
    """Noise variance maximising the held-out Gaussian log-likelihood, per output.

    Maximises ``sum_i log N(y_i | mean_i, latent_variance_i + s)`` over ``s`` by a log-spaced
    grid search refined by golden-section steps (the objective is one-dimensional and smooth).

    Parameters
    ----------
    mean, latent_variance, y : Tensor, shape (n, m)

    Returns
    -------
    Tensor (float64), shape (m,)
    """
    mean, latent_variance, y = mean.double(), latent_variance.double(), y.double()
    sq = (y - mean).pow(2)

    def objective(log_s: Tensor) -> Tensor:  # log_s (g, m) -> (g, m) mean log-lik
        var = latent_variance.unsqueeze(0) + log_s.exp().unsqueeze(1)
        return -(var.log() + sq.unsqueeze(0) / var).mean(1)

    scale = sq.mean(0).clamp_min(1e-12).log()
    offsets = torch.linspace(-12.0, 3.0, 121, dtype=torch.float64, device=mean.device)
    grid = scale + offsets.unsqueeze(-1)
    best = grid.gather(0, objective(grid).argmax(0, keepdim=True))[0]
    lo, hi = best - 0.125, best + 0.125
    ratio = (5**0.5 - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        left_better = objective(torch.stack([a, b]))
        take_left = left_better[0] > left_better[1]
        hi = torch.where(take_left, b, hi)
        lo = torch.where(take_left, lo, a)
    return (0.5 * (lo + hi)).exp()

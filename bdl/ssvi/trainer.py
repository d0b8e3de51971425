"""Sparse subspace variational inference (Li, Miao, Qiu & Zhang, ICLR 2024): the trainer.

Alternating optimisation of the per-datum negative ELBO
``mean NLL + kl_weight(t) KL(q_gamma || p_gamma) / N`` over the variational parameters
``phi`` of the active weights and the support ``gamma``:

- phi-steps: Adam on the active means, raw scales, biases (and the regression noise), the
  forward pass by local reparameterisation; inactive weights have no parameters, so their
  gradients and optimiser state are zero by construction;
- gamma-steps, every ``update_every`` steps while ``t < end_fraction * T``: in each sparse
  layer remove ``k = round(zeta_t s)`` active weights with the lowest removal score
  (:func:`bdl.ssvi.removal_score`, default the signal-to-noise ratio of ``|theta|``) and grow
  the ``k`` inactive ones (just-removed ones included, as in RigL) with the largest
  ``|dL/dmu|``, the dense gradient of the data loss at the mean weights on the current
  minibatch; grown weights start at mean 0 with the layer's mean raw scale and zeroed
  optimiser moments. ``zeta_t = alpha / 2 (1 + cos(pi t / T_end))`` (the cosine schedule of
  RigL, Evci et al., ICML 2020). Density stays exactly ``s / D`` in every layer.

``kl_weight(t) = kl_scale * min(1, t / (kl_warmup T))``: a linear warm-up over the first
``kl_warmup`` of training (paper: half).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bdl.core.distributed import average_batch_tensors
from bdl.core.training import seeded, seeded_generator, tensor_batches, train
from bdl.core.validation import check_choice, check_int, check_positive
from bdl.ssvi.criteria import CRITERIA, removal_score
from bdl.ssvi.layers import SparseBayesLayer
from bdl.ssvi.network import SSVINetwork

__all__ = ["SSVI", "removal_fraction"]


def removal_fraction(step: int, alpha: float, end: int) -> float:
    """``zeta_t = alpha / 2 (1 + cos(pi t / T_end))`` for ``t < T_end``, else 0."""
    if step >= end:
        return 0.0
    return 0.5 * alpha * (1.0 + math.cos(math.pi * step / end))


class SSVI:
    """Trainer of an :class:`~bdl.ssvi.SSVINetwork` by sparse subspace VI (module docstring).

    Parameters
    ----------
    network : SSVINetwork
    update_every : int, default 100
        ``Delta T``: optimisation steps between topology updates.
    alpha : float, default 0.3
        Initial removal fraction (0: a fixed random support, plain masked mean-field VI).
    end_fraction : float, default 0.75
        Topology updates stop after this fraction of the steps.
    criterion : str, default "snr_abs"
        Removal score (:data:`bdl.ssvi.CRITERIA`).
    lam : float, default 1.0
        ``lambda`` of the exponential removal scores.
    kl_scale : float, default 1.0
        Weight of the KL term (1: the ELBO; below 1: tempered VI, as the paper's 0.01).
    kl_warmup : float, default 0.5
        Fraction of training over which the KL weight rises linearly from 0 (0: none).
    weight_decay : float, default 0.0
        Adam weight decay on the means.
    """

    def __init__(
        self,
        network: SSVINetwork,
        *,
        update_every: int = 100,
        alpha: float = 0.3,
        end_fraction: float = 0.75,
        criterion: str = "snr_abs",
        lam: float = 1.0,
        kl_scale: float = 1.0,
        kl_warmup: float = 0.5,
        weight_decay: float = 0.0,
    ) -> None:
        if not isinstance(network, SSVINetwork):
            raise ValueError(
                f"network must be an SSVINetwork (see sparsify), got {type(network).__name__}"
            )
        self.network = network
        self.update_every = check_int("update_every", update_every)
        self.alpha = check_positive("alpha", alpha, allow_zero=True)
        if not 0 < end_fraction <= 1:
            raise ValueError(f"end_fraction must lie in (0, 1], got {end_fraction!r}")
        self.end_fraction = float(end_fraction)
        self.criterion = check_choice("criterion", criterion, CRITERIA)
        self.lam = float(lam)
        self.kl_scale = check_positive("kl_scale", kl_scale, allow_zero=True)
        if not 0 <= kl_warmup <= 1:
            raise ValueError(f"kl_warmup must lie in [0, 1], got {kl_warmup!r}")
        self.kl_warmup = float(kl_warmup)
        self.weight_decay = check_positive("weight_decay", weight_decay, allow_zero=True)
        self.updates_: list[dict[str, Any]] = []

    # -- training ----------------------------------------------------------------------------
    def fit(
        self,
        data: tuple[Tensor, Tensor],
        *,
        epochs: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        verbose: bool = False,
    ) -> SSVINetwork:
        """Train on ``data = (X, y)``; per-epoch losses in ``network.history_``.

        Parameters
        ----------
        epochs, lr, batch_size : int, float, int
            Defaults 40, 1e-3, 64.
        seed : int, optional
            Seeds the minibatch order and the local-reparameterisation noise.
        """
        X, y = data
        if X.shape[0] != y.shape[0] or X.shape[0] == 0:
            raise ValueError(
                "X and y must hold the same number (>= 1) of rows, got "
                f"{X.shape[0]} and {y.shape[0]}"
            )
        epochs = 40 if epochs is None else check_int("epochs", epochs, minimum=0)
        lr = 1e-3 if lr is None else check_positive("lr", lr)
        batch_size = min(
            64 if batch_size is None else check_int("batch_size", batch_size), X.shape[0]
        )
        net = self.network
        n = X.shape[0]
        total = epochs * math.ceil(n / batch_size)
        self._end = max(1, int(self.end_fraction * total))
        self._warm = self.kl_warmup * total
        self._step, self._batch = 0, None
        self.optimizer = torch.optim.Adam(self._param_groups(), lr=lr)
        generator = seeded_generator(seed)
        batches = tensor_batches((X, y), batch_size, generator)
        with seeded(seed):
            net.history_ = train(
                lambda xb, yb: self._loss(xb, yb, n), self.optimizer, batches, epochs,
                after_step=self._after_step, module=net, verbose=verbose, desc="SSVI",
            )  # fmt: skip
        return net

    def _param_groups(self) -> list[dict[str, Any]]:
        means = [m.mu for m in self.network.layers]
        ids = {id(p) for p in means}
        rest = [p for p in self.network.parameters() if id(p) not in ids and p.requires_grad]
        return [
            {"params": means, "weight_decay": self.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ]

    def kl_weight(self, step: int) -> float:
        if self._warm <= 0:
            return self.kl_scale
        return self.kl_scale * min(1.0, step / self._warm)

    def _loss(self, xb: Tensor, yb: Tensor, n: int) -> Tensor:
        self._batch = (xb, yb)
        net = self.network
        data = net.data_loss(net(xb), yb)
        return data + self.kl_weight(self._step + 1) * net.kl_divergence() / n

    def _after_step(self) -> None:
        self._step += 1
        if self.alpha > 0 and self._step % self.update_every == 0 and self._step < self._end:
            self.update_topology(*self._batch)

    # -- topology ----------------------------------------------------------------------------
    def update_topology(self, xb: Tensor, yb: Tensor) -> None:
        """One gamma-step on the minibatch ``(xb, yb)`` (see the module docstring)."""
        fraction = removal_fraction(self._step, self.alpha, self._end)
        layers = [m for m in self.network.layers if m.num_active < m.numel]
        if not layers:  # every layer dense: nothing to move
            return
        grads = self._dense_mean_gradients(layers, xb, yb)
        moved = 0
        for layer, grad in zip(layers, grads, strict=True):
            k = round(fraction * layer.num_active)
            if k == 0:
                continue
            self._move(layer, grad, k)
            moved += k
        self.updates_.append({"step": self._step, "fraction": fraction, "moved": moved})

    def _dense_mean_gradients(
        self, layers: list[SparseBayesLayer], xb: Tensor, yb: Tensor
    ) -> list[Tensor]:
        """``dL/dW`` of the data loss at the dense mean weights of ``layers``."""
        net = self.network
        dense = [m.dense_mean().detach().requires_grad_(True) for m in layers]
        try:
            for m, w in zip(layers, dense, strict=True):
                m._dense_override = w
            with torch.enable_grad():
                loss = net.data_loss(net(xb), yb)
                grads = torch.autograd.grad(loss, dense)
        finally:
            for m in layers:
                m._dense_override = None
        # under data_parallel: the global minibatch's gradient (every rank grows the same)
        return average_batch_tensors([g.detach() for g in grads])

    def _move(self, layer: SparseBayesLayer, grad: Tensor, k: int) -> None:
        """Remove the ``k`` lowest-scoring slots of ``layer``, grow ``k`` by ``|grad|``."""
        score = removal_score(layer.mu, layer.sigma, self.criterion, self.lam)
        remove = torch.topk(score, k, largest=False).indices
        keep = torch.ones(layer.num_active, dtype=torch.bool, device=score.device)
        keep[remove] = False
        candidates = grad.abs().flatten().clone()
        candidates[layer.index[keep].long()] = -1.0  # kept weights cannot be grown again
        grow = torch.topk(candidates, k).indices
        grown_rho = float(layer.rho_raw.detach()[keep].mean())
        order = layer.replace(remove, grow, grown_rho)
        fresh_after = torch.zeros(layer.num_active, dtype=torch.bool, device=score.device)
        fresh_after[torch.isin(layer.index, grow.to(layer.index))] = True
        for param in (layer.mu, layer.rho_raw):
            self._reset_state(param, order, fresh_after)

    def _reset_state(self, param: Tensor, order: Tensor, fresh: Tensor) -> None:
        """Permute ``param``'s optimiser state like its slots and zero the grown slots."""
        state = self.optimizer.state.get(param)
        if not state:
            return
        for key, value in state.items():
            if isinstance(value, Tensor) and value.shape == param.shape:
                state[key] = torch.where(fresh, torch.zeros_like(value), value[order])

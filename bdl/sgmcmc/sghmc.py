r"""Stochastic-gradient Hamiltonian Monte Carlo (SGHMC; Chen, Fox & Guestrin, ICML 2014).

The "SGD with momentum" discretisation (Chen et al., eq. 15 with :math:`\hat\beta = 0`), with
the mean minibatch loss :math:`\bar L`, ``lr`` :math:`= \eta N`, ``num_data`` :math:`= N`,
``temperature`` :math:`T`, ``prior_precision`` :math:`\lambda` and friction ``momentum_decay``
:math:`\alpha \in (0, 1]`:

.. math::

    v &\leftarrow (1 - \alpha)\, v - \mathrm{lr}\,\bigl(\nabla \bar L(\theta)
        + \lambda \theta / N\bigr) + \sqrt{2\,\alpha\,\mathrm{lr}\,T / N}\;\xi,
        \qquad \xi \sim \mathcal N(0, I), \\
    \theta &\leftarrow \theta + v,

i.e. :math:`v \leftarrow (1-\alpha) v - \eta \nabla \hat U + \mathcal N(0, 2 \alpha \eta T)`
on the full-data potential :math:`U = N \bar L_{\mathrm{full}} + \lambda \lVert\theta\rVert^2/2`
(in Chen et al.'s notation :math:`v = \epsilon M^{-1} r`, :math:`\eta = \epsilon^2 M^{-1}`,
:math:`\alpha = \epsilon M^{-1} C`). The target is :math:`\exp(-U/T)` up to :math:`O(\eta)`
discretisation bias; the minibatch-noise correction :math:`\hat\beta` is taken as 0, as
everyone does. :math:`\alpha = 1` is SGLD exactly; the momentum of SGD is :math:`1 - \alpha`.

The velocity :math:`v` (in parameter units) is kept in ``state[p]["velocity"]``. With
``temperature=0`` (or the group's ``noise`` flag off) and a constant ``lr`` this is
``torch.optim.SGD(momentum=1 - alpha, weight_decay=lambda / N)``; when ``lr`` changes between
steps the two differ, because SGD rescales its whole gradient-unit buffer by the new ``lr``
while the velocity here keeps the step sizes it was built with (as in cSGHMC's code).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from bdl.sgmcmc._base import SGMCMCOptimizer, _Bucket, _check_real

__all__ = ["SGHMC"]


class SGHMC(SGMCMCOptimizer):
    """Stochastic-gradient HMC with friction ``momentum_decay`` as a ``torch.optim.Optimizer``.

    Parameters
    ----------
    params : iterable of Tensor or of dict
        Parameters or parameter groups (each group may override any hyper-parameter).
    lr : float
        Learning rate on the mean loss, ``lr = eta * N`` (> 0).
    num_data : int or float
        Number of training points ``N`` (> 0); required.
    momentum_decay : float
        Friction ``alpha`` in ``(0, 1]`` (momentum ``1 - alpha``); default 0.1, i.e. the
        momentum 0.9 of common SGD set-ups. Injected noise variance ``2 alpha lr T / N``.
    temperature : float
        ``T >= 0``; the target is ``exp(-U / T)``, 0 switches the noise off.
    prior_precision : float
        Precision ``lambda >= 0`` of an isotropic Gaussian prior on every parameter (0: flat).
    generator : torch.Generator, optional
        Source of the noise, on the parameters' device (saved in :meth:`state_dict`).
    check_finite : bool
        Refuse (raise :class:`~bdl.sgmcmc.NonFiniteGradientError`) steps with NaN/inf
        gradients before anything (parameters or velocities) changes.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        num_data: float | None = None,
        momentum_decay: float = 0.1,
        temperature: float = 1.0,
        prior_precision: float = 0.0,
        *,
        generator: torch.Generator | None = None,
        check_finite: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "num_data": num_data,
            "momentum_decay": momentum_decay,
            "temperature": temperature,
            "prior_precision": prior_precision,
        }
        super().__init__(params, defaults, generator=generator, check_finite=check_finite)

    def _validate_group(self, group: dict[str, Any]) -> dict[str, Any]:
        checked = super()._validate_group(group)
        checked["momentum_decay"] = _check_real(
            "momentum_decay", group["momentum_decay"], 0.0, 1.0, low_open=True
        )
        return checked

    def _prepare(self, group: dict[str, Any], bucket: _Bucket) -> None:
        # flat <- w = (sqrt(2 alpha lr T / N) xi - lr (grad + lambda theta / N)) / alpha, so that
        # the commit's lerp v <- v + alpha (w - v) is the velocity update in one pass.
        lr, alpha = group["lr"], group["momentum_decay"]
        self._fill_noise(bucket, self._noise_std(group, scale=alpha) / alpha)
        self._add_drift(group, bucket, lr / alpha)

    def _commit(self, group: dict[str, Any], bucket: _Bucket, extra: None) -> None:
        velocities = []
        for p in bucket.params:
            state = self.state[p]
            if "velocity" not in state:
                state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            velocities.append(state["velocity"])
        torch._foreach_lerp_(velocities, bucket.views, group["momentum_decay"])
        torch._foreach_add_(bucket.params, velocities)

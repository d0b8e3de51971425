r"""Stochastic-gradient Langevin dynamics (SGLD; Welling & Teh, ICML 2011).

Update (Welling & Teh, eq. 4, whose step :math:`\epsilon` is :math:`2\eta` here), with the
mean minibatch loss :math:`\bar L`, ``lr`` :math:`= \eta N`, ``num_data`` :math:`= N`,
``temperature`` :math:`T` and ``prior_precision`` :math:`\lambda`:

.. math::

    \theta \leftarrow \theta - \mathrm{lr}\,\bigl(\nabla \bar L(\theta)
        + \lambda \theta / N\bigr) + \sqrt{2\,\mathrm{lr}\,T / N}\;\xi,
    \qquad \xi \sim \mathcal N(0, I),

which is :math:`\theta \leftarrow \theta - \eta \nabla \hat U(\theta) + \sqrt{2 \eta T}\,\xi`
on the minibatch estimate :math:`\hat U` of the full-data potential
:math:`U = N \bar L_{\mathrm{full}} + \lambda \lVert\theta\rVert^2 / 2`. For small
:math:`\eta` the chain's stationary law approaches :math:`p_T(\theta) \propto
\exp(-U(\theta)/T)`; at finite :math:`\eta` it is biased by :math:`O(\eta)` (on a Gaussian
target with precision :math:`a` the exact stationary variance is
:math:`T / (a (1 - \eta a / 2))`).

``temperature=0`` (or a group's ``noise`` flag off, as set by
:class:`~bdl.sgmcmc.CyclicalSchedule` during exploration) gives plain SGD, and
``prior_precision`` :math:`\lambda` is SGD's ``weight_decay`` :math:`\lambda / N`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from bdl.sgmcmc._base import SGMCMCOptimizer, _Bucket

__all__ = ["SGLD"]


class SGLD(SGMCMCOptimizer):
    """Stochastic-gradient Langevin dynamics as a ``torch.optim.Optimizer``.

    Parameters
    ----------
    params : iterable of Tensor or of dict
        Parameters or parameter groups (each group may override any hyper-parameter).
    lr : float
        Learning rate on the mean loss, ``lr = eta * N`` (> 0).
    num_data : int or float
        Number of training points ``N`` (> 0); required.
    temperature : float
        ``T >= 0``; the target is ``exp(-U / T)``, 0 switches the noise off.
    prior_precision : float
        Precision ``lambda >= 0`` of an isotropic Gaussian prior on every parameter (0: flat).
    generator : torch.Generator, optional
        Source of the noise, on the parameters' device (saved in :meth:`state_dict`).
    check_finite : bool
        Refuse (raise :class:`~bdl.sgmcmc.NonFiniteGradientError`) steps with NaN/inf
        gradients before anything changes.

    Examples
    --------
    >>> opt = SGLD(net.parameters(), lr=1e-2, num_data=len(dataset))  # doctest: +SKIP
    >>> for x, y in loader:  # doctest: +SKIP
    ...     opt.zero_grad()
    ...     torch.nn.functional.cross_entropy(net(x), y).backward()  # mean loss
    ...     opt.step()
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        num_data: float | None = None,
        temperature: float = 1.0,
        prior_precision: float = 0.0,
        *,
        generator: torch.Generator | None = None,
        check_finite: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "num_data": num_data,
            "temperature": temperature,
            "prior_precision": prior_precision,
        }
        super().__init__(params, defaults, generator=generator, check_finite=check_finite)

    def _prepare(self, group: dict[str, Any], bucket: _Bucket) -> None:
        # flat <- sqrt(2 lr T / N) xi - lr (grad + lambda theta / N)
        self._fill_noise(bucket, self._noise_std(group))
        self._add_drift(group, bucket, group["lr"])

r"""Preconditioned SGLD, RMSprop preconditioner (pSGLD; Li, Chen, Carlson & Carin, AAAI 2016).

Update (Li et al., Algorithm 1), with the per-datum gradient
:math:`d = \nabla \bar L(\theta) + \lambda \theta / N` (mean minibatch loss :math:`\bar L`,
``prior_precision`` :math:`\lambda`, ``num_data`` :math:`= N`), ``lr`` :math:`= \eta N`,
``temperature`` :math:`T`, decay ``alpha`` :math:`\rho` and ``eps`` :math:`\epsilon`:

.. math::

    V &\leftarrow \rho V + (1 - \rho)\, d \odot d, \qquad
    G = \operatorname{diag}\bigl(1 \oslash (\epsilon + \sqrt V)\bigr), \\
    \theta &\leftarrow \theta - \mathrm{lr}\; G\, d
        + \sqrt{2\,\mathrm{lr}\,T / N}\; G^{1/2} \xi, \qquad \xi \sim \mathcal N(0, I),

i.e. :math:`\theta \leftarrow \theta - \eta G \nabla \hat U + \mathcal N(0, 2 \eta T G)`
on the full-data potential :math:`U = N \bar L_{\mathrm{full}} + \lambda \lVert\theta
\rVert^2 / 2`. :math:`V` is built from :math:`d = \nabla U / N` (the mean per-datum gradient of
the paper, plus the prior's share), so with ``temperature=0`` this is
``torch.optim.RMSprop(alpha=rho, eps=eps, weight_decay=lambda / N)``. With ``eps_relative``
:math:`\epsilon_r` each parameter tensor's denominator is :math:`\epsilon + \epsilon_r
\sqrt{\operatorname{mean}(V)} + \sqrt V` (a scale-free floor; see :class:`PSGLD`).

The correction term :math:`\eta\,\Gamma(\theta)`, :math:`\Gamma_i = \sum_j \partial G_{ij} /
\partial \theta_j`, is **dropped**, as in the paper's experiments and every public
implementation: with :math:`V` adapting to the noisy gradients the chain then targets
:math:`\exp(-U/T)` only approximately (the bias is small when :math:`\rho \to 1` and
:math:`V` varies slowly). With the preconditioner frozen (:meth:`PSGLD.freeze_preconditioner`,
e.g. after burn-in) :math:`G` is constant, :math:`\Gamma = 0`, and the chain is an exact
preconditioned Langevin discretisation whose stationary law tends to :math:`\exp(-U/T)` as
:math:`\eta \to 0` (the stationary mean of a Gaussian target is exact at any :math:`\eta`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from bdl.core.validation import check_positive
from bdl.sgmcmc._base import SGMCMCOptimizer, _Bucket, _check_real

__all__ = ["PSGLD"]


class PSGLD(SGMCMCOptimizer):
    """Preconditioned SGLD (RMSprop preconditioner) as a ``torch.optim.Optimizer``.

    Parameters
    ----------
    params : iterable of Tensor or of dict
        Parameters or parameter groups (each group may override any hyper-parameter).
    lr : float
        Learning rate on the mean loss, ``lr = eta * N`` (> 0).
    num_data : int or float
        Number of training points ``N`` (> 0); required.
    alpha : float
        Decay ``rho`` in ``[0, 1)`` of the running mean of squared gradients ``V``.
    eps : float
        ``epsilon > 0`` added to ``sqrt(V)``; bounds the preconditioner by ``1 / eps``.
    temperature : float
        ``T >= 0``; the target is ``exp(-U / T)``, 0 switches the noise off.
    prior_precision : float
        Precision ``lambda >= 0`` of an isotropic Gaussian prior on every parameter (0: flat).
    eps_relative : float
        ``epsilon_r >= 0``: also add ``epsilon_r * sqrt(mean(V))`` of each parameter tensor
        to ``sqrt(V)`` (default 0: the paper's absolute ``eps`` only). The absolute ``eps`` is
        not scale-free: an entry whose gradient happened to be ~0 when ``V`` was estimated
        (a dead unit, a constant input) gets ``G = 1 / eps``, e.g. ``1e5``, many orders of
        magnitude above its tensor's typical ``G``, and with a frozen preconditioner it keeps
        it, so the step ``lr G d`` and the noise ``(2 lr T G / N)^(1/2)`` explode once that
        entry's gradient revives. With ``eps_relative`` every entry's ``G`` is at most
        ``1 / epsilon_r`` times its tensor's typical ``1 / sqrt(mean(V))``, whatever the
        units of the loss and parameters (e.g. ``0.1``: at most 10 times). The term depends
        only on ``V``, so a frozen ``G`` stays constant and exact.
    generator : torch.Generator, optional
        Source of the noise, on the parameters' device (saved in :meth:`state_dict`).
    check_finite : bool
        Refuse (raise :class:`~bdl.sgmcmc.NonFiniteGradientError`) steps with NaN/inf
        gradients before anything (parameters or ``V``) changes.

    Notes
    -----
    ``V`` lives in ``state[p]["square_avg"]`` (zeros before the first step, as in RMSprop) and
    may be set there directly. Each group's ``update_preconditioner`` flag (default ``True``)
    says whether steps update it; see :meth:`freeze_preconditioner`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        num_data: float | None = None,
        alpha: float = 0.99,
        eps: float = 1e-5,
        temperature: float = 1.0,
        prior_precision: float = 0.0,
        eps_relative: float = 0.0,
        *,
        generator: torch.Generator | None = None,
        check_finite: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "num_data": num_data,
            "alpha": alpha,
            "eps": eps,
            "eps_relative": eps_relative,
            "temperature": temperature,
            "prior_precision": prior_precision,
            "update_preconditioner": True,
        }
        super().__init__(params, defaults, generator=generator, check_finite=check_finite)

    def _validate_group(self, group: dict[str, Any]) -> dict[str, Any]:
        checked = super()._validate_group(group)
        checked["alpha"] = _check_real("alpha", group["alpha"], 0.0, 1.0, high_open=True)
        checked["eps"] = check_positive("eps", group["eps"])
        checked["eps_relative"] = check_positive(
            "eps_relative", group.get("eps_relative", 0.0), allow_zero=True
        )
        checked["update_preconditioner"] = bool(group.get("update_preconditioner", True))
        return checked

    def freeze_preconditioner(self, frozen: bool = True) -> None:
        r"""Stop (or, with ``frozen=False``, resume) updating ``V`` in every group.

        A frozen preconditioner makes the chain an exact preconditioned Langevin scheme (no
        dropped :math:`\Gamma` term); freeze it after burn-in, before collecting samples.
        """
        for group in self.param_groups:
            group["update_preconditioner"] = not frozen

    def _prepare(self, group: dict[str, Any], bucket: _Bucket) -> list[Tensor] | None:
        params, grads = bucket.params, bucket.grads
        lr, n = group["lr"], group["num_data"]
        square_avgs = [self.state[p].get("square_avg") for p in params]
        if any(v is None for v in square_avgs):
            if not group["update_preconditioner"]:
                raise RuntimeError(
                    "the preconditioner is frozen but has never been estimated: take steps "
                    "with update_preconditioner=True first, or set state[p]['square_avg']"
                )
            square_avgs = [
                torch.zeros_like(p, memory_format=torch.preserve_format) if v is None else v
                for p, v in zip(params, square_avgs, strict=True)
            ]
        if group["prior_precision"]:
            grads = torch._foreach_add(grads, params, alpha=group["prior_precision"] / n)
        new_avgs = None
        if group["update_preconditioner"]:
            # built out of place: committed only once every update of the step is finite
            rho = group["alpha"]
            new_avgs = torch._foreach_mul(square_avgs, rho)
            torch._foreach_addcmul_(new_avgs, grads, grads, value=1.0 - rho)
            square_avgs = new_avgs
        denom = torch._foreach_sqrt(square_avgs)  # eps + sqrt(V) = 1 / G
        torch._foreach_add_(denom, group["eps"])
        if group["eps_relative"]:
            # + eps_r * sqrt(mean(V)) per tensor: G <= 1 / (eps_r * rms gradient of the tensor)
            for d, v in zip(denom, square_avgs, strict=True):
                d.add_(v.mean().sqrt(), alpha=group["eps_relative"])
        std = self._noise_std(group)
        if std > 0.0:
            # flat <- (std xi sqrt(denom) - lr d) / denom = std G^(1/2) xi - lr G d
            self._fill_noise(bucket, std)
            torch._foreach_mul_(bucket.views, torch._foreach_sqrt(denom))
            torch._foreach_add_(bucket.views, grads, alpha=-lr)
            torch._foreach_div_(bucket.views, denom)
        else:
            bucket.flat.zero_()
            torch._foreach_addcdiv_(bucket.views, grads, denom, value=-lr)
        return new_avgs

    def _commit(self, group: dict[str, Any], bucket: _Bucket, extra: list[Tensor] | None) -> None:
        if extra is not None:
            for p, v in zip(bucket.params, extra, strict=True):
                self.state[p]["square_avg"] = v
        torch._foreach_add_(bucket.params, bucket.views)

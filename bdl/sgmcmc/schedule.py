r"""Cyclical step-size schedule of cyclical SG-MCMC (cSG-MCMC; Zhang et al., ICLR 2020).

With ``num_steps`` :math:`K`, ``num_cycles`` :math:`M`, cycle length :math:`c = \lceil K/M
\rceil` and 0-based step index :math:`k`, each group's learning rate is (Zhang et al., eq. 1)

.. math::

    \mathrm{lr}_k = \frac{\mathrm{lr}_0}{2} \Bigl[\cos\Bigl(\pi\,
        \frac{\operatorname{mod}(k, c)}{c}\Bigr) + 1\Bigr],

falling from :math:`\mathrm{lr}_0` (the group's ``lr`` when the schedule is built) to nearly 0
within every cycle. With :math:`r(k) = \operatorname{mod}(k, c)/c` and ``exploration_fraction``
:math:`\beta`, steps with :math:`r(k) < \beta` are **exploration** steps (plain SGD / momentum
steps: the schedule sets each group's ``noise`` flag to ``False``, i.e. temperature 0 for that
step) and steps with :math:`r(k) \ge \beta` are **sampling** steps (noise on). Samples are
collected near the ends of cycles (:meth:`CyclicalSchedule.is_sampling_step`,
:meth:`CyclicalSchedule.end_of_cycle`), never in the high-``lr`` phase.

Usage, like any ``torch`` LR scheduler (the step index :math:`k` is that of the optimizer step
whose ``lr`` and ``noise`` are currently set)::

    opt = bdl.sgmcmc.SGHMC(net.parameters(), lr=0.5, num_data=N)
    schedule = bdl.sgmcmc.CyclicalSchedule(opt, num_steps=K, num_cycles=4)
    for k in range(K):
        loss_fn(net(x), y).backward(); opt.step(); opt.zero_grad()
        if schedule.is_sampling_step() and schedule.steps_to_end_of_cycle() < 3:
            collect(net)          # the parameters after step k
        schedule.step()           # set lr and noise for step k + 1
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from bdl.core.validation import check_int
from bdl.sgmcmc._base import _check_real

__all__ = ["CyclicalSchedule"]


class CyclicalSchedule(LRScheduler):
    """Cosine cyclical learning rate with exploration (no noise) and sampling phases.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Usually an SG-MCMC optimizer of :mod:`bdl.sgmcmc`, which honours the per-group
        ``noise`` flag this schedule sets (other optimizers ignore it).
    num_steps : int
        Total number of steps ``K`` (>= 1) the cycles are laid out over; steps beyond it keep
        cycling with the same cycle length.
    num_cycles : int
        Number of cycles ``M`` (1 <= M <= K); the cycle length is ``ceil(K / M)``.
    exploration_fraction : float
        ``beta`` in ``[0, 1]``: the fraction of each cycle without noise. The default 0.9
        matches the official CIFAR code (noise in the last 5 of 50 epochs per cycle). Below 1,
        every cycle (a cut-short last one included) must contain a sampling step, i.e. be at
        least ``1 / (1 - beta)`` steps long, or ``ValueError`` is raised (see
        :meth:`sampling_steps`); 1 means no sampling step at all.
    last_epoch : int
        Index of the last step taken, for resuming (as in ``torch`` schedulers); -1 starts.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        num_steps: int,
        num_cycles: int = 4,
        exploration_fraction: float = 0.9,
        last_epoch: int = -1,
    ) -> None:
        self.num_steps = check_int("num_steps", num_steps)
        self.num_cycles = check_int("num_cycles", num_cycles)
        if self.num_cycles > self.num_steps:
            raise ValueError(
                f"num_cycles must be <= num_steps, got num_cycles={num_cycles} and "
                f"num_steps={num_steps}"
            )
        self.exploration_fraction = _check_real(
            "exploration_fraction", exploration_fraction, 0.0, 1.0
        )
        self.cycle_length = math.ceil(self.num_steps / self.num_cycles)
        if self.exploration_fraction < 1.0:
            counts = self.sampling_steps(self.num_steps, self.num_cycles, exploration_fraction)
            if min(counts) == 0:
                empty = [i for i, k in enumerate(counts) if k == 0]
                raise ValueError(
                    f"exploration_fraction={exploration_fraction} leaves cycle(s) {empty} of "
                    f"num_steps={num_steps} split into num_cycles={num_cycles} (cycle length "
                    f"{self.cycle_length}) without a sampling step: a cycle needs at least "
                    f"1 / (1 - exploration_fraction) steps; use fewer cycles, more steps or a "
                    "smaller exploration_fraction (1.0 is allowed: no sampling at all)"
                )
        super().__init__(optimizer, last_epoch)

    @staticmethod
    def sampling_steps(num_steps: int, num_cycles: int, exploration_fraction: float) -> list[int]:
        """Number of sampling (noisy) steps in each cycle of such a schedule.

        Cycle ``i`` covers steps ``[i c, min((i + 1) c, K))`` with ``c = ceil(K / M)`` (the last
        one may be cut short, and ``ceil(K / c)`` cycles are non-empty); its step at offset ``j``
        samples iff ``j / c >= beta``.
        """
        num_steps = check_int("num_steps", num_steps)
        num_cycles = check_int("num_cycles", num_cycles)
        beta = _check_real("exploration_fraction", exploration_fraction, 0.0, 1.0)
        length = math.ceil(num_steps / num_cycles)
        # first sampling offset, with the same float comparison as is_sampling_step
        first = min(max(math.ceil(beta * length) - 1, 0), length)
        while first < length and first / length < beta:
            first += 1
        counts = []
        for start in range(0, num_steps, length):
            size = min(length, num_steps - start)
            counts.append(max(0, size - first))
        return counts

    # -- position in the cycle -------------------------------------------------------------
    @property
    def step_index(self) -> int:
        """0-based index ``k`` of the optimizer step whose ``lr`` and ``noise`` are set."""
        return self.last_epoch

    @property
    def cycle(self) -> int:
        """0-based index of the current cycle."""
        return self.last_epoch // self.cycle_length

    def position(self) -> float:
        """Fraction ``r(k) = mod(k, c) / c`` in ``[0, 1)`` of the current cycle elapsed."""
        return (self.last_epoch % self.cycle_length) / self.cycle_length

    def is_sampling_step(self) -> bool:
        """Whether step ``k`` is in the sampling phase (``r(k) >= beta``: noise on)."""
        return self.position() >= self.exploration_fraction

    def steps_to_end_of_cycle(self) -> int:
        """Steps after ``k`` left in the current cycle (0 at its last step).

        The last cycle is cut at ``num_steps`` when ``M`` does not divide ``K``.
        """
        left = self.cycle_length - 1 - self.last_epoch % self.cycle_length
        if self.last_epoch < self.num_steps:
            left = min(left, self.num_steps - 1 - self.last_epoch)
        return left

    def end_of_cycle(self) -> bool:
        """Whether step ``k`` is the last step of its cycle."""
        return self.steps_to_end_of_cycle() == 0

    # -- LRScheduler interface -------------------------------------------------------------
    def _factor(self) -> float:
        return 0.5 * (math.cos(math.pi * self.position()) + 1.0)

    def get_lr(self) -> list[float]:
        """Learning rates ``lr0 / 2 (cos(pi r(k)) + 1)`` of every group at step ``k``."""
        factor = self._factor()
        return [base * factor for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    def step(self, epoch: int | None = None) -> None:
        """Advance to the next step: set each group's ``lr`` and ``noise`` flag."""
        super().step(epoch)
        noise = self.is_sampling_step()
        for group in self.optimizer.param_groups:
            group["noise"] = noise

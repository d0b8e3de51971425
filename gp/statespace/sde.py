"""Linear time-invariant SDEs: the state-space form of a stationary 1-D Gaussian process.

A zero-mean stationary GP ``f`` with covariance ``k(tau)`` has an exact finite-dimensional
Markov representation when its spectral density is rational (Matérn with half-integer ``nu``,
sums of such kernels, ...):

.. math::

    dx(t) = F x(t)\\,dt + L\\,d\\beta(t), \\qquad
    \\mathbb{E}[d\\beta\\,d\\beta^\\top] = Q_c\\,dt, \\qquad f(t) = H x(t),

with stationary state covariance :math:`P_\\infty` solving the Lyapunov equation
:math:`F P_\\infty + P_\\infty F^\\top + L Q_c L^\\top = 0`, so that
:math:`k(\\tau) = H e^{F|\\tau|} P_\\infty H^\\top`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LTISDE", "stack_sdes"]


@dataclass(frozen=True)
class LTISDE:
    """Linear time-invariant SDE ``(F, L, Qc, H, Pinf)`` of a stationary GP on a 1-D input.

    Attributes
    ----------
    F : Tensor, shape (d, d)
        Feedback (drift) matrix.
    L : Tensor, shape (d, s)
        Noise-effect matrix.
    Qc : Tensor, shape (s, s)
        Spectral density of the white-noise driver ``beta``.
    H : Tensor, shape (1, d)
        Measurement matrix, ``f(t) = H x(t)``.
    Pinf : Tensor, shape (d, d)
        Stationary state covariance (the prior covariance of ``x(t)`` at any ``t``).
    blocks : tuple of int, optional
        Sizes of independent diagonal blocks (``F``, ``L Qc L^T`` and ``Pinf`` block diagonal
        with these contiguous blocks, as built by :func:`stack_sdes`); ``None``: one block.
        :func:`gp.statespace.discretise` exponentiates each block on its own, so a fast
        component does not cost a slow one its accuracy (a single scaling-and-squaring
        exponential scales every block by the largest norm).

    All five tensors share one dtype and device and stay differentiable with respect to the
    kernel hyperparameters they were built from.
    """

    F: Tensor
    L: Tensor
    Qc: Tensor
    H: Tensor
    Pinf: Tensor
    blocks: tuple[int, ...] | None = None

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Sizes of the independent diagonal blocks (``(d,)`` for one block)."""
        return (self.state_dim,) if self.blocks is None else self.blocks

    @property
    def state_dim(self) -> int:
        """Dimension ``d`` of the state ``x(t)``."""
        return self.F.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.F.dtype

    @property
    def device(self) -> torch.device:
        return self.F.device

    def to(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> LTISDE:
        """Copy with every matrix cast to ``dtype`` / moved to ``device`` (differentiably)."""
        moved = (m.to(dtype=dtype, device=device) for m in self._matrices())
        return LTISDE(*moved, blocks=self.blocks)

    def scaled(self, variance: Tensor) -> LTISDE:
        """SDE of ``variance * k``: scales ``Qc`` and ``Pinf`` (the dynamics are unchanged).

        Parameters
        ----------
        variance : Tensor, shape ()
            Positive output scale ``s^2``.
        """
        return LTISDE(
            self.F, self.L, variance * self.Qc, self.H, variance * self.Pinf, blocks=self.blocks
        )

    def lyapunov_residual(self) -> Tensor:
        """``F Pinf + Pinf F^T + L Qc L^T``, shape (d, d); zero for a consistent SDE."""
        return self.F @ self.Pinf + self.Pinf @ self.F.mT + self.L @ self.Qc @ self.L.mT

    def covariance(self, tau: Tensor) -> Tensor:
        """Kernel implied by the SDE, ``k(tau) = H expm(F |tau|) Pinf H^T``.

        Parameters
        ----------
        tau : Tensor, shape (n,)
            Lags.

        Returns
        -------
        Tensor, shape (n,)
        """
        tau = tau.to(dtype=self.dtype, device=self.device).abs()
        expm = torch.linalg.matrix_exp(tau[:, None, None] * self.F)  # (n, d, d)
        return (self.H @ expm @ self.Pinf @ self.H.mT).reshape(-1)

    def _matrices(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.F, self.L, self.Qc, self.H, self.Pinf


def stack_sdes(sdes: list[LTISDE]) -> LTISDE:
    """SDE of a sum of independent GPs ``k = k_1 + ... + k_J``.

    The state is the concatenation of the component states: ``F``, ``L``, ``Qc`` and ``Pinf``
    are block diagonal and ``H = [H_1, ..., H_J]``; ``blocks`` records the components' blocks.

    Parameters
    ----------
    sdes : list of LTISDE
        Component SDEs (one dtype and device).

    Returns
    -------
    LTISDE
        State dimension ``sum_j d_j``.
    """
    if not sdes:
        raise ValueError("sdes must hold at least one LTISDE")
    if len(sdes) == 1:
        return sdes[0]
    return LTISDE(
        F=torch.block_diag(*(s.F for s in sdes)),
        L=torch.block_diag(*(s.L for s in sdes)),
        Qc=torch.block_diag(*(s.Qc for s in sdes)),
        H=torch.cat([s.H for s in sdes], dim=-1),
        Pinf=torch.block_diag(*(s.Pinf for s in sdes)),
        blocks=tuple(size for s in sdes for size in s.block_sizes),
    )

"""State-space forms of oscillatory kernels and of kernel products.

- :func:`cosine_sde`: the undamped resonator ``k(tau) = s^2 cos(omega tau)``;
- :func:`periodic_series` / :func:`periodic_sde`: the periodic kernel as a truncated cosine
  (Fourier) series of resonators (Solin & Särkkä, AISTATS 2014);
- :func:`product_sde`: the product of independent GPs through Kronecker structure.

Periodic kernel conventions
---------------------------
gpytorch's ``PeriodicKernel`` with period ``p`` and ``lengthscale`` ``lam`` is

.. math::

    k(\\tau) = \\exp\\Big(-\\frac{2 \\sin^2(\\pi \\tau / p)}{\\lambda}\\Big),

i.e. the lengthscale enters *unsquared*: it equals ``ell^2`` of the textbook form
``exp(-2 sin^2(pi tau / p) / ell^2)`` (MacKay; Solin & Särkkä). With ``z = 1 / lam = ell^-2``,
``omega_0 = 2 pi / p`` and ``2 sin^2(x / 2) = 1 - cos x``, the generating function of the
modified Bessel functions, ``exp(z cos theta) = I_0(z) + 2 sum_{j>=1} I_j(z) cos(j theta)``, gives
the exact expansion

.. math::

    k(\\tau) = \\sum_{j=0}^{\\infty} q_j^2 \\cos(j \\omega_0 \\tau), \\qquad
    q_0^2 = e^{-z} I_0(z), \\quad q_j^2 = 2 e^{-z} I_j(z) \\ (j \\ge 1),

with ``q_j^2 >= 0`` and ``sum_j q_j^2 = k(0) = 1``. Truncating after ``j = J`` therefore has the
sup-norm error ``sup_tau |k(tau) - k_J(tau)| = sum_{j>J} q_j^2`` (the tail mass, attained at
``tau = 0``), which is what the automatic order selection bounds.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .sde import LTISDE, stack_sdes

__all__ = [
    "MAX_PERIODIC_ORDER",
    "cosine_sde",
    "periodic_sde",
    "periodic_series",
    "product_sde",
]

#: Largest series order the automatic selection may return (state dimension ``2 J + 1``).
MAX_PERIODIC_ORDER = 250


def cosine_sde(omega: Tensor, variance: Tensor | None = None) -> LTISDE:
    """SDE of the undamped resonator ``k(tau) = s^2 cos(omega tau)``.

    .. math::

        F = \\begin{pmatrix} 0 & -\\omega \\\\ \\omega & 0 \\end{pmatrix}, \\quad
        P_\\infty = s^2 I_2, \\quad H = (1, 0), \\quad L = I_2, \\quad Q_c = 0,

    so that ``H expm(F tau) Pinf H^T = s^2 cos(omega tau)``. ``F`` is skew-symmetric, hence the
    Lyapunov equation ``F Pinf + Pinf F^T = 0`` holds with ``Qc = 0`` and the discrete process
    noise ``Q = Pinf - A Pinf A^T`` vanishes (``A`` is a rotation).

    Parameters
    ----------
    omega : Tensor, shape ()
        Angular frequency.
    variance : Tensor, shape (), optional
        ``s^2``; 1 when omitted.

    Returns
    -------
    LTISDE
        State dimension 2, dtype and device of ``omega``.
    """
    w = omega.reshape(())
    s2 = torch.ones_like(w) if variance is None else variance.reshape(()).to(w)
    zero = torch.zeros_like(w)
    F = torch.stack([torch.stack([zero, -w]), torch.stack([w, zero])])
    eye = torch.eye(2, dtype=w.dtype, device=w.device)
    H = torch.tensor([[1.0, 0.0]], dtype=w.dtype, device=w.device)
    return LTISDE(F=F, L=eye, Qc=torch.zeros_like(eye), H=H, Pinf=s2 * eye)


def _bessel_scaled(z: Tensor, n_max: int) -> Tensor:
    """``e^{-z} I_j(z)`` for ``j = 0..n_max``, differentiable in ``z`` (torch ops only).

    The ratios ``rho_j = I_j(z) / I_{j-1}(z)`` come from the backward recurrence (a continued
    fraction, stable and overflow-free) ``rho_j = z / (2 j + z rho_{j+1})`` started at
    ``rho_{N+1} = 0`` with ``N = n_max + 40 + ceil(12 sqrt(z))``; then
    ``e^{-z} I_j(z) = i0e(z) prod_{k<=j} rho_k``. Forward recurrence would be unstable for
    ``j > z``.
    """
    n_cf = n_max + 40 + math.ceil(12.0 * math.sqrt(float(z.detach())))
    rho_next = torch.zeros_like(z)
    rhos: list[Tensor] = []
    for j in range(n_cf, 0, -1):
        rho_next = z / (2.0 * j + z * rho_next)
        if j <= n_max:
            rhos.append(rho_next)
    rhos.reverse()  # rho_1 .. rho_{n_max}
    i0e = torch.special.i0e(z)
    if n_max == 0:
        return i0e.reshape(1)
    return torch.cat([i0e.reshape(1), i0e * torch.cumprod(torch.stack(rhos), dim=0)])


def periodic_series(
    lengthscale: Tensor, order: int | None = None, tol: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Cosine-series coefficients ``q_j^2`` of gpytorch's ``PeriodicKernel``.

    ``k(tau) = exp(-2 sin^2(pi tau / p) / lam) ~= sum_{j=0}^{J} q_j^2 cos(j omega_0 tau)`` with
    ``omega_0 = 2 pi / p``, ``z = 1 / lam``, ``q_0^2 = e^{-z} I_0(z)``,
    ``q_j^2 = 2 e^{-z} I_j(z)`` (see the module docstring; ``lam`` is gpytorch's unsquared
    ``lengthscale``, i.e. ``ell^2`` of the textbook form).

    Parameters
    ----------
    lengthscale : Tensor, shape ()
        gpytorch ``PeriodicKernel.lengthscale`` ``lam > 0``.
    order : int, optional
        Truncation order ``J >= 0``. Default: the smallest ``J`` whose tail mass
        ``sum_{j>J} q_j^2`` (= the sup-norm error of the truncated kernel, relative to
        ``k(0) = 1``) is ``<= tol``.
    tol : float, default 1e-6
        Target sup-norm error for the automatic order, in ``(0, 1)``; ignored when ``order``
        is given. Values below ~1e-14 are not meaningful in float64.

    Returns
    -------
    q2 : Tensor, shape (J + 1,)
        ``q_0^2 .. q_J^2``, differentiable with respect to ``lengthscale``.
    tail : Tensor, shape ()
        ``sum_{j>J} q_j^2`` (detached): the exact sup-norm error of the truncation.

    Raises
    ------
    ValueError
        For ``order < 0``, ``tol`` outside ``(0, 1)``, a non-positive lengthscale, or an
        automatic order above :data:`MAX_PERIODIC_ORDER` (very small ``lam``; the state
        dimension would be ``2 J + 1``).

    Notes
    -----
    The chosen ``J`` depends on ``lam``, so it can change while ``lam`` is optimised; the
    resulting jumps in the log-likelihood are bounded by the truncation error. Fix ``order``
    for a smooth objective. For large ``z`` the coefficients decay like ``exp(-j^2 / (2 z))``,
    so ``J ~ sqrt(2 z log(1 / tol))``.
    """
    z = 1.0 / lengthscale.reshape(())
    if not bool(z.detach() > 0) or not bool(torch.isfinite(z.detach())):
        raise ValueError(f"periodic lengthscale must be finite and positive, got {1.0 / z}")
    if order is not None:
        if int(order) != order or order < 0:
            raise ValueError(f"periodic order must be a non-negative integer, got {order}")
        order = int(order)
    elif not 0.0 < tol < 1.0:
        raise ValueError(f"periodic tol must lie in (0, 1), got {tol}")
    # coefficients far enough out that the tail beyond them is below float64 resolution
    n_all = math.ceil(9.0 * math.sqrt(float(z.detach())) + 30)
    if order is not None:
        n_all = max(n_all, order + 1)
    scaled = _bessel_scaled(z, n_all)
    q2_all = torch.cat([scaled[:1], 2.0 * scaled[1:]])
    values = q2_all.detach()
    # tails[J] = sum_{j > J} q_j^2, accumulated from the small end (no cancellation)
    tails = torch.flip(torch.cumsum(torch.flip(values, [0]), 0), [0]) - values
    if order is None:
        ok = torch.nonzero(tails <= tol * values.sum()).reshape(-1)
        order = int(ok[0]) if ok.numel() else n_all
        if order > MAX_PERIODIC_ORDER:
            raise ValueError(
                f"the periodic kernel with lengthscale {float(1.0 / z):.3g} needs order "
                f"{order} > {MAX_PERIODIC_ORDER} for tol={tol}; use a larger lengthscale, a "
                "looser periodic_tol, or give periodic_order explicitly"
            )
    return q2_all[: order + 1], tails[order]


def periodic_sde(
    period: Tensor, lengthscale: Tensor, order: int | None = None, tol: float = 1e-6
) -> LTISDE:
    """SDE of gpytorch's ``PeriodicKernel`` as a sum of ``J + 1`` resonators.

    Harmonic ``j`` has frequency ``j omega_0`` (``omega_0 = 2 pi / period``) and stationary
    covariance ``q_j^2 I`` (:func:`cosine_sde`); harmonic 0 is the constant process
    (``F = 0``, ``Pinf = q_0^2``, one state). The result is the block-diagonal stack, so
    ``H expm(F tau) Pinf H^T = sum_{j<=J} q_j^2 cos(j omega_0 tau)`` exactly.

    Parameters
    ----------
    period : Tensor, shape ()
        ``PeriodicKernel.period_length`` ``p``.
    lengthscale : Tensor, shape ()
        ``PeriodicKernel.lengthscale`` ``lam`` (gpytorch convention, ``= ell^2``).
    order, tol
        Series order or target sup-norm error; see :func:`periodic_series`.

    Returns
    -------
    LTISDE
        State dimension ``2 J + 1``, differentiable with respect to ``period`` and
        ``lengthscale``.
    """
    q2, _ = periodic_series(lengthscale, order=order, tol=tol)
    omega0 = 2.0 * math.pi / period.reshape(()).to(q2)
    dtype, device = q2.dtype, q2.device
    one = torch.ones(1, 1, dtype=dtype, device=device)
    sdes = [LTISDE(F=0.0 * one, L=one, Qc=0.0 * one, H=one, Pinf=q2[0].reshape(1, 1))]
    sdes += [cosine_sde(j * omega0, q2[j]) for j in range(1, q2.shape[0])]
    return stack_sdes(sdes)


def product_sde(sdes: list[LTISDE]) -> LTISDE:
    """SDE of a product ``k = k_1 k_2 ...`` of independent stationary GPs.

    The state is the Kronecker product of the component states, ``x = x_1 ⊗ x_2``, whose
    conditional mean evolves with ``A = A_1 ⊗ A_2 = expm(F Delta)``:

    .. math::

        F = F_1 \\oplus F_2 = F_1 \\otimes I + I \\otimes F_2, \\quad
        P_\\infty = P_{\\infty,1} \\otimes P_{\\infty,2}, \\quad H = H_1 \\otimes H_2,

    and ``H expm(F tau) Pinf H^T = k_1(tau) k_2(tau)``. The discrete process noise
    ``Q = Pinf - A Pinf A^T`` (what :func:`gp.statespace.discretise` uses; it needs only ``F``
    and ``Pinf``) is positive semi-definite. For consistency of the container, ``L = I`` and
    ``Qc = -(F Pinf + Pinf F^T)`` (the Lyapunov equation's noise term) are filled in.

    Parameters
    ----------
    sdes : list of LTISDE
        Component SDEs (one dtype and device); folded left to right.

    Returns
    -------
    LTISDE
        State dimension ``prod_j d_j``.
    """
    if not sdes:
        raise ValueError("sdes must hold at least one LTISDE")
    out = sdes[0]
    for nxt in sdes[1:]:
        d1, d2 = out.state_dim, nxt.state_dim
        eye1 = torch.eye(d1, dtype=out.dtype, device=out.device)
        eye2 = torch.eye(d2, dtype=out.dtype, device=out.device)
        F = torch.kron(out.F, eye2) + torch.kron(eye1, nxt.F)
        Pinf = torch.kron(out.Pinf, nxt.Pinf)
        Qc = -(F @ Pinf + Pinf @ F.mT)
        out = LTISDE(
            F=F,
            L=torch.eye(d1 * d2, dtype=out.dtype, device=out.device),
            Qc=0.5 * (Qc + Qc.mT),
            H=torch.kron(out.H, nxt.H),
            Pinf=Pinf,
        )
    return out

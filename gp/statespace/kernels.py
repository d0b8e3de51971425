"""Conversion of gpytorch kernels on a 1-D input to linear time-invariant SDEs.

Supported (exact, no approximation):

- ``MaternKernel`` with ``nu`` in {0.5, 1.5, 2.5} (``lam = sqrt(2 nu) / lengthscale``);
- ``ConstantKernel``: ``k(tau) = c``, a random constant offset (``F = 0``, ``Pinf = c``,
  state dimension 1);
- ``ScaleKernel`` around any supported kernel (multiplies ``Qc`` and ``Pinf`` by the
  ``outputscale``);
- ``AdditiveKernel`` (what ``k1 + k2`` builds) of supported kernels (block-diagonal stacking);
- ``CosineKernel``: gpytorch's ``k(tau) = cos(pi tau / p)`` (note: ``pi``, not ``2 pi``), an
  undamped resonator with ``omega = pi / p`` (:func:`.periodic.cosine_sde`);
- ``ProductKernel`` (what ``k1 * k2`` builds) of supported kernels, through Kronecker structure
  (:func:`.periodic.product_sde`); e.g. the quasi-periodic ``MaternKernel * PeriodicKernel``.

Supported with a controlled approximation:

- ``PeriodicKernel``: gpytorch's ``k(tau) = exp(-2 sin^2(pi tau / p) / lam)`` (``lam`` =
  ``lengthscale``, unsquared, i.e. ``ell^2`` of the textbook form) as the cosine series of
  Solin & Särkkä (2014) truncated at order ``J`` (state dimension ``2 J + 1``); by default the
  smallest ``J`` whose sup-norm kernel error is ``<= periodic_tol`` (relative to ``k(0)``), see
  :func:`.periodic.periodic_series`.

Everything is built from the kernels' ``lengthscale`` / ``outputscale`` tensors, so the SDE
matrices are differentiable with respect to the kernel hyperparameters.
"""

from __future__ import annotations

import math

import torch
from gpytorch.kernels import (
    AdditiveKernel,
    ConstantKernel,
    CosineKernel,
    Kernel,
    MaternKernel,
    PeriodicKernel,
    ProductKernel,
    ScaleKernel,
)
from torch import Tensor

from .periodic import cosine_sde, periodic_sde, product_sde
from .sde import LTISDE, stack_sdes

__all__ = ["constant_sde", "kernel_to_sde", "matern_sde", "rescale_time"]

_SUPPORTED = (
    "MaternKernel(nu=0.5, 1.5 or 2.5), ConstantKernel, CosineKernel, PeriodicKernel "
    "(truncated series), "
    "ScaleKernel, sums (AdditiveKernel / k1 + k2) and products (ProductKernel / k1 * k2)"
)

# Kernels with no finite-dimensional SDE, and what to use instead.
_NO_FINITE_SDE = {
    "RBFKernel": (
        "the squared-exponential (RBF) kernel has no finite-dimensional SDE representation; "
        "use MaternKernel(nu=2.5), the closest finite-order alternative (or nu=1.5 for rougher "
        "functions)"
    ),
    "RQKernel": (
        "the rational-quadratic kernel has no finite-dimensional SDE representation; use a sum "
        "of MaternKernel(nu=2.5) kernels with different lengthscales instead"
    ),
}


def matern_sde(nu: float, lengthscale: Tensor, variance: Tensor | None = None) -> LTISDE:
    """Closed-form SDE of the Matérn kernel with ``nu = p + 1/2``, ``p`` in {0, 1, 2}.

    The textbook companion form (Hartikainen & Särkkä 2010; Särkkä & Solin 2019, Sec. 12.3)
    has the state ``z = (f, f', f'')`` with ``F_c = [[0, 1, 0], [0, 0, 1], [-lam^3, -3 lam^2,
    -3 lam]]``, ``Qc = (16/3) s^2 lam^5`` and ``Pinf_c = [[s^2, 0, -kap], [0, kap, 0],
    [-kap, 0, lam^4 s^2]]`` (``nu = 5/2``, ``kap = lam^2 s^2 / 3``; ``lam = sqrt(2 nu) / ell``,
    Rasmussen & Williams' convention, as gpytorch). Its entries span ``lam^(2p+1)``, which
    overflows float32 for ``ell <~ 1e-7`` and wrecks the matrix exponential and the
    discretisation for short lengthscales in either precision. This function returns the
    exactly equivalent *balanced* form ``x = T^{-1} z`` with ``T = diag(sqrt(diag Pinf_c)) / s``
    (the derivatives measured in units of the lengthscale), i.e. ``F = T^{-1} F_c T``,
    ``L Qc L^T = T^{-1} L_c Qc_c L_c^T T^{-1}``, ``Pinf = T^{-1} Pinf_c T^{-1}``,
    ``H = H_c T = e_1^T`` — ``F`` is ``lam`` times a fixed matrix and ``Pinf`` is ``s^2``
    times a fixed correlation matrix, so every entry is ``O(lam)`` or ``O(s^2)``:

    - ``nu = 1/2``: ``F = -lam``, ``Qc = 2 s^2 lam``, ``Pinf = s^2`` (``T = 1``);
    - ``nu = 3/2`` (``T = diag(1, lam)``): ``F = lam [[0, 1], [-1, -2]]``,
      ``Qc = 4 s^2 lam``, ``Pinf = s^2 I``;
    - ``nu = 5/2`` (``T = diag(1, lam / sqrt 3, lam^2)``):
      ``F = lam [[0, 1/sqrt 3, 0], [0, 0, sqrt 3], [-1, -sqrt 3, -3]]``,
      ``Qc = (16/3) s^2 lam``, ``Pinf = s^2 [[1, 0, -1/3], [0, 1, 0], [-1/3, 0, 1]]``;

    with ``L = e_d`` and ``H = e_1^T`` throughout. The kernel
    ``k(tau) = H expm(F |tau|) Pinf H^T`` is unchanged by the similarity.

    Parameters
    ----------
    nu : float
        Smoothness, one of 0.5, 1.5, 2.5.
    lengthscale : Tensor, shape ()
        Positive lengthscale ``ell``.
    variance : Tensor, shape (), optional
        Marginal variance ``s^2``; 1 when omitted.

    Returns
    -------
    LTISDE
        State dimension ``p + 1``, dtype and device of ``lengthscale``.
    """
    if nu not in (0.5, 1.5, 2.5):
        raise ValueError(f"nu must be 0.5, 1.5 or 2.5 for a Matérn SDE, got {nu}")
    # lengthscales below sqrt(tiny) (1.5e-154 in float64, 1.1e-19 in float32; e.g. a
    # softplus that underflowed to 0) are raised to it: lam stays finite with room for
    # lam * dt, and the process is already white noise at any step it could resolve
    ell = lengthscale.reshape(()).clamp_min(math.sqrt(torch.finfo(lengthscale.dtype).tiny))
    s2 = torch.ones_like(ell) if variance is None else variance.reshape(()).to(ell)
    lam = math.sqrt(2.0 * nu) / ell
    like = {"dtype": ell.dtype, "device": ell.device}
    if nu == 0.5:
        F_unit, qc, P_unit = [[-1.0]], 2.0, [[1.0]]
    elif nu == 1.5:
        F_unit, qc, P_unit = [[0.0, 1.0], [-1.0, -2.0]], 4.0, [[1.0, 0.0], [0.0, 1.0]]
    else:
        r3 = math.sqrt(3.0)
        F_unit = [[0.0, 1.0 / r3, 0.0], [0.0, 0.0, r3], [-1.0, -r3, -3.0]]
        qc = 16.0 / 3.0
        P_unit = [[1.0, 0.0, -1.0 / 3.0], [0.0, 1.0, 0.0], [-1.0 / 3.0, 0.0, 1.0]]
    F = lam * torch.tensor(F_unit, **like)
    Pinf = s2 * torch.tensor(P_unit, **like)
    Qc = (qc * s2 * lam).reshape(1, 1)
    d = F.shape[-1]
    L = torch.zeros(d, 1, **like)
    L[-1, 0] = 1.0
    H = torch.zeros(1, d, **like)
    H[0, 0] = 1.0
    return LTISDE(F=F, L=L, Qc=Qc, H=H, Pinf=Pinf)


def constant_sde(constant: Tensor) -> LTISDE:
    """SDE of ``k(tau) = c``: a static state ``x(t) = x(0) ~ N(0, c)`` (``F = 0``, ``Qc = 0``).

    Parameters
    ----------
    constant : Tensor, shape () or (1,)
        ``c > 0``.

    Returns
    -------
    LTISDE
        State dimension 1, dtype and device of ``constant``.
    """
    c = constant.reshape(1, 1)
    zero = torch.zeros_like(c)
    return LTISDE(F=zero, L=torch.ones_like(c), Qc=zero, H=torch.ones_like(c), Pinf=c)


def kernel_to_sde(
    kernel: Kernel,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    *,
    periodic_order: int | None = None,
    periodic_tol: float = 1e-6,
) -> LTISDE:
    """State-space (SDE) form of a gpytorch kernel on a 1-D input.

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel
        A supported kernel (see the module docstring) with an empty ``batch_shape`` and a
        single input dimension.
    dtype, device : optional
        Where to build the matrices; default: those of the kernel's hyperparameters. The
        hyperparameters are cast first, so the result stays differentiable.
    periodic_order : int, optional
        Series order ``J`` for every ``PeriodicKernel`` inside ``kernel``; default: chosen per
        kernel from ``periodic_tol``.
    periodic_tol : float, default 1e-6
        Sup-norm error allowed for each (unscaled) ``PeriodicKernel``'s truncated series,
        ``sup_tau |k(tau) - k_J(tau)| <= periodic_tol`` (relative to ``k(0) = 1``); a
        ``ScaleKernel`` multiplies the bound by its ``outputscale`` and a product with a kernel
        bounded by ``|k_2| <= c`` by ``c``.

    Returns
    -------
    LTISDE
        ``k(tau) = H expm(F |tau|) Pinf H^T`` equals ``kernel`` at every lag ``tau`` (up to
        the stated truncation error where a ``PeriodicKernel`` is involved).

    Raises
    ------
    ValueError
        For a kernel with no finite SDE (``RBFKernel``: use ``MaternKernel(nu=2.5)``), an
        unsupported kernel class, a batched kernel, or one on more than one input dimension;
        the message names the kernel class.
    """
    if not isinstance(kernel, Kernel):
        raise ValueError(f"kernel must be a gpytorch.kernels.Kernel, got {type(kernel).__name__}")
    name = type(kernel).__name__
    if len(kernel.batch_shape) > 0:
        raise ValueError(
            f"kernel {name} has batch_shape {tuple(kernel.batch_shape)}; the state-space GP "
            "supports unbatched kernels only"
        )
    active = kernel.active_dims
    if active is not None and active.tolist() != [0]:
        raise ValueError(
            f"kernel {name} has active_dims {active.tolist()}; the state-space GP has a single "
            "(time) input, so active_dims must be None or [0]"
        )
    opts = {"dtype": dtype, "device": device}
    opts_p = {"periodic_order": periodic_order, "periodic_tol": periodic_tol}
    if isinstance(kernel, ScaleKernel):
        base = kernel_to_sde(kernel.base_kernel, **opts, **opts_p)
        return base.scaled(kernel.outputscale.to(dtype=base.dtype, device=base.device))
    if isinstance(kernel, AdditiveKernel):
        return stack_sdes([kernel_to_sde(k, **opts, **opts_p) for k in kernel.kernels])
    if isinstance(kernel, ProductKernel):
        return product_sde([kernel_to_sde(k, **opts, **opts_p) for k in kernel.kernels])
    if isinstance(kernel, (CosineKernel, PeriodicKernel)):
        ard = kernel.period_length.shape[-1]
        if ard != 1 or kernel.ard_num_dims not in (None, 1):
            raise ValueError(
                f"kernel {name} has {ard} period lengths (ard_num_dims); the state-space GP "
                "has a single (time) input"
            )
        period = kernel.period_length.to(**opts).reshape(())
        if isinstance(kernel, CosineKernel):
            return cosine_sde(math.pi / period)  # gpytorch: cos(pi tau / p)
        ell = kernel.lengthscale.to(**opts).reshape(())
        return periodic_sde(period, ell, order=periodic_order, tol=periodic_tol)
    if isinstance(kernel, ConstantKernel):
        return constant_sde(kernel.constant.to(dtype=dtype, device=device))
    if isinstance(kernel, MaternKernel):
        if kernel.ard_num_dims not in (None, 1):
            raise ValueError(
                f"kernel {name} has ard_num_dims={kernel.ard_num_dims}; the state-space GP has "
                "a single (time) input"
            )
        ell = kernel.lengthscale.to(dtype=dtype, device=device)
        return matern_sde(float(kernel.nu), ell)
    if name in _NO_FINITE_SDE:
        raise ValueError(f"kernel {name} is not supported: {_NO_FINITE_SDE[name]}")
    raise ValueError(
        f"kernel {name} has no state-space conversion; supported: {_SUPPORTED}. For a smooth "
        "stationary kernel use MaternKernel(nu=2.5), the closest finite-order alternative to RBF"
    )


#: Hyperparameters measured in units of time, per supported kernel class (the periodic
#: kernel's ``lengthscale`` is dimensionless: it divides ``sin^2``)
_TIME_PARAMETERS = (
    (MaternKernel, "lengthscale"),
    (PeriodicKernel, "period_length"),
    (CosineKernel, "period_length"),
)


def rescale_time(kernel: Kernel, factor: float) -> Kernel:
    """The same prior on the time axis ``t' = factor * t``, in place.

    Every time-valued hyperparameter — Matérn lengthscales, periodic and cosine periods —
    is multiplied by ``factor``, together with the bounds of its gpytorch constraint (so an
    ``Interval`` on a period keeps meaning the same interval of time); output scales,
    constants and the periodic kernel's (dimensionless) lengthscale are unchanged. Then
    ``k'(factor * t1, factor * t2) = k(t1, t2)``. Priors registered on these parameters are
    left as they are (the library's marginal-likelihood objectives do not use them).

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel
        Any kernel; submodules of the classes above are rescaled.
    factor : float
        Positive and finite.

    Returns
    -------
    Kernel
        ``kernel`` itself.
    """
    factor = float(factor)
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be positive and finite, got {factor}")
    for module in kernel.modules():
        for cls, name in _TIME_PARAMETERS:
            if not isinstance(module, cls):
                continue
            value = getattr(module, name).detach().clone()
            constraint = getattr(module, f"raw_{name}_constraint")
            for bound in ("lower_bound", "upper_bound"):
                if isinstance(getattr(constraint, bound, None), Tensor):
                    setattr(constraint, bound, getattr(constraint, bound) * factor)
            setattr(module, name, value * factor)
    return kernel

"""Fast exact log marginal likelihood of a state-space GP: compiled filter + hand-written adjoint.

:func:`fast_log_marginal_likelihood` evaluates the same quantity as
``kalman_filter(*discretise(sde, dt), ...).log_likelihood`` (the exact discretisation and
the Kalman filter of Särkkä & Solin, *Applied Stochastic Differential Equations*, 2019), but

- the forward pass is one compiled loop (numba) that discretises exactly *inside* the loop
  (``A_k = expm(F dt_k)`` by scaling-Padé-squaring, ``P^- = A (P - Pinf) A^T + Pinf``, i.e.
  ``Q_k = Pinf - A_k Pinf A_k^T`` without forming it) and records an O(n d^2) tape;
- the backward pass is a second compiled loop, the reverse-mode adjoint of the filter, that
  returns ``dL/dF``, ``dL/dPinf``, ``dL/dH``, ``dL/dnoise`` (and ``dL/ddt``, ``dL/dy`` when
  those require gradients), using the adjoint of the matrix exponential
  ``dL/dF += dt_k L_expm(dt_k F^T, dL/dA_k)`` (Fréchet derivative, Al-Mohy & Higham 2009).

Torch autograd then only maps ``(F, Pinf, H, noise)`` to the kernel hyperparameters (O(1)
work). numba is optional (``pip install bdlgp[fast]``) and imported lazily on first use;
without it the same function falls back to the pure-torch parallel-scan filter
(:func:`gp.statespace.parallel_kalman_filter` on :func:`gp.statespace.discretise`), which gives
the same numbers to rounding. Computation is in float64 on the CPU whatever the inputs' dtype
and device; results are cast back.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from .sde import LTISDE

__all__ = ["fast_log_marginal_likelihood", "numba_available"]

_BACKENDS = ("auto", "numba", "torch")


@lru_cache(maxsize=1)
def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def numba_available() -> bool:
    """Whether the compiled backend can be used (numba is installed)."""
    return _numba_installed()


def _kernels() -> ModuleType:
    """The compiled kernels (imports numba on first call; compiled code is cached on disk)."""
    from . import _fast_kernels

    return _fast_kernels


def _as_numpy(x: Tensor) -> np.ndarray:
    """Float64, C-contiguous CPU copy/view of ``x`` (detached)."""
    return np.ascontiguousarray(x.detach().to(device="cpu", dtype=torch.float64).numpy())


class _KalmanLML(torch.autograd.Function):
    """``log p(y)`` of the stationary SSM ``(F, Pinf, H)`` with noise ``R`` on steps ``dt``."""

    @staticmethod
    def forward(  # noqa: ANN205
        ctx,  # noqa: ANN001
        F: Tensor,
        Pinf: Tensor,
        H: Tensor,
        noise: Tensor,
        dt: Tensor,
        y: Tensor,
        bounds: np.ndarray,
    ):
        kern = _kernels()
        arrays = [_as_numpy(x) for x in (F, Pinf, H.reshape(-1), noise.reshape(-1), dt, y)]
        n, d = y.shape[0], F.shape[-1]
        A_tape = np.empty((max(n - 1, 0), d, d))
        m_tape = np.empty((n, d))
        P_tape = np.empty((n, d, d))
        ll = kern.forward(*arrays, True, A_tape, m_tape, P_tape, bounds)
        ctx.arrays = arrays
        ctx.bounds = bounds
        ctx.tape = (A_tape, m_tape, P_tape)
        ctx.meta = [(x.dtype, x.device, x.shape) for x in (F, Pinf, H, noise, dt, y)]
        out_dtype = torch.promote_types(F.dtype, y.dtype)
        return torch.tensor(ll, dtype=out_dtype, device=y.device)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: ANN001, ANN205
        kern = _kernels()
        F, Pinf, h, R, dt, y = ctx.arrays
        d = F.shape[0]
        gF, gPinf, gh, gR = np.zeros((d, d)), np.zeros((d, d)), np.zeros(d), np.zeros(R.shape)
        want_dt, want_y = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        gdt = np.zeros(dt.shape if want_dt else 0)
        gy = np.zeros(y.shape if want_y else 0)
        if ctx.tape is None:
            raise RuntimeError(
                "the backward pass of fast_log_marginal_likelihood consumes its tape and runs "
                "once; recompute the log-likelihood to differentiate it again"
            )
        A_tape, m_tape, P_tape = ctx.tape
        ctx.tape = None
        # pass 1: adjoint of the filter; A_tape[k] is overwritten with dL/dA_k
        kern.backward(
            F, Pinf, h, R, dt, y, A_tape, m_tape, P_tape, gPinf, gh, gR, gdt, gy, want_dt, want_y
        )
        del m_tape, P_tape
        # pass 2: dL/dF = sum_k dt_k L_expm(dt_k F^T, dL/dA_k)
        kern.expm_adjoint_blocks(F, dt, A_tape, gF, ctx.bounds)
        del A_tape
        gPinf = 0.5 * (gPinf + gPinf.T)
        scale = grad_out.detach().to(device="cpu", dtype=torch.float64)
        grads = []
        for g, (dtype, device, shape), needed in zip(
            (gF, gPinf, gh, gR, gdt, gy), ctx.meta, ctx.needs_input_grad[:6], strict=True
        ):
            if not needed:
                grads.append(None)
                continue
            g = torch.from_numpy(g) * scale
            grads.append(g.reshape(shape).to(dtype=dtype, device=device))
        return (*grads, None)  # no gradient for the block offsets


def _check_inputs(sde: LTISDE, dt: Tensor, y: Tensor, noise: Tensor) -> Tensor:
    """Validate; returns ``noise`` as a (1,) or (n,) tensor."""
    if not isinstance(sde, LTISDE):
        raise TypeError(f"sde must be an LTISDE, got {type(sde).__name__}")
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] == 0:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y must be a tensor of shape (n,) with n >= 1, got {shape}")
    n = y.shape[0]
    if not isinstance(dt, Tensor) or dt.shape != (n - 1,):
        shape = tuple(dt.shape) if isinstance(dt, Tensor) else type(dt).__name__
        raise ValueError(f"dt must be a tensor of shape (n - 1,) = ({n - 1},), got {shape}")
    if not (y.dtype.is_floating_point and dt.dtype.is_floating_point):
        raise TypeError(f"y and dt must be floating point, got {y.dtype} and {dt.dtype}")
    if bool(torch.isinf(y).any()):
        raise ValueError("y contains inf; use NaN to mark missing observations")
    if not bool(torch.isfinite(dt).all()) or bool((dt < 0).any()):
        raise ValueError("dt must hold finite, non-negative steps (sort the times first)")
    noise = torch.as_tensor(noise, dtype=sde.dtype, device=sde.device)
    if noise.numel() not in (1, n):
        raise ValueError(f"noise must have shape () or ({n},), got {tuple(noise.shape)}")
    if not bool((noise > 0).all()) or not bool(torch.isfinite(noise).all()):
        raise ValueError("noise must hold finite, positive variances")
    d = sde.state_dim
    if sde.F.shape != (d, d) or sde.Pinf.shape != (d, d) or sde.H.shape not in ((1, d), (d,)):
        raise ValueError(
            f"sde must have F, Pinf of shape (d, d) and H of shape (1, d); got "
            f"{tuple(sde.F.shape)}, {tuple(sde.Pinf.shape)}, {tuple(sde.H.shape)}"
        )
    return noise.reshape(-1)


def _torch_lml(sde: LTISDE, dt: Tensor, y: Tensor, noise: Tensor) -> Tensor:
    """Pure-torch fallback: exact discretisation + the parallel-scan Kalman filter."""
    from .discretise import discretise
    from .parallel import parallel_kalman_filter

    dtype = torch.promote_types(sde.dtype, y.dtype)
    sde = sde.to(dtype=dtype, device=y.device)
    A, Q = discretise(sde, dt.to(dtype))
    noise = noise.to(dtype=dtype, device=y.device)
    noise = noise.reshape(()) if noise.numel() == 1 else noise
    result = parallel_kalman_filter(A, Q, sde.H, sde.Pinf, y.to(dtype), noise, zero_step=dt == 0)
    return result.log_likelihood


def fast_log_marginal_likelihood(
    sde: LTISDE, dt: Tensor, y: Tensor, noise: Tensor | float, *, backend: str = "auto"
) -> Tensor:
    """Exact GP log marginal likelihood ``log p(y)`` in O(n d^3), differentiable.

    Parameters
    ----------
    sde : LTISDE
        State-space form of the kernel (e.g. from :func:`gp.statespace.kernel_to_sde`); only
        ``F``, ``Pinf`` and ``H`` are used (``Q_k = Pinf - A_k Pinf A_k^T``).
    dt : Tensor, shape (n - 1,)
        Steps between consecutive *sorted* times, ``>= 0`` (0 = repeated time).
    y : Tensor, shape (n,)
        Observations at the sorted times; NaN marks a missing value.
    noise : Tensor, shape () or (n,), or float
        Observation-noise variance(s), > 0.
    backend : {"auto", "numba", "torch"}, default "auto"
        ``"numba"``: compiled forward/adjoint loops (raises ``ImportError`` without numba);
        ``"torch"``: the pure-torch parallel-scan filter; ``"auto"``: numba when installed.

    Returns
    -------
    Tensor, shape ()
        ``sum_k log N(y_k; H m_k^-, H P_k^- H^T + R_k)`` over observed points, in the
        promoted dtype of ``sde`` and ``y``; differentiable with respect to ``sde.F``,
        ``sde.Pinf``, ``sde.H``, ``noise`` (and ``dt``, ``y``). Computed in float64.

    Notes
    -----
    Cost per step (numba): one ``d x d`` matrix exponential and one Fréchet derivative (shared
    by consecutive equal steps), O(d^3); tape memory ``8 (n - 1) d^2 + 8 n (d^2 + d)`` bytes,
    freed after the backward pass. Without gradients no tape is kept (O(d^2) memory).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    noise = _check_inputs(sde, dt, y, noise)
    use_numba = backend == "numba" or (backend == "auto" and numba_available())
    if backend == "numba" and not numba_available():
        raise ImportError("backend='numba' needs numba: pip install bdlgp[fast]")
    if not use_numba:
        return _torch_lml(sde, dt, y, noise)
    # Balance the state (x -> x / s, s = sqrt(diag Pinf)): the LML is invariant under this
    # similarity, and it evens out the scales of the states of any SDE (matern_sde is built
    # balanced already). s is a constant of the transform, so gradients flow through F, Pinf
    # and H unchanged. The blocks of a sum are exponentiated one at a time (block_powers).
    s = sde.Pinf.detach().diagonal().clamp_min(torch.finfo(sde.dtype).tiny).sqrt()
    F = sde.F * s / s[:, None]
    Pinf = sde.Pinf / (s[:, None] * s)
    H = sde.H.reshape(1, -1) * s
    bounds = np.cumsum((0, *sde.block_sizes)).astype(np.int64)
    inputs = (F, Pinf, H, noise, dt, y)
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        return _KalmanLML.apply(*inputs, bounds)
    arrays = [_as_numpy(x) for x in (F, Pinf, H.reshape(-1), noise, dt, y)]
    empty = np.empty((0, 0, 0))
    ll = _kernels().forward(*arrays, False, empty, np.empty((0, 0)), empty, bounds)
    return torch.tensor(ll, dtype=torch.promote_types(sde.dtype, y.dtype), device=y.device)

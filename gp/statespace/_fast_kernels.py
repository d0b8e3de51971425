"""Compiled (numba) Kalman filter log-likelihood and its reverse-mode adjoint.

Private module of :mod:`gp.statespace.fast`; importing it imports numba (an optional
dependency), so :mod:`.fast` imports it lazily. All arrays are float64 and C-contiguous.

Model (continuous-time, stationary; ``dt_k = t_{k+1} - t_k >= 0``)::

    x_0 ~ N(0, Pinf),  x_{k+1} = A_k x_k + q_k,  A_k = expm(F dt_k),
    q_k ~ N(0, Pinf - A_k Pinf A_k^T),  y_k = h^T x_k + r_k,  r_k ~ N(0, R_k).

Forward (one pass, O(n d^3)): predict ``m^- = A m``, ``P^- = A (P - Pinf) A^T + Pinf`` (the
stationary discretisation written without forming ``Q``), update with ``c = P^- h``,
``s = h^T c + R``, ``v = y - h^T m^-``, ``m = m^- + c v / s``, ``P = P^- - c c^T / s``, and
``log N(v; 0, s)``. The tape keeps ``A_k``, ``m_k^-`` and ``P_k^-`` (O(n d^2) memory).

Backward: the exact reverse-mode adjoint of that recursion (equations in :func:`backward`);
gradients with respect to ``F`` go through the adjoint of the matrix exponential,
``dL/dF += dt L(dt F^T, dL/dA)`` (``L(X, E)``: Fréchet derivative of ``expm`` at ``X`` in
direction ``E``, whose adjoint is ``L(X^T, .)``), computed by the scaling-Padé-squaring
algorithm of Al-Mohy & Higham (2009), as in ``scipy.linalg.expm_frechet``. Consecutive steps
of equal length share one matrix exponential and one Fréchet derivative (their ``dL/dA`` are
summed first), so regular grids cost one ``expm`` per run of equal steps. The matrix
exponential, its Fréchet derivative and the small dense operations are in
:mod:`._fast_expm` (re-exported here).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._fast_expm import (  # noqa: F401  (re-exported for gp.statespace.fast)
    _mm,
    _norm1_both,
    _set,
    _setv,
    block_powers,
    expm_adjoint,
    expm_adjoint_blocks,
    expm_blocks,
    expm_frechet_scaled,
    expm_scaled,
    normalised_powers,
)

_LOG_2PI = math.log(2.0 * math.pi)

# --------------------------------------------------------------------------- filter pass


@njit(cache=True, error_model="numpy")
def forward(F, Pinf, h, R, dt, y, store, A_tape, m_tape, P_tape, bounds):  # noqa: ANN001, ANN201
    """Kalman filter log marginal likelihood; optionally records the tape.

    Parameters
    ----------
    F, Pinf : (d, d); h : (d,); R : (1,) or (n,) noise variances; dt : (n - 1,); y : (n,)
        (NaN = missing); store : bool; A_tape (n - 1, d, d), m_tape (n, d), P_tape (n, d, d)
        (any shape when ``store`` is False); bounds : (nb + 1,) offsets of the diagonal
        blocks of ``F`` (``[0, d]`` for one block), exponentiated one at a time.

    Returns
    -------
    float
        ``sum_k log N(y_k; h^T m_k^-, h^T P_k^- h + R_k)`` over observed ``k``.
    """
    n = y.shape[0]
    d = F.shape[0]
    per_step = R.shape[0] == n and n > 1
    P_pow, norms = block_powers(F, bounds)
    work = np.empty((3, d, d))
    piv = np.empty(d, dtype=np.int64)
    A = np.empty((d, d))
    T = np.empty((d, d))
    m = np.zeros(d)
    mt = np.empty(d)
    c = np.empty(d)
    P = np.empty((d, d))
    _set(P, Pinf)
    last = -1.0
    ll = 0.0
    for k in range(n):
        if k > 0:
            tau = dt[k - 1]
            if tau != 0.0:
                if tau != last:
                    expm_blocks(P_pow, norms, bounds, tau, A, work, piv)
                    last = tau
                for i in range(d):  # m = A m
                    acc = 0.0
                    for j in range(d):
                        acc += A[i, j] * m[j]
                    mt[i] = acc
                _setv(m, mt)
                for i in range(d):  # P = A (P - Pinf) A^T + Pinf
                    for j in range(d):
                        P[i, j] -= Pinf[i, j]
                _mm(1.0, A, P, T, False)
                for i in range(d):
                    for j in range(i, d):
                        acc = 0.0
                        for q in range(d):
                            acc += T[i, q] * A[j, q]
                        P[i, j] = acc + 0.5 * (Pinf[i, j] + Pinf[j, i])
                        P[j, i] = P[i, j]
            if store:
                _set(A_tape[k - 1], A)
        if store:
            _setv(m_tape[k], m)
            _set(P_tape[k], P)
        ll += _filtered(m, P, P, h, y[k], R, k, per_step, c)  # in place (P aliases Pp)
    return ll


@njit(cache=True, error_model="numpy", inline="always")
def _filtered(m, P, Pp, h, yk, R, k, per_step, c):  # noqa: ANN001, ANN202
    """Filtered moments from predicted ones: ``m`` holds ``m^-`` on entry; ``P`` gets ``P``.

    Returns the step's log-likelihood term ``log N(y_k; h^T m^-, h^T P^- h + R_k)`` (0 when
    ``y_k`` is missing). ``P`` may alias ``Pp``: ``Pp`` is only read before ``P`` is written.
    """
    d = m.shape[0]
    _set(P, Pp)
    if yk != yk:
        return 0.0
    s = R[k] if per_step else R[0]
    v = yk
    for i in range(d):
        acc = 0.0
        for j in range(d):
            acc += Pp[i, j] * h[j]
        c[i] = acc
        s += h[i] * acc
        v -= h[i] * m[i]
    for i in range(d):
        m[i] += c[i] * (v / s)
        for j in range(d):
            P[i, j] -= c[i] * c[j] / s
    return -0.5 * (v * v / s + math.log(s) + _LOG_2PI)


@njit(cache=True, error_model="numpy")
def backward(  # noqa: ANN201
    F,  # noqa: ANN001
    Pinf,  # noqa: ANN001
    h,  # noqa: ANN001
    R,  # noqa: ANN001
    dt,  # noqa: ANN001
    y,  # noqa: ANN001
    A_tape,  # noqa: ANN001
    m_tape,  # noqa: ANN001
    P_tape,  # noqa: ANN001
    gPinf,  # noqa: ANN001
    gh,  # noqa: ANN001
    gR,  # noqa: ANN001
    gdt,  # noqa: ANN001
    gy,  # noqa: ANN001
    want_dt,  # noqa: ANN001
    want_y,  # noqa: ANN001
):
    """Reverse-mode adjoint of :func:`forward` (gradients of the log-likelihood, seed 1).

    Accumulates into ``gPinf`` (d, d), ``gh`` (d,), ``gR`` ((1,) or (n,)); when asked, writes
    ``gdt`` (n - 1,) and ``gy`` (n,) (0 at NaN positions); overwrites ``A_tape[k - 1]`` with
    ``dL/dA_{k-1}`` (to be mapped to ``dL/dF`` by :func:`expm_adjoint`). With ``gm``, ``gP``
    the adjoints of the filtered ``m_k``, ``P_k`` (``gP`` kept symmetric):

    - update (observed ``k``): ``g_v = (gm.c - v) / s``,
      ``g_s = (v^2/s - 1) / (2 s) - v (gm.c) / s^2 + c^T gP c / s^2``,
      ``g_c = gm v / s - 2 gP c / s``; then ``gm -= g_v h``,
      ``gP += sym(g_c h^T) + g_s h h^T``, ``gR_k += g_s``, ``gy_k = g_v``,
      ``gh += 2 g_s c - g_v m^- + P^- g_c``;
    - predict (``k > 0``, ``D = P_{k-1} - Pinf``, ``A = I`` for a zero step):
      ``gA = gm m_{k-1}^T + 2 gP A D``, ``gPinf += gP - A^T gP A``, ``gm <- A^T gm``,
      ``gP <- A^T gP A``, ``gdt_{k-1} = <gA, F A>`` (``dA/d dt = F A``);
    - ``k = 0``: ``gPinf += gP`` (the prior ``P_0^- = Pinf``).
    """
    n = y.shape[0]
    d = F.shape[0]
    per_step = R.shape[0] == n and n > 1
    gm = np.zeros(d)
    gP = np.zeros((d, d))
    eye = np.zeros((d, d))
    for i in range(d):
        eye[i, i] = 1.0
    A = np.empty((d, d))
    T = np.empty((d, d))
    Dm = np.empty((d, d))
    mf = np.empty(d)
    c = np.empty(d)
    gc = np.empty(d)
    tmp = np.empty(d)
    for k in range(n - 1, -1, -1):
        mp = m_tape[k]
        Pp = P_tape[k]
        yk = y[k]
        if yk == yk:
            s = R[k] if per_step else R[0]
            v = yk
            for i in range(d):
                acc = 0.0
                for j in range(d):
                    acc += Pp[i, j] * h[j]
                c[i] = acc
                s += h[i] * acc
                v -= h[i] * mp[i]
            gmc = 0.0
            cgc = 0.0
            for i in range(d):
                gmc += gm[i] * c[i]
                acc = 0.0
                for j in range(d):
                    acc += gP[i, j] * c[j]
                tmp[i] = acc
                cgc += c[i] * acc
            g_v = (gmc - v) / s
            g_s = 0.5 * (v * v / s - 1.0) / s - v * gmc / (s * s) + cgc / (s * s)
            for i in range(d):
                gc[i] = gm[i] * (v / s) - 2.0 * tmp[i] / s
            for i in range(d):
                acc = 0.0
                for j in range(d):
                    acc += Pp[i, j] * gc[j]
                gh[i] += 2.0 * g_s * c[i] - g_v * mp[i] + acc
            for i in range(d):
                gm[i] -= g_v * h[i]
                for j in range(d):
                    gP[i, j] += 0.5 * (gc[i] * h[j] + h[i] * gc[j]) + g_s * h[i] * h[j]
            if per_step:
                gR[k] += g_s
            else:
                gR[0] += g_s
            if want_y:
                gy[k] = g_v
        elif want_y:
            gy[k] = 0.0
        if k == 0:
            for i in range(d):
                for j in range(d):
                    gPinf[i, j] += gP[i, j]
            break
        tau = dt[k - 1]
        if tau == 0.0:  # repeated time: A = I, Q = 0
            _set(A, eye)
        else:
            _set(A, A_tape[k - 1])
        # filtered moments of step k - 1 from its tape entry (one rank-1 update)
        _setv(mf, m_tape[k - 1])
        _filtered(mf, Dm, P_tape[k - 1], h, y[k - 1], R, k - 1, per_step, c)
        for i in range(d):
            for j in range(d):
                Dm[i, j] -= Pinf[i, j]
        gA = A_tape[k - 1]  # A_{k-1} is no longer needed: its slot receives dL/dA_{k-1}
        _mm(1.0, gP, A, T, False)  # T = gP A
        _mm(2.0, T, Dm, gA, False)  # gA = 2 gP A D + gm mf^T
        for i in range(d):
            for j in range(d):
                gA[i, j] += gm[i] * mf[j]
        if want_dt:
            _mm(1.0, F, A, Dm, False)
            acc = 0.0
            for i in range(d):
                for j in range(d):
                    acc += gA[i, j] * Dm[i, j]
            gdt[k - 1] = acc
        for i in range(d):  # gm <- A^T gm
            acc = 0.0
            for j in range(d):
                acc += A[j, i] * gm[j]
            tmp[i] = acc
        _setv(gm, tmp)
        for i in range(d):  # gP <- A^T gP A (symmetric), gPinf += gP_old - gP_new
            for j in range(i, d):
                acc = 0.0
                for q in range(d):
                    acc += A[q, i] * T[q, j]
                gPinf[i, j] += gP[i, j] - acc
                Dm[i, j] = acc
                if j != i:
                    gPinf[j, i] += gP[j, i] - acc
                    Dm[j, i] = acc
        _set(gP, Dm)

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
summed first), so regular grids cost one ``expm`` per run of equal steps.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_LOG_2PI = math.log(2.0 * math.pi)

# Padé coefficients b_j of degrees 3, 5, 7, 9, 13 (Higham 2005), zero-padded to 14.
_PADE = np.zeros((5, 14))
_PADE[0, :4] = (120.0, 60.0, 12.0, 1.0)
_PADE[1, :6] = (30240.0, 15120.0, 3360.0, 420.0, 30.0, 1.0)
_PADE[2, :8] = (17297280.0, 8648640.0, 1995840.0, 277200.0, 25200.0, 1512.0, 56.0, 1.0)
_PADE[3, :10] = (
    17643225600.0,
    8821612800.0,
    2075673600.0,
    302702400.0,
    30270240.0,
    2162160.0,
    110880.0,
    3960.0,
    90.0,
    1.0,
)
_PADE[4, :14] = (
    64764752532480000.0,
    32382376266240000.0,
    7771770303897600.0,
    1187353796428800.0,
    129060195264000.0,
    10559470521600.0,
    670442572800.0,
    33522128640.0,
    1323241920.0,
    40840800.0,
    960960.0,
    16380.0,
    182.0,
    1.0,
)
_DEGREE = np.array([3, 5, 7, 9, 13])
# ell_m of Al-Mohy & Higham (2009), Table 6.1: largest ||X||_1 for which the degree-m Padé
# approximant of expm and of its Fréchet derivative has backward error <= 2^-53.
_ELL = np.array([1.08e-2, 2.00e-1, 7.83e-1, 1.78e0, 4.74e0])


# ------------------------------------------------------------------------ small dense ops


@njit(cache=True, error_model="numpy")
def _set(dst, src):  # noqa: ANN001, ANN202
    """``dst[...] = src`` for (d, d) arrays (explicit loops: cheaper to compile than slicing)."""
    for i in range(dst.shape[0]):
        for j in range(dst.shape[1]):
            dst[i, j] = src[i, j]


@njit(cache=True, error_model="numpy")
def _zero(dst):  # noqa: ANN001, ANN202
    """``dst[...] = 0`` for a (d, d) array."""
    for i in range(dst.shape[0]):
        for j in range(dst.shape[1]):
            dst[i, j] = 0.0


@njit(cache=True, error_model="numpy")
def _setv(dst, src):  # noqa: ANN001, ANN202
    """``dst[...] = src`` for (d,) arrays."""
    for i in range(dst.shape[0]):
        dst[i] = src[i]


@njit(cache=True, error_model="numpy")
def _mm(alpha, A, B, out, accumulate):  # noqa: ANN001, ANN202
    """``out = alpha A @ B`` (or ``out += ...`` when ``accumulate``); ``out`` must not alias."""
    d = A.shape[0]
    for i in range(d):
        for j in range(d):
            acc = 0.0
            for k in range(d):
                acc += A[i, k] * B[k, j]
            if accumulate:
                out[i, j] += alpha * acc
            else:
                out[i, j] = alpha * acc


@njit(cache=True, error_model="numpy")
def _lu_factor(M, piv):  # noqa: ANN001, ANN202
    """In-place LU factorisation with partial pivoting (Doolittle, unit lower factor)."""
    d = M.shape[0]
    for k in range(d):
        p = k
        big = abs(M[k, k])
        for i in range(k + 1, d):
            if abs(M[i, k]) > big:
                big = abs(M[i, k])
                p = i
        piv[k] = p
        if p != k:
            for j in range(d):
                tmp = M[k, j]
                M[k, j] = M[p, j]
                M[p, j] = tmp
        inv = 1.0 / M[k, k]
        for i in range(k + 1, d):
            M[i, k] *= inv
            f = M[i, k]
            for j in range(k + 1, d):
                M[i, j] -= f * M[k, j]


@njit(cache=True, error_model="numpy")
def _lu_solve(LU, piv, B):  # noqa: ANN001, ANN202
    """Overwrite ``B`` (d, d) with ``M^{-1} B`` from :func:`_lu_factor`'s output."""
    d = LU.shape[0]
    for k in range(d):
        p = piv[k]
        if p != k:
            for j in range(d):
                tmp = B[k, j]
                B[k, j] = B[p, j]
                B[p, j] = tmp
    for j in range(d):
        for i in range(d):
            acc = B[i, j]
            for k in range(i):
                acc -= LU[i, k] * B[k, j]
            B[i, j] = acc
        for i in range(d - 1, -1, -1):
            acc = B[i, j]
            for k in range(i + 1, d):
                acc -= LU[i, k] * B[k, j]
            B[i, j] = acc / LU[i, i]


@njit(cache=True, error_model="numpy")
def _norm1_both(F):  # noqa: ANN001, ANN202
    """``max(||F||_1, ||F||_inf)``: bounds ``||F||_1`` and ``||F^T||_1`` at once."""
    d = F.shape[0]
    best = 0.0
    for j in range(d):
        col = 0.0
        row = 0.0
        for i in range(d):
            col += abs(F[i, j])
            row += abs(F[j, i])
        best = max(best, col, row)
    return best


@njit(cache=True, error_model="numpy")
def normalised_powers(F, norm):  # noqa: ANN001, ANN201
    """``P[j] = (F / norm)^j`` for ``j = 0, ..., 13``, shape (14, d, d).

    Every ``X = tau F`` used by the Padé approximants is a scalar multiple of ``F``, so its
    powers are ``(tau norm)^j P[j]``: computed once per call instead of once per step.
    """
    d = F.shape[0]
    P = np.zeros((14, d, d))
    for i in range(d):
        P[0, i, i] = 1.0
        for j in range(d):
            P[1, i, j] = F[i, j] / norm
    for p in range(2, 14):
        _mm(1.0, P[p - 1], P[1], P[p], False)
    return P


@njit(cache=True, error_model="numpy")
def _plan(xnorm):  # noqa: ANN001, ANN202
    """Padé degree index and number of squarings for ``||X||_1 <= xnorm`` (Al-Mohy & Higham)."""
    for i in range(4):
        if xnorm <= _ELL[i]:
            return i, 0
    s = int(math.ceil(math.log2(xnorm / _ELL[4])))
    return 4, max(s, 0)


@njit(cache=True, error_model="numpy", inline="always")
def expm_scaled(P, tau_norm, out, work, piv):  # noqa: ANN001, ANN201
    """``out = expm(X)`` for ``X = tau_norm * P[1]`` by scaling, Padé and squaring.

    ``work`` has shape (>= 3, d, d); ``piv`` shape (d,).
    """
    idx, s = _plan(tau_norm)
    m = _DEGREE[idx]
    x = tau_norm * 0.5**s
    d = out.shape[0]
    U = work[0]
    V = work[1]
    _zero(U)
    _zero(V)
    xp = 1.0
    for j in range(m + 1):  # U = sum_odd b_j X^j, V = sum_even b_j X^j
        c = _PADE[idx, j] * xp
        if j % 2 == 1:
            for a in range(d):
                for b in range(d):
                    U[a, b] += c * P[j, a, b]
        else:
            for a in range(d):
                for b in range(d):
                    V[a, b] += c * P[j, a, b]
        xp *= x
    for a in range(d):  # r_m(X) = (V - U)^{-1} (V + U)
        for b in range(d):
            out[a, b] = V[a, b] + U[a, b]
            V[a, b] -= U[a, b]
    _lu_factor(V, piv)
    _lu_solve(V, piv, out)
    tmp = work[2]
    for _ in range(s):
        _mm(1.0, out, out, tmp, False)
        _set(out, tmp)


@njit(cache=True, error_model="numpy", inline="always")
def expm_frechet_scaled(P, tau_norm, E, L, work, piv):  # noqa: ANN001, ANN201
    """``L = L_expm(X, E)`` (Fréchet derivative of ``expm`` at ``X = tau_norm * P[1]``).

    Scaling-Padé-squaring (Al-Mohy & Higham 2009, Algorithm 6.4; ``scipy.linalg.expm_frechet``)
    with the powers of ``X`` taken from ``P``. With ``X_s = 2^-s X``, ``E_s = 2^-s E`` and the
    degree-m Padé approximant ``r_m = (V - U)^{-1} (V + U)``, ``U = X W = sum_odd b_j X_s^j``,
    ``V = sum_even b_j X_s^j``, the Fréchet derivatives of the even powers follow
    ``M_2 = X_s E_s + E_s X_s``, ``M_{2i+2} = X_s^2 M_{2i} + M_2 X_s^{2i}``, so that
    ``L_U = X_s sum_odd b_j M_{j-1} + E_s W`` and ``L_V = sum_even b_j M_j``; then
    ``L = (V - U)^{-1} (L_U + L_V + (L_U - L_V) r_m)`` and ``s`` squarings
    ``L <- r L + L r``, ``r <- r^2``. ``work`` has shape (>= 10, d, d).
    """
    idx, s = _plan(tau_norm)
    m = _DEGREE[idx]
    x = tau_norm * 0.5**s
    esc = 0.5**s
    d = L.shape[0]
    b = _PADE[idx]
    U, V, W, Es = work[0], work[1], work[2], work[3]
    M2, Mj, Mn, Lu = work[4], work[5], work[6], work[7]
    Lv, T = work[8], work[9]
    for a in range(d):
        for c in range(d):
            Es[a, c] = esc * E[a, c]
    # U = sum_odd b_j X^j, W = sum_odd b_j X^(j-1) (so U = X W), V = sum_even b_j X^j
    _zero(U)
    _zero(V)
    _zero(W)
    xp = 1.0  # x^j
    xq = 1.0  # x^(j - 1) for odd j
    for j in range(m + 1):
        c = b[j] * xp
        if j % 2 == 1:
            cw = b[j] * xq
            for a in range(d):
                for e in range(d):
                    U[a, e] += c * P[j, a, e]
                    W[a, e] += cw * P[j - 1, a, e]
        else:
            for a in range(d):
                for e in range(d):
                    V[a, e] += c * P[j, a, e]
            xq = xp
        xp *= x
    # even-power Fréchet derivatives M_2i, accumulated into T = sum_odd b_j M_(j-1), Lv
    _mm(x, P[1], Es, M2, False)
    _mm(x, Es, P[1], M2, True)
    _set(Mj, M2)
    _zero(T)
    _zero(Lv)
    x2 = x * x
    xe = x2  # x^(2i)
    for i in range(1, (m - 1) // 2 + 1):  # Mj = M_2i
        for a in range(d):
            for e in range(d):
                Lv[a, e] += b[2 * i] * Mj[a, e]
                T[a, e] += b[2 * i + 1] * Mj[a, e]
        if 2 * i + 2 <= m:
            _mm(x2, P[2], Mj, Mn, False)
            _mm(xe, M2, P[2 * i], Mn, True)
            _set(Mj, Mn)
            xe *= x2
    _mm(x, P[1], T, Lu, False)
    _mm(1.0, Es, W, Lu, True)
    # factor V - U once; R = (V - U)^{-1} (V + U), L = (V - U)^{-1} (Lu + Lv + (Lu - Lv) R)
    R = Mn
    for a in range(d):
        for e in range(d):
            R[a, e] = V[a, e] + U[a, e]
            V[a, e] -= U[a, e]
            T[a, e] = Lu[a, e] - Lv[a, e]
            L[a, e] = Lu[a, e] + Lv[a, e]
    _lu_factor(V, piv)
    _lu_solve(V, piv, R)
    _mm(1.0, T, R, L, True)
    _lu_solve(V, piv, L)
    for _ in range(s):  # L <- R L + L R, R <- R^2
        _mm(1.0, R, L, T, False)
        _mm(1.0, L, R, T, True)
        _set(L, T)
        _mm(1.0, R, R, T, False)
        _set(R, T)


# --------------------------------------------------------------------------- filter pass


@njit(cache=True, error_model="numpy")
def forward(F, Pinf, h, R, dt, y, store, A_tape, m_tape, P_tape):  # noqa: ANN001, ANN201
    """Kalman filter log marginal likelihood; optionally records the tape.

    Parameters
    ----------
    F, Pinf : (d, d); h : (d,); R : (1,) or (n,) noise variances; dt : (n - 1,); y : (n,)
        (NaN = missing); store : bool; A_tape (n - 1, d, d), m_tape (n, d), P_tape (n, d, d)
        (any shape when ``store`` is False).

    Returns
    -------
    float
        ``sum_k log N(y_k; h^T m_k^-, h^T P_k^- h + R_k)`` over observed ``k``.
    """
    n = y.shape[0]
    d = F.shape[0]
    per_step = R.shape[0] == n and n > 1
    norm = _norm1_both(F)
    if norm == 0.0:
        norm = 1.0
    P_pow = normalised_powers(F, norm)
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
                    expm_scaled(P_pow, tau * norm, A, work, piv)
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


@njit(cache=True, error_model="numpy")
def expm_adjoint(F, dt, G, gF):  # noqa: ANN001, ANN201
    """``gF += sum_k dt_k L_expm(dt_k F^T, G_k)``: ``dL/dF`` from ``dL/dA_k``, ``A_k = e^{F dt_k}``.

    The adjoint of the Fréchet derivative ``E -> L(X, E)`` is ``G -> L(X^T, G)``, and
    ``dA_k = L(F dt_k, dF dt_k)``. Consecutive equal steps share one evaluation (their ``G_k``
    are summed first); zero steps contribute nothing. ``G`` has shape (n - 1, d, d).
    """
    d = F.shape[0]
    m = dt.shape[0]
    norm = _norm1_both(F)
    if norm == 0.0:
        norm = 1.0
    FT = np.empty((d, d))
    for i in range(d):
        for j in range(d):
            FT[i, j] = F[j, i]
    P_pow_T = normalised_powers(FT, norm)
    work = np.empty((16, d, d))
    piv = np.empty(d, dtype=np.int64)
    G_run = np.zeros((d, d))
    L = np.empty((d, d))
    k = 0
    while k < m:
        tau = dt[k]
        if tau == 0.0:
            k += 1
            continue
        _set(G_run, G[k])
        k += 1
        while k < m and dt[k] == tau:
            for i in range(d):
                for j in range(d):
                    G_run[i, j] += G[k, i, j]
            k += 1
        expm_frechet_scaled(P_pow_T, tau * norm, G_run, L, work, piv)
        for i in range(d):
            for j in range(d):
                gF[i, j] += tau * L[i, j]

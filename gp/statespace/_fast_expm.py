"""Compiled (numba) matrix exponential, its Fréchet derivative and their adjoint.

Private helper of :mod:`gp.statespace._fast_kernels` (the compiled Kalman filter and its
adjoint): small dense operations, LU solves, ``expm`` by scaling-Padé-squaring (Higham 2005)
and its Fréchet derivative ``L(X, E)`` (Al-Mohy & Higham 2009, as
``scipy.linalg.expm_frechet``), on float64 C-contiguous arrays. Importing it imports numba.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

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


# ----------------------------------------------------- block-diagonal F (sums of kernels)


@njit(cache=True, error_model="numpy")
def block_powers(F, bounds):  # noqa: ANN001, ANN201
    """Normalised powers and norms of the diagonal blocks of ``F``.

    ``bounds`` (nb + 1,) are the block offsets. Returns ``P`` (nb, 14, dmax, dmax) with
    ``P[b, :, :d_b, :d_b] = normalised_powers(F_b, norm_b)`` and ``norms`` (nb,). Each block
    is later scaled by its own norm: one scaling-and-squaring over the whole of ``F`` would
    scale a slow block by the norm of the fastest one and square away its accuracy.
    """
    nb = bounds.shape[0] - 1
    dmax = 0
    for b in range(nb):
        dmax = max(dmax, bounds[b + 1] - bounds[b])
    P = np.zeros((nb, 14, dmax, dmax))
    norms = np.empty(nb)
    for b in range(nb):
        s = bounds[b]
        db = bounds[b + 1] - s
        Fb = np.empty((db, db))
        for i in range(db):
            for j in range(db):
                Fb[i, j] = F[s + i, s + j]
        norm = _norm1_both(Fb)
        if norm == 0.0:
            norm = 1.0
        norms[b] = norm
        P[b, :, :db, :db] = normalised_powers(Fb, norm)
    return P, norms


@njit(cache=True, error_model="numpy")
def expm_blocks(P, norms, bounds, tau, out, work, piv):  # noqa: ANN001, ANN201
    """``out = expm(tau F)`` for block-diagonal ``F`` from :func:`block_powers`, block by block
    (off-block entries are zero). ``work`` has shape (>= 3, d, d); ``piv`` shape (d,)."""
    _zero(out)
    for b in range(norms.shape[0]):
        s = bounds[b]
        e = bounds[b + 1]
        db = e - s
        expm_scaled(P[b, :, :db, :db], tau * norms[b], out[s:e, s:e], work[:, :db, :db], piv[:db])


@njit(cache=True, error_model="numpy")
def expm_adjoint_blocks(F, dt, G, gF, bounds):  # noqa: ANN001, ANN201
    """:func:`expm_adjoint` for block-diagonal ``F``, one diagonal block at a time
    (``dL/dF`` off the blocks is left untouched: those entries are structural zeros)."""
    for b in range(bounds.shape[0] - 1):
        s = bounds[b]
        e = bounds[b + 1]
        db = e - s
        Fb = np.empty((db, db))
        gFb = np.zeros((db, db))
        for i in range(db):
            for j in range(db):
                Fb[i, j] = F[s + i, s + j]
        expm_adjoint(Fb, dt, np.ascontiguousarray(G[:, s:e, s:e]), gFb)
        for i in range(db):
            for j in range(db):
                gF[s + i, s + j] += gFb[i, j]

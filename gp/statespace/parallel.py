"""Parallel-in-time Kalman filter and RTS smoother (Särkkä & García-Fernández, IEEE TAC 2021).

Same model as :mod:`.kalman` (``k = 0, ..., n-1``)::

    x_0 ~ N(0, Pinf),   x_{k+1} = A_k x_k + q_k,  q_k ~ N(0, Q_k),
    y_k = H x_k + r_k,  r_k ~ N(0, R_k)          (y_k = NaN: not observed)

Filtering and smoothing are written as prefix / suffix scans of associative operators on
per-step *elements*, evaluated by :func:`associative_scan` in ``O(log n)`` sequential depth
(``2 ceil(log2 n)`` batched operator calls) and ``O(n d^3)`` work. Every operation is a batched,
differentiable torch op; the only Python loop is over the ``O(log n)`` levels of the scan.

Filtering element ``a_k = (A, b, C, eta, J)`` represents the conditional density
``p(x_k | x_{k-1}, y_k) = N(x_k; A x_{k-1} + b, C)`` together with the likelihood of ``y_k``
as a function of ``x_{k-1}`` in information form, ``p(y_k | x_{k-1}) ∝ N_I(x_{k-1}; eta, J)``.
This formulation never inverts ``Q`` (only ``S = H Q H^T + R > 0`` and ``I + C J``), so
repeated timestamps (``A = I``, ``Q = 0``) are handled exactly.

Smoothing element ``e_k = (E, g, L)`` represents ``p(x_k | x_{k+1}, y_{0:k}) =
N(x_k; E x_{k+1} + g, L)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from .kalman import FilterResult, _filter_inputs, smoother_gain

__all__ = [
    "associative_scan",
    "filtering_elements",
    "filtering_operator",
    "parallel_kalman_filter",
    "parallel_rts_smoother",
    "resolve_method",
    "smoothing_elements",
    "smoothing_operator",
]

_LOG_2PI = math.log(2.0 * math.pi)
_METHODS = ("sequential", "parallel", "fast", "auto")

Elements = tuple[Tensor, ...]


def resolve_method(
    method: str, device: torch.device | str | None = None
) -> Literal["sequential", "parallel"]:
    """Choose the filtering / smoothing algorithm.

    Parameters
    ----------
    method : {"sequential", "parallel", "fast", "auto"}
        ``"auto"`` and ``"fast"`` pick ``"parallel"``: the associative scan does more
        arithmetic than the loop but far fewer (batched) torch operations, which makes it the
        faster torch path on CPU as well as CUDA. ``"fast"`` names
        the compiled log-marginal-likelihood path of :class:`gp.statespace.StateSpaceGP`,
        which has no smoother of its own.
    device : torch.device or str, optional
        Device the computation runs on; default CPU (kept for callers that dispatch on it).

    Returns
    -------
    {"sequential", "parallel"}
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    torch.device("cpu" if device is None else device)  # validates the device
    return "sequential" if method == "sequential" else "parallel"


# ----------------------------------------------------------------------------------- scan


def _interleave(even: Elements, odd: Elements) -> Elements:
    """Merge ``even`` (positions 0, 2, ...) and ``odd`` (1, 3, ...) along dim 0."""
    out = []
    for e, o in zip(even, odd, strict=True):
        m = o.shape[0]
        pairs = torch.stack([e[:m], o], dim=1).reshape(2 * m, *o.shape[1:])
        out.append(torch.cat([pairs, e[m:]]) if e.shape[0] > m else pairs)
    return tuple(out)


def _scan(op: Callable[[Elements, Elements], Elements], elems: Elements) -> Elements:
    n = elems[0].shape[0]
    if n < 2:
        return elems
    # combine neighbouring pairs (0,1), (2,3), ...: the scan of these gives the odd prefixes
    reduced = op(tuple(x[0:-1:2] for x in elems), tuple(x[1::2] for x in elems))
    odd = _scan(op, reduced)  # prefixes ending at 1, 3, 5, ...
    # even prefixes 2, 4, ...: previous odd prefix combined with the element itself
    m = (n - 1) // 2  # number of even positions >= 2
    even_tail = op(tuple(x[:m] for x in odd), tuple(x[2::2] for x in elems))
    even = tuple(torch.cat([x[:1], t]) for x, t in zip(elems, even_tail, strict=True))
    return _interleave(even, odd)


def associative_scan(
    op: Callable[[Elements, Elements], Elements],
    elems: Sequence[Tensor],
    reverse: bool = False,
) -> Elements:
    """Inclusive scan of an associative operator over dim 0 of a tuple of tensors.

    Returns ``s_k = a_0 ⊗ a_1 ⊗ ... ⊗ a_k`` (or, with ``reverse=True``, the suffix scan
    ``s_k = a_k ⊗ a_{k+1} ⊗ ... ⊗ a_{n-1}``) for all ``k`` at once. Odd–even (Blelloch-type)
    recursion: pairs are combined, the half-length sequence is scanned recursively, and the
    even positions are filled in — ``O(n)`` operator applications in ``2 ceil(log2 n)``
    batched calls of ``op``, each vectorised over all elements of its level. Any ``n >= 0``.

    Parameters
    ----------
    op : callable
        ``op(earlier, later) -> combined``, associative, acting elementwise along dim 0 of
        tuples of tensors (leading dims must broadcast identically).
    elems : sequence of Tensor, each of shape (n, ...)
        The elements, one row per time step.
    reverse : bool, default False
        Suffix instead of prefix scan (``op`` is still called as ``op(earlier, later)``).

    Returns
    -------
    tuple of Tensor
        Same shapes as ``elems``.
    """
    elems = tuple(elems)
    n = elems[0].shape[0]
    if any(x.shape[0] != n for x in elems):
        raise ValueError("all elements must have the same leading (time) dimension")
    if not reverse:
        return _scan(op, elems)
    flipped = tuple(x.flip(0) for x in elems)
    out = _scan(lambda later, earlier: op(earlier, later), flipped)
    return tuple(x.flip(0) for x in out)


# ------------------------------------------------------------------------------ filtering


def _sym(M: Tensor) -> Tensor:
    return 0.5 * (M + M.mT)


def filtering_operator(ei: Elements, ej: Elements) -> Elements:
    """Associative filtering combination ``a_ij = a_i ⊗ a_j`` (``i`` earlier than ``j``).

    With ``M = I + C_i J_j`` (so ``I + J_j C_i = M^T``),
    ``W = A_j M^{-1}`` and ``V = A_i^T M^{-T}``:

    .. math::

        A_{ij} &= W A_i, \\quad b_{ij} = W (b_i + C_i \\eta_j) + b_j, \\quad
        C_{ij} = W C_i A_j^\\top + C_j, \\\\
        \\eta_{ij} &= V (\\eta_j - J_j b_i) + \\eta_i, \\quad J_{ij} = V J_j A_i + J_i.

    Inverses are linear solves; ``C`` and ``J`` are symmetrised.

    Parameters
    ----------
    ei, ej : tuple (A, b, C, eta, J)
        Shapes (..., d, d), (..., d), (..., d, d), (..., d), (..., d, d).

    Returns
    -------
    tuple (A, b, C, eta, J)
    """
    Ai, bi, Ci, etai, Ji = ei
    Aj, bj, Cj, etaj, Jj = ej
    eye = torch.eye(Ai.shape[-1], dtype=Ai.dtype, device=Ai.device)
    M = eye + Ci @ Jj
    W = torch.linalg.solve(M.mT, Aj.mT).mT  # A_j M^{-1}
    V = torch.linalg.solve(M, Ai).mT  # A_i^T M^{-T}
    A = W @ Ai
    b = (W @ (bi + (Ci @ etaj.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)).squeeze(-1) + bj
    C = _sym(W @ Ci @ Aj.mT + Cj)
    eta = (V @ (etaj - (Jj @ bi.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)).squeeze(-1) + etai
    J = _sym(V @ Jj @ Ai + Ji)
    return A, b, C, eta, J


def filtering_elements(
    A: Tensor, Q: Tensor, H: Tensor, Pinf: Tensor, y: Tensor, noise: Tensor
) -> Elements:
    """Per-step filtering elements ``a_k = (A_k, b_k, C_k, eta_k, J_k)``, ``k = 0..n-1``.

    Step ``k >= 1`` with transition ``F = A_{k-1}``, ``Q = Q_{k-1}`` and observed ``y_k``:

    .. math::

        S = h^\\top Q h + R_k, \\; K = Q h / S, \\; A_k = (I - K h^\\top) F, \\;
        b_k = K y_k, \\; C_k = Q - S K K^\\top, \\;
        \\eta_k = F^\\top h\\, y_k / S, \\; J_k = F^\\top h h^\\top F / S.

    Missing ``y_k`` (NaN): ``(F, 0, Q, 0, 0)`` (prediction only). ``Q = 0`` (zero step) is
    fine: ``S = R_k > 0``. First step (prior ``N(0, Pinf)``): ``A_0 = 0``,
    ``(b_0, C_0)`` = the Kalman update of the prior with ``y_0`` (or ``(0, Pinf)`` if missing),
    ``eta_0 = 0``, ``J_0 = 0``.

    Parameters
    ----------
    A, Q : Tensor, shape (n - 1, d, d) or (..., n - 1, d, d)
    H : Tensor, shape (1, d)
    Pinf : Tensor, shape (d, d)
    y : Tensor, shape (n,) or (..., n)
        One row per series; NaN = missing.
    noise : Tensor, shape () or broadcastable to (..., n)

    Returns
    -------
    tuple (A, b, C, eta, J)
        Shapes (..., n, d, d), (..., n, d), (..., n, d, d), (..., n, d), (..., n, d, d), with
        ``...`` the broadcast batch shape of ``y``, ``A`` and ``Q``.
    """
    n, d, h, R = _filter_inputs(A, Q, H, Pinf, y, noise)
    batch = torch.broadcast_shapes(y.shape[:-1], A.shape[:-3], Q.shape[:-3])
    obs = ~torch.isnan(y)
    y0 = torch.where(obs, y, torch.zeros_like(y))  # no NaN anywhere on the graph
    obs_f = obs.to(Pinf.dtype)

    # first step: update of the prior N(0, Pinf) (no-op when y_0 is missing)
    Ph = Pinf @ h
    S0 = h @ Ph + R[..., 0]  # (...,)
    K0 = Ph * (obs_f[..., 0] / S0).unsqueeze(-1)
    b_first = (K0 * y0[..., :1]).expand(*batch, d)
    C_first = _sym(Pinf - S0[..., None, None] * (K0.unsqueeze(-1) * K0.unsqueeze(-2)))
    C_first = C_first.expand(*batch, d, d)
    zeros_dd = Pinf.new_zeros(*batch, 1, d, d)
    zeros_d = Pinf.new_zeros(*batch, 1, d)

    # remaining steps, batched over time and series
    o, yk, Rk = obs_f[..., 1:], y0[..., 1:], R[..., 1:]
    Qh = Q @ h  # (..., n-1, d)
    S = Qh @ h + Rk  # (..., n-1)
    w = o / S  # 1/S where observed, 0 where missing
    K = Qh * w.unsqueeze(-1)
    hF = h @ A  # (..., n-1, d): h^T F
    A_el = A - K.unsqueeze(-1) * hF.unsqueeze(-2)
    b_el = K * yk.unsqueeze(-1)
    C_el = _sym(Q - (S * o)[..., None, None] * (K.unsqueeze(-1) * K.unsqueeze(-2)))
    eta_el = hF * (yk * w).unsqueeze(-1)
    J_el = w[..., None, None] * (hF.unsqueeze(-1) * hF.unsqueeze(-2))

    def join(first: Tensor, rest: Tensor, event: int) -> Tensor:
        rest = rest.expand(*batch, n - 1, *rest.shape[rest.dim() - event :])
        return torch.cat([first, rest], dim=-1 - event)

    return (
        join(zeros_dd, A_el, 2),
        join(b_first.unsqueeze(-2), b_el, 1),
        join(C_first.unsqueeze(-3), C_el, 2),
        join(zeros_d, eta_el, 1),
        join(zeros_dd, J_el, 2),
    )


def _time_first(elems: Elements, events: Sequence[int]) -> Elements:
    """Move the time dimension (just before the ``event`` dims) of each element to dim 0."""
    return tuple(x.movedim(-1 - e, 0) for x, e in zip(elems, events, strict=True))


def _time_back(elems: Elements, events: Sequence[int]) -> Elements:
    """Inverse of :func:`_time_first`."""
    return tuple(x.movedim(0, -1 - e) for x, e in zip(elems, events, strict=True))


def parallel_kalman_filter(
    A: Tensor,
    Q: Tensor,
    H: Tensor,
    Pinf: Tensor,
    y: Tensor,
    noise: Tensor,
    zero_step: Tensor | None = None,
) -> FilterResult:
    """Kalman filter by a parallel prefix scan; same inputs and outputs as ``kalman_filter``.

    The inclusive scan of :func:`filtering_operator` over :func:`filtering_elements` gives
    the filtering moments ``(m_k, P_k) = (b_{0:k}, C_{0:k})``. The predictive moments follow
    in one batched step, ``m_k^- = A_{k-1} m_{k-1}``, ``P_k^- = A_{k-1} P_{k-1} A_{k-1}^T +
    Q_{k-1}`` (``0``, ``Pinf`` at ``k = 0``), and the log marginal likelihood is

    .. math::

        \\log p(y) = \\sum_{k\\,\\mathrm{observed}} \\log N(y_k;\\; h^\\top m_k^-,\\;
        h^\\top P_k^- h + R_k).

    A batch of series (leading dims ``...``) is scanned at once: the scan's operator calls
    are vectorised over the time elements of a level and over the series.

    Parameters
    ----------
    A, Q : Tensor, shape (n - 1, d, d) or (..., n - 1, d, d)
    H : Tensor, shape (1, d)
    Pinf : Tensor, shape (d, d)
    y : Tensor, shape (n,) or (..., n)
        NaN = missing.
    noise : Tensor, shape () or broadcastable to (..., n)
    zero_step : Tensor (bool), shape (n - 1,) or (..., n - 1), optional
        Accepted for API parity with ``kalman_filter``; not needed (the element algebra
        handles ``A = I``, ``Q = 0`` directly).

    Returns
    -------
    FilterResult
        Moments of shape (..., n, d) / (..., n, d, d); ``log_likelihood`` of shape (...).
    """
    n, d, h, R = _filter_inputs(A, Q, H, Pinf, y, noise)
    events = (2, 1, 2, 1, 2)
    elems = _time_first(filtering_elements(A, Q, H, Pinf, y, noise), events)
    _, m, P, _, _ = _time_back(associative_scan(filtering_operator, elems), events)
    batch = m.shape[:-2]
    pred_mean = torch.cat(
        [m.new_zeros(*batch, 1, d), (A @ m[..., :-1, :].unsqueeze(-1)).squeeze(-1)], dim=-2
    )
    pred_P = _sym(A @ P[..., :-1, :, :] @ A.mT + Q)
    pred_cov = torch.cat([Pinf.expand(*batch, 1, d, d), pred_P], dim=-3)
    obs = ~torch.isnan(y)
    v = torch.where(obs, y, torch.zeros_like(y)) - pred_mean @ h
    S = (pred_cov @ h) @ h + R
    terms = -0.5 * (v.pow(2) / S + S.log() + _LOG_2PI)
    # zero where missing (log p(empty) = 0), kept on the graph of the parameters
    log_lik = torch.where(obs, terms, torch.zeros_like(terms)).sum(-1)
    return FilterResult(
        mean=m, cov=P, pred_mean=pred_mean, pred_cov=pred_cov, log_likelihood=log_lik
    )


# ------------------------------------------------------------------------------ smoothing


def smoothing_operator(ei: Elements, ej: Elements) -> Elements:
    """Associative smoothing combination (``i`` earlier absorbs the later ``j``).

    .. math::

        E = E_i E_j, \\quad g = E_i g_j + g_i, \\quad L = E_i L_j E_i^\\top + L_i.

    Parameters
    ----------
    ei, ej : tuple (E, g, L)
        Shapes (..., d, d), (..., d), (..., d, d).

    Returns
    -------
    tuple (E, g, L)
    """
    Ei, gi, Li = ei
    Ej, gj, Lj = ej
    E = Ei @ Ej
    g = (Ei @ gj.unsqueeze(-1)).squeeze(-1) + gi
    L = _sym(Ei @ Lj @ Ei.mT + Li)
    return E, g, L


def smoothing_elements(
    A: Tensor, filtered: FilterResult, zero_step: Tensor | None = None
) -> Elements:
    """Per-step smoothing elements ``e_k = (E_k, g_k, L_k)``, ``k = 0..n-1``.

    For ``k < n - 1``, with ``P_{k+1}^- = A_k P_k A_k^T + Q_k`` from the filter,

    .. math::

        E_k = P_k A_k^\\top (P_{k+1}^-)^{-1}, \\quad g_k = m_k - E_k A_k m_k, \\quad
        L_k = P_k - E_k A_k P_k,

    and ``e_{n-1} = (0, m_{n-1}, P_{n-1})``. Zero steps give exactly ``(I, 0, 0)``. The
    element is the backward conditional ``p(x_k | x_{k+1}, y_{0:k}) = N(E_k x_{k+1} + g_k,
    L_k)``, also used for backward sampling (:mod:`.ffbs`).

    Parameters
    ----------
    A : Tensor, shape (n - 1, d, d) or (..., n - 1, d, d)
    filtered : FilterResult
        Output of :func:`parallel_kalman_filter` (or ``kalman_filter``) on the same model.
    zero_step : Tensor (bool), shape (n - 1,) or (..., n - 1), optional

    Returns
    -------
    tuple (E, g, L)
        Shapes (..., n, d, d), (..., n, d), (..., n, d, d).
    """
    m, P = filtered.mean, filtered.cov
    n, d = m.shape[-2:]
    if A.dim() < 3 or A.shape[-3] != max(n - 1, 0):
        raise ValueError(f"A must have {n - 1} transition matrices, got shape {tuple(A.shape)}")
    Pk, mk = P[..., :-1, :, :], m[..., :-1, :]
    E = smoother_gain(filtered.pred_cov[..., 1:, :, :], A @ Pk)  # P_k A^T (P^-)^{-1}
    EA = E @ A
    g = mk - (EA @ mk.unsqueeze(-1)).squeeze(-1)
    L = _sym(Pk - EA @ Pk)
    if zero_step is not None and n > 1:
        z = zero_step[..., None, None]
        eye = torch.eye(d, dtype=m.dtype, device=m.device)
        E = torch.where(z, eye, E)
        g = torch.where(z[..., 0], torch.zeros_like(g), g)
        L = torch.where(z, torch.zeros_like(L), L)
    batch = torch.broadcast_shapes(E.shape[:-3], m.shape[:-2])
    E, g = E.expand(*batch, n - 1, d, d), g.expand(*batch, n - 1, d)
    L = L.expand(*batch, n - 1, d, d)
    return (
        torch.cat([E, m.new_zeros(*batch, 1, d, d)], dim=-3),
        torch.cat([g, m[..., -1:, :].expand(*batch, 1, d)], dim=-2),
        torch.cat([L, P[..., -1:, :, :].expand(*batch, 1, d, d)], dim=-3),
    )


def parallel_rts_smoother(
    A: Tensor, filtered: FilterResult, zero_step: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """RTS smoother by a parallel suffix scan; same inputs and outputs as ``rts_smoother``.

    The reverse inclusive scan of :func:`smoothing_operator` over
    :func:`smoothing_elements` gives ``(E, g, L) = (0, m^s_k, P^s_k)`` at every ``k``.

    Parameters
    ----------
    A : Tensor, shape (n - 1, d, d) or (..., n - 1, d, d)
    filtered : FilterResult
    zero_step : Tensor (bool), shape (n - 1,) or (..., n - 1), optional

    Returns
    -------
    mean : Tensor, shape (..., n, d)
    cov : Tensor, shape (..., n, d, d)
    """
    events = (2, 1, 2)
    elems = _time_first(smoothing_elements(A, filtered, zero_step), events)
    _, mean, cov = _time_back(associative_scan(smoothing_operator, elems, reverse=True), events)
    return mean, cov

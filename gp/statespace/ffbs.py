"""Joint posterior samples by forward-filtering backward-sampling (FFBS) in O(n).

After the Kalman filter, the smoothing posterior of the states factorises backwards
(Frühwirth-Schnatter 1994; Carter & Kohn 1994)::

    p(x_{0:N-1} | y) = p(x_{N-1} | y) prod_k p(x_k | x_{k+1}, y_{0:k}),
    p(x_k | x_{k+1}, y_{0:k}) = N(x_k; E_k x_{k+1} + g_k, L_k)

with the smoothing elements ``(E_k, g_k, L_k)`` of :func:`gp.statespace.parallel.
smoothing_elements` (``E_{N-1} = 0``, ``g_{N-1} = m_{N-1}``, ``L_{N-1} = P_{N-1}``). A joint
draw is ``x_k = E_k x_{k+1} + g_k + U_k z_k`` with ``U_k U_k^T = L_k`` and ``z_k ~ N(0, I)``:
an affine backward recursion, run either as a loop or as a suffix scan of affine maps
(``(E_i, c_i) ⊗ (E_j, c_j) = (E_i E_j, E_i c_j + c_i)``, the smoothing operator without its
covariance part). :class:`StateSpacePosterior` packages this as a :class:`GaussianPosterior`
whose ``rsample`` returns jointly correlated draws of ``f = h^T x`` at the prediction times.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bdl.core.linalg import psd_safe_cholesky
from bdl.core.posterior import GaussianPosterior
from bdl.core.posterior_base import as_size

from .parallel import associative_scan

__all__ = ["StateSpacePosterior", "backward_sample", "psd_factor"]

#: jitter ladder for :func:`psd_factor`, in units of ``d * eps * scale``
_JITTER_LADDER = (1e2, 1e4, 1e6)


def psd_factor(L: Tensor, scale: Tensor | float) -> Tensor:
    """A factor ``U`` with ``U U^T ≈ L`` for symmetric PSD, possibly singular ``L``.

    Backward conditionals are often singular (``L = 0`` for repeated times and for
    undamped resonators such as the cosine kernel), so a plain Cholesky fails. This adds a
    jitter ``diag(delta)`` with ``delta = c d eps scale`` (``c = 1e2``, raised to ``1e4``,
    ``1e6`` only if needed; ``eps`` the dtype's resolution and ``scale`` the size of the
    prior variance of each state), which changes the sampled covariance by ``O(eps)`` relative — the
    accuracy to which ``L`` is known anyway. Exactly-zero matrices get an exactly-zero
    factor (repeated times give identical draws).

    Parameters
    ----------
    L : Tensor, shape (..., d, d)
    scale : Tensor, shape () or (d,), or float
        Variance scale per state, e.g. the diagonal of the stationary covariance. Per-state
        scales matter: the components of a sum can have output scales many orders of
        magnitude apart, and one common scale (the maximum) would swamp the small ones.
        Scales below ``eps`` times the largest (e.g. a component with output scale 0) are
        raised to that.

    Returns
    -------
    Tensor, shape (..., d, d)
        Lower-triangular ``U``; differentiable.
    """
    d = L.shape[-1]
    eye = torch.eye(d, dtype=L.dtype, device=L.device)
    eps = torch.finfo(L.dtype).eps
    scale = torch.as_tensor(scale, dtype=L.dtype, device=L.device)
    top = scale.max()  # states of zero prior variance get eps x the largest scale
    scale = scale.clamp_min(torch.where(top > 0, eps * top, torch.ones_like(top)))
    unit = d * eps * scale
    for c in _JITTER_LADDER:
        U, info = torch.linalg.cholesky_ex(L + (c * unit) * eye)
        if not bool(info.any()):
            break
    else:
        raise torch.linalg.LinAlgError(_not_psd_message(L))
    zero = (L == 0).all(-1).all(-1)
    return torch.where(zero[..., None, None], torch.zeros_like(U), U)


def _not_psd_message(L: Tensor) -> str:
    """Why :func:`psd_factor` failed, and what to do (depends on the dtype)."""
    head = (
        "backward-sampling covariance is not positive semi-definite even with jitter "
        f"{_JITTER_LADDER[-1]:.0e} x d x eps x scale"
    )
    if not bool(torch.isfinite(L).all()):
        return (
            f"{head}: it contains NaN or inf; check that the kernel hyperparameters and the "
            "noise are finite and positive"
        )
    if L.dtype != torch.float64:
        return (
            f"{head}: {L.dtype} lost the precision these smoothing moments need; run the "
            "model in float64 (model.double() and float64 times and targets)"
        )
    return (
        f"{head} in float64: the smoothing moments are inconsistent; check that the kernel "
        "hyperparameters and the noise are finite and positive"
    )


def backward_sample(E: Tensor, c: Tensor, method: str = "sequential") -> Tensor:
    """Solve the backward recursion ``x_k = E_k x_{k+1} + c_k`` (``E_{N-1} = 0``).

    Parameters
    ----------
    E : Tensor, shape (..., N, d, d)
        Backward gains (``E[..., -1, :, :]`` is ignored: the last state is ``c_{N-1}``).
    c : Tensor, shape (*S, ..., N, d)
        Offsets ``g_k + U_k z_k``; ``S`` are sample dimensions.
    method : {"sequential", "parallel"}
        A Python loop over ``k`` (vectorised over samples and series), or an ``O(log N)``
        depth suffix scan of affine maps.

    Returns
    -------
    Tensor, shape (*S, ..., N, d)
        The draws ``x_k``.
    """
    N = E.shape[-3]
    extra = c.dim() - (E.dim() - 1)  # number of sample dims in front of the batch dims
    if method == "parallel":
        E_t = E.movedim(-3, 0)
        E_t = E_t.reshape(N, *([1] * extra), *E_t.shape[1:])  # broadcast over samples
        c_t = c.movedim(-2, 0)

        def affine(ei: tuple[Tensor, ...], ej: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            (Ei, ci), (Ej, cj) = ei, ej
            return Ei @ Ej, (Ei @ cj.unsqueeze(-1)).squeeze(-1) + ci

        _, x = associative_scan(affine, (E_t, c_t), reverse=True)
        return x.movedim(0, -2)
    E_k, c_k = E.unbind(-3), c.unbind(-2)
    x = c_k[-1]
    draws = [x]
    for k in range(N - 2, -1, -1):
        x = (E_k[k] @ x.unsqueeze(-1)).squeeze(-1) + c_k[k]
        draws.append(x)
    return torch.stack(draws[::-1], dim=-2)


class StateSpacePosterior(GaussianPosterior):
    """Gaussian posterior of ``f`` at prediction times with O(n) joint sampling by FFBS.

    ``mean`` and ``variance`` are the RTS-smoother marginals (``(..., n_new, 1)``);
    :meth:`rsample` draws *joint* samples, correlated across the prediction times exactly
    as the GP posterior, by backward sampling over the merged time grid of ``N`` points
    (training and prediction times) in ``O(N d^3)`` — no dense covariance. The dense joint
    covariance is still available on request (:attr:`covariance_matrix`, computed in
    ``O(N n_new d^2)`` from the backward gains), and :meth:`joint_log_prob` uses it.

    Base samples (:attr:`base_sample_shape`) are ``(..., N, d + 1)``: ``d`` standard normals
    per grid point for the states, and one per grid point of which those at the prediction
    times drive the observation noise (when ``noise > 0``). Draws are
    ``shift + scale * (h^T x + W z) + sqrt(noise) * eps``, where the optional low-rank term
    ``W z`` (:meth:`with_low_rank`, e.g. the uncertainty of a trend's coefficients) takes
    its ``r`` normals from an extra column: base samples ``(..., N, d + 2)``, of which the
    first ``r`` rows of the last column are used.

    Parameters
    ----------
    mean, variance : Tensor, shape (..., n_new, 1)
        Marginal moments (already including ``shift``, ``scale`` and ``noise``).
    elements : tuple (E, g, L)
        Smoothing elements on the grid, shapes (..., N, d, d), (..., N, d), (..., N, d, d).
    h : Tensor, shape (d,)
        Measurement vector, ``f = h^T x``.
    new_index : Tensor (long), shape (n_new,) or (..., n_new)
        Grid position of each prediction time.
    cov_h : Tensor, shape (..., n_new, d)
        ``P^s h`` (smoothed state covariance times ``h``) at the prediction times, for the
        dense covariance.
    prior_scale : float or Tensor
        Size of the prior state variances (jitter scale of :func:`psd_factor`).
    noise : float or Tensor, default 0
        Independent Gaussian noise variance added to every draw (observation noise).
    scale : float or Tensor of shape (), default 1
    shift : float or Tensor of shape () or (..., n_new), default 0
        Affine map of the latent draws (e.g. undoing a standardisation); a shift per
        prediction time adds a fixed function such as a trend (:meth:`shifted`).
    method : {"sequential", "parallel"}, default "sequential"
        Backward recursion algorithm (:func:`backward_sample`).
    low_rank : Tensor, shape (..., n_new, r), optional
        ``W`` of an independent term ``W z``, ``z ~ N(0, I_r)``, in the units before
        ``scale`` (``mean`` and ``variance`` already include it).
    """

    def __init__(
        self,
        mean: Tensor,
        variance: Tensor,
        elements: tuple[Tensor, Tensor, Tensor],
        h: Tensor,
        new_index: Tensor,
        cov_h: Tensor,
        prior_scale: float | Tensor,
        noise: float | Tensor = 0.0,
        scale: float | Tensor = 1.0,
        shift: float | Tensor = 0.0,
        method: str = "sequential",
        low_rank: Tensor | None = None,
    ) -> None:
        super().__init__(mean, variance=variance)
        self._elements = elements
        self._h = h
        self._new_index = new_index
        self._cov_h = cov_h
        self._prior_scale = prior_scale
        # sampling and the dense covariance run in the dtype of the smoother's output (the
        # compute dtype); ``to(dtype)`` only changes the dtype of what is returned
        like = {"dtype": elements[0].dtype, "device": mean.device}
        self._noise = torch.as_tensor(noise, **like)
        self._scale = torch.as_tensor(scale, **like).reshape(())
        self._shift = torch.as_tensor(shift, **like)
        if self._shift.numel() == 1:
            self._shift = self._shift.reshape(())
        self._method = method
        self._low_rank = low_rank
        self._factor: Tensor | None = None
        self._dense: Tensor | None = None

    def _replace(self, **changes: object) -> StateSpacePosterior:
        kwargs = dict(
            mean=self._mean,
            variance=self._variance,
            elements=self._elements,
            h=self._h,
            new_index=self._new_index,
            cov_h=self._cov_h,
            prior_scale=self._prior_scale,
            noise=self._noise,
            scale=self._scale,
            shift=self._shift,
            method=self._method,
            low_rank=self._low_rank,
        )
        kwargs.update(changes)
        return StateSpacePosterior(**kwargs)

    # -- structure -------------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        """Number ``N`` of points on the merged time grid."""
        return self._elements[0].shape[-3]

    @property
    def base_sample_shape(self) -> torch.Size:
        """``(..., N, d + 1)``: state normals per grid point, plus one for observation noise
        (``d + 2`` with a low-rank term)."""
        E = self._elements[0]
        batch = self._mean.shape[:-2]
        extra = 1 if self._low_rank is None else 2
        return torch.Size((*batch, E.shape[-3], E.shape[-1] + extra))

    @property
    def is_joint(self) -> bool:
        """True: draws and :attr:`covariance_matrix` are joint across the points."""
        return True

    def affine(self, scale: Tensor | float, shift: Tensor | float = 0.0) -> StateSpacePosterior:
        """Posterior of ``shift + scale * f`` (observation noise scaled by ``scale**2``).

        Parameters
        ----------
        scale : float or Tensor of shape () or (1,)
            Positive.
        shift : float or Tensor of shape () or (1,)

        Returns
        -------
        StateSpacePosterior
            Joint FFBS draws of the mapped ``f`` (the map is applied to every draw).
        """
        scale, shift = (v.reshape(()) for v in self._affine_args(scale, shift))
        inner_scale, inner_shift = scale.to(self._scale.dtype), shift.to(self._scale.dtype)
        return self._replace(
            mean=self._mean * scale + shift,
            variance=self._variance * scale**2,
            noise=self._noise * inner_scale**2,
            scale=self._scale * inner_scale,
            shift=self._shift * inner_scale + inner_shift,
        )

    def shifted(self, offset: Tensor) -> StateSpacePosterior:
        """Posterior of ``f + offset`` for a fixed ``offset`` per prediction time.

        Adds a known function of the inputs (e.g. a fitted trend): the mean moves by
        ``offset``, variances, the joint covariance and the noise are unchanged, and every
        draw moves by ``offset`` too.

        Parameters
        ----------
        offset : Tensor, shape (..., n_new, 1)
            Broadcastable to :attr:`mean`.

        Returns
        -------
        StateSpacePosterior
        """
        offset = torch.as_tensor(offset, device=self.device)
        try:
            torch.broadcast_shapes(offset.shape, self._mean.shape)
        except RuntimeError as err:
            raise ValueError(
                f"offset must broadcast to the mean's shape {tuple(self._mean.shape)}, got "
                f"{tuple(offset.shape)}"
            ) from err
        if not bool(torch.isfinite(offset).all()):
            raise ValueError("offset contains NaN or inf")
        inner = offset.to(self._shift.dtype)[..., 0]  # (..., n_new): draws have no last axis
        return self._replace(
            mean=self._mean + offset.to(self._mean.dtype), shift=self._shift + inner
        )

    def with_low_rank(self, W: Tensor) -> StateSpacePosterior:
        """Posterior of ``f + W z`` with ``z ~ N(0, I_r)`` independent of ``f``.

        Adds a rank-``r`` Gaussian term, e.g. the uncertainty of a trend's coefficients
        (``W = R^T L`` for coefficient covariance ``L L^T``): variances grow by the row
        sums of ``W^2``, the joint covariance by ``W W^T``, every draw by ``W z`` (``z`` from
        the extra base-sample column). The mean is unchanged.

        Parameters
        ----------
        W : Tensor, shape (..., n_new, r)
            ``r <= N`` (the grid size).

        Returns
        -------
        StateSpacePosterior
        """
        W = torch.as_tensor(W, device=self.device)
        if W.dim() < 2 or W.shape[-2] != self._mean.shape[-2]:
            raise ValueError(
                f"W must have shape (..., {self._mean.shape[-2]}, r), got {tuple(W.shape)}"
            )
        if W.shape[-1] > self.grid_size:
            raise ValueError(f"W has rank {W.shape[-1]} > grid size {self.grid_size}")
        if not bool(torch.isfinite(W).all()):
            raise ValueError("W contains NaN or inf")
        inner = W.to(self._scale.dtype) / self._scale
        if self._low_rank is not None:
            old = self._low_rank.expand(*inner.shape[:-1], -1)
            inner = torch.cat([old, inner], dim=-1)
        extra = W.to(self._variance.dtype).pow(2).sum(-1, keepdim=True)
        return self._replace(variance=self._variance + extra, low_rank=inner)

    def to(self, dtype: torch.dtype) -> StateSpacePosterior:
        """The same posterior answering in floating ``dtype`` (differentiable).

        Moments, draws and the dense covariance are returned in ``dtype``; the backward
        sampling itself keeps running in the dtype the smoother computed in (casting a
        float64 posterior to float32 does not make its draws float32-accurate only).
        """
        return self._replace(mean=self._mean.to(dtype), variance=self._variance.to(dtype))

    def add_observation_noise(self, noise_variance: Tensor | float) -> StateSpacePosterior:
        """Predictive of ``y = f + eps``, ``eps ~ N(0, noise_variance)`` independent.

        Parameters
        ----------
        noise_variance : float or Tensor of shape ()
        """
        noise = torch.as_tensor(noise_variance, dtype=self._noise.dtype, device=self.device)
        if noise.numel() != 1:
            raise ValueError(
                f"noise_variance must be a scalar for {type(self).__name__}, "
                f"got shape {tuple(noise.shape)}"
            )
        if bool((noise < 0).any()):
            raise ValueError("noise_variance must be non-negative")
        noise = noise.reshape(())
        variance = self._variance + noise.to(self._variance.dtype)
        return self._replace(variance=variance, noise=self._noise + noise)

    # -- sampling --------------------------------------------------------------------------
    def _state_factor(self) -> Tensor:
        L = self._elements[2]
        needs_graph = torch.is_grad_enabled() and L.requires_grad
        if self._factor is not None and not needs_graph:
            return self._factor
        factor = psd_factor(L, self._prior_scale)
        if not needs_graph:
            self._factor = factor
        return factor

    def _take_new(self, grid_values: Tensor) -> Tensor:
        """Values (*S, ..., N) on the grid -> (*S, ..., n_new) at the prediction times."""
        index = self._new_index
        if index.dim() == 1:
            return grid_values[..., index]
        return grid_values.gather(-1, index.expand(*grid_values.shape[:-1], index.shape[-1]))

    def rsample_from_base_samples(self, sample_shape: torch.Size, base_samples: Tensor) -> Tensor:
        """Joint draws by backward sampling from standard normals of :attr:`base_sample_shape`.

        Returns
        -------
        Tensor, shape ``(*sample_shape, ..., n_new, 1)``
        """
        sample_shape = as_size(sample_shape)
        expected = sample_shape + self.base_sample_shape
        if base_samples.shape != expected:
            raise ValueError(
                f"base_samples has shape {tuple(base_samples.shape)}, expected {tuple(expected)}"
            )
        base = base_samples.to(dtype=self._noise.dtype, device=self.device)
        E, g, _ = self._elements
        d = E.shape[-1]
        U = self._state_factor()
        c = g + (U @ base[..., :d].unsqueeze(-1)).squeeze(-1)  # (*S, ..., N, d)
        x = backward_sample(E, c, self._method)
        f = self._take_new(x @ self._h)
        if self._low_rank is not None:
            z = base[..., : self._low_rank.shape[-1], d + 1]  # (*S, ..., r)
            f = f + (self._low_rank @ z.unsqueeze(-1)).squeeze(-1)
        draws = self._shift + self._scale * f
        if bool(self._noise != 0):
            draws = draws + self._noise.sqrt() * self._take_new(base[..., d])
        return draws.unsqueeze(-1).to(self.dtype)

    def rsample(
        self,
        sample_shape: torch.Size | tuple[int, ...] = torch.Size(),
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Joint draws, shape ``(*sample_shape, ..., n_new, 1)``, O(N d^3) per draw.

        Differentiable with respect to the model's hyperparameters (reparameterised).

        Parameters
        ----------
        sample_shape : torch.Size or tuple of int
        generator : torch.Generator, optional
            Source of the standard normals (default: torch's global generator).
        """
        sample_shape = as_size(sample_shape)
        base = torch.randn(
            sample_shape + self.base_sample_shape,
            dtype=self.dtype,
            device=self.device,
            generator=generator,
        )
        return self.rsample_from_base_samples(sample_shape, base)

    # -- dense joint (on request) ----------------------------------------------------------
    @property
    def covariance_matrix(self) -> Tensor:
        """Exact joint covariance ``(..., n_new, n_new)`` (dense; ``O(N n_new d^2)``).

        For grid positions ``a < b``, ``Cov(x_a, x_b | y) = E_a E_{a+1} ... E_{b-1} P^s_b``,
        so ``Cov(f_a, f_b) = h^T E_a ... E_{b-1} (P^s_b h)``: one backward sweep carries
        ``E_k ... E_{b-1} (P^s_b h)`` for every prediction time ``b`` at once.
        """
        if self._dense is not None:
            return self._dense
        E = self._elements[0]
        N = E.shape[-3]
        batch = self._mean.shape[:-2]
        n_new = self._mean.shape[-2]
        pos = self._new_index.expand(*batch, n_new)  # (..., n_new)
        W = self._cov_h.mT.expand(*batch, -1, n_new)  # columns P^s_b h, (..., d, n_new)
        rows = [W.new_zeros(*batch, n_new)]  # row of grid position N - 1: nothing later
        E_k = E.unbind(-3)
        for k in range(N - 2, -1, -1):
            later = (pos > k).unsqueeze(-2)
            W = torch.where(later, E_k[k] @ W, W)
            rows.append(self._h @ W)
        table = torch.stack(rows[::-1], dim=-2)  # (..., N, n_new): row k = h^T E_k.. (P^s h)
        cross = table.gather(-2, pos.unsqueeze(-1).expand(*batch, n_new, n_new))
        upper = pos.unsqueeze(-1) < pos.unsqueeze(-2)  # p_i < p_j
        cov = torch.where(upper, cross, cross.mT)
        latent_var = (self._cov_h @ self._h).expand(*batch, n_new)  # h^T P^s h
        eye = torch.eye(n_new, dtype=torch.bool, device=cov.device)
        cov = torch.where(eye, torch.diag_embed(latent_var), cov)
        if self._low_rank is not None:
            cov = cov + self._low_rank @ self._low_rank.mT
        cov = cov * self._scale**2 + torch.diag_embed(self._noise.expand(*batch, n_new))
        cov = cov.to(self.dtype)
        if not (torch.is_grad_enabled() and cov.requires_grad):
            self._dense = cov
        return cov

    @property
    def scale_tril(self) -> Tensor:
        """Cholesky factor of :attr:`covariance_matrix` (dense)."""
        return psd_safe_cholesky(self.covariance_matrix)

    def joint_log_prob(self, y: Tensor) -> Tensor:
        """Joint log density of ``y`` (..., n_new, 1) under the dense joint covariance."""
        dense = GaussianPosterior(self._mean, covariance=self.covariance_matrix)
        return dense.joint_log_prob(y)

    def __repr__(self) -> str:
        return (
            f"StateSpacePosterior(shape={tuple(self._mean.shape)}, grid={self.grid_size}, "
            f"sampling='ffbs')"
        )

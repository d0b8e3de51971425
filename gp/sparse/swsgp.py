"""``SWSGP``: sparse-within-sparse variational GP (Tran, Milios, Michiardi, Filippone, ICML 2021).

Each input ``x`` depends only on its ``H`` nearest inducing inputs ``a(x)`` out of ``M``
(ALGORITHMS §5): ``p(f(x) | u) = N(k_xa K_aa^-1 u_a, k_xx - k_xa K_aa^-1 k_ax)``, so a step
costs O(B H^3) plus the neighbour search instead of SVGP's O(B M^2 + M^3), and ``M`` can be
tens of thousands.

Covariance family: ``q(u) = N(m, S)`` with ``S = diag(s) + W W^T`` (``W`` of shape ``(M, r)``),
unwhitened. Every marginal block is exact and cheap, ``S_aa = diag(s_a) + W_a W_a^T``
(O(H^2 r) per point, memory O(M r)); a full Cholesky factor of ``S`` (O(M^2) memory, and a
sub-block of a factor is not the factor of the sub-block, §5.4) is never used. The
parameterisation is unwhitened because whitening ``u = chol(K_ZZ) v`` needs the ``M x M``
Cholesky of ``K_ZZ`` that the method exists to avoid, and a per-neighbourhood whitening would
not define one consistent ``q(u)`` across overlapping neighbour sets.

KL term (§5.1): the full ``KL(q(u) || p(u))`` over all ``M`` inducing variables is never
formed. Following the hierarchical prior with the selection variable, the KL is the
expectation over the selection of the KL between the ``H``-dimensional marginals,
estimated on the minibatch: ``(1/|B|) sum_i KL(N(m_a(i), S_aa(i)) || N(0, K_aa(i)))``
(the weighting of the available re-implementation; ALGORITHMS §5.1 could not check it against
the paper's equation), by default on a uniform subsample of 128 of the batch's points (an
unbiased estimate of the same average; ``kl_subsample``). Cost O(k H^3), never an ``M x M``
factorisation. With ``H = M`` every neighbour set is the whole set, so this is exactly
SVGP's global KL (tested against dense formulas, as is Titsias' bound at the optimum).

Neighbours are recomputed from the current ``Z`` at every call (no gradient through the
selection): an exact grid search compiled with numba for ``d <= 3``, a k-d tree for
``d <= 8`` on CPU, tiled brute force otherwise (:mod:`gp.sparse._swsgp_neighbors`).

Batches of independent GPs (``batch_shape``, as in :class:`gp.SVGP`): every GP has its own
kernel hyperparameters (a gpytorch kernel built with that ``batch_shape``), inducing inputs,
``q(u)`` and neighbour sets. The ``(B, H, H)`` blocks of all GPs are stacked into one
``(G B, H, H)`` batch for the local algebra, so a step is one vectorised computation; only the
k-d tree and grid searches loop over the GPs (use ``neighbor_method="brute"`` on GPUs).
"""

from __future__ import annotations

import math

import torch
from gpytorch.distributions import MultivariateNormal
from gpytorch.kernels import Kernel
from gpytorch.likelihoods import BernoulliLikelihood, GaussianLikelihood, Likelihood
from linear_operator.operators import DiagLinearOperator
from torch import Tensor, nn
from tqdm.auto import tqdm

from bdl.core.posterior import GaussianPosterior
from gp.sparse._swsgp_kernel import block_covariance
from gp.sparse._swsgp_local import fast_cholesky, local_moments_and_kl
from gp.sparse._swsgp_neighbors import NEIGHBOR_METHODS, nearest_inducing

__all__ = ["SWSGP"]

_LIKELIHOODS = {"gaussian": GaussianLikelihood, "bernoulli": BernoulliLikelihood}
DEFAULT_JITTER = 1e-4


def _inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


def _dense(value: object) -> Tensor:
    return value.to_dense() if hasattr(value, "to_dense") else value


def _check_positive_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _fits_batch(shape: torch.Size, batch_shape: torch.Size) -> bool:
    """Whether ``shape`` broadcasts to exactly ``batch_shape``."""
    try:
        return torch.broadcast_shapes(shape, batch_shape) == batch_shape
    except RuntimeError:
        return False


def _gather_rows(values: Tensor, idx: Tensor) -> Tensor:
    """``values[..., idx, ...]`` per GP: values (*batch, M, ...), idx (*batch, n, H).

    Returns (*batch, n, H, ...). Without batch dims plain indexing; with them one gather on
    the flattened ``(G M, ...)`` rows (no loop over the GPs).
    """
    batch_dims = idx.dim() - 2
    if batch_dims == 0:
        return values[idx]
    G, M = idx.shape[:batch_dims].numel(), values.shape[batch_dims]
    flat = values.reshape(G * M, *values.shape[batch_dims + 1 :])
    offsets = torch.arange(G, device=idx.device).reshape(*idx.shape[:batch_dims], 1, 1) * M
    return flat[idx + offsets]


def _cross_blocks(kernel: Kernel, X: Tensor, Z_a: Tensor) -> Tensor:
    """``k(x_i, Z_a(i))``: X (*batch, B, d), Z_a (*batch, B, H, d) -> (*batch, B, H)."""
    if X.dim() == 2:
        return _dense(kernel(X.unsqueeze(-2), Z_a)).squeeze(-2)
    # gpytorch broadcasts a batch kernel against the leading dims: put the points first.
    K = _dense(kernel(X.unsqueeze(-2).movedim(-3, 0), Z_a.movedim(-3, 0)))
    return K.squeeze(-2).movedim(0, -2)


class SWSGP(nn.Module):
    """Sparse-within-sparse variational GP with a diagonal-plus-low-rank ``q(u)``.

    Usage::

        model = SWSGP(ScaleKernel(RBFKernel()), Z, num_neighbors=32, rank=4)
        losses = model.fit(X, y, epochs=2, batch_size=1024)
        post = model.posterior(X_test, observation_noise=True)   # GaussianPosterior (n, 1)

        # 8 independent GPs (own hyperparameters, Z, q(u)); X (n, d) shared or (8, n, d)
        bs = torch.Size([8])
        kern = ScaleKernel(RBFKernel(batch_shape=bs), batch_shape=bs)
        model = SWSGP(kern, Z, num_neighbors=32, batch_shape=bs)
        model.elbo(X, y, num_data=N)                               # shape (8,)
        model.posterior(X_test, joint=True)                        # covariance (8, n, n)

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel
        Prior covariance; its hyperparameters are trained. For a batch of GPs give it
        ``batch_shape`` (one set of hyperparameters per GP; a kernel without batch shape is
        shared by all GPs).
    inducing_points : Tensor, shape (M, d) or ``(*batch_shape, M, d)``
        Initial inducing inputs ``Z`` (copied; an ``(M, d)`` tensor is used by every GP of a
        batch); their dtype and device are the model's.
    num_neighbors : int, default 32
        ``H``, inducing points used by each input, ``1 <= H <= M``.
    rank : int, default 4
        ``r``, columns of the low-rank factor ``W`` of ``S`` (0 gives a diagonal ``S``).
    likelihood : {"gaussian", "bernoulli"} or gpytorch Likelihood, default "gaussian"
        Observation model; non-Gaussian ones use gpytorch's Gauss-Hermite quadrature.
    learn_inducing_locations : bool, default True
        Whether ``Z`` is a trained parameter.
    jitter : float, optional
        Added to the diagonal of every ``K_aa`` (so the prior is ``N(0, K_ZZ + jitter I)``);
        default 1e-4 in every dtype (gpytorch's float32 variational jitter). Inducing inputs
        that are dense relative to the lengthscale make ``K_aa`` ill-conditioned, and the
        unwhitened ``m`` then optimises badly (with 1e-6 in float64 a 1-D fit collapsed the
        lengthscale); the larger nugget keeps ``beta = K_aa^-1 k_ax`` bounded.
    init_variance : float, optional
        A constant initial diagonal ``s`` of ``S``; default: the conditional prior variance of
        each inducing variable given its neighbours (see
        :meth:`reset_variational_covariance`). ``W`` starts at small random values.
    neighbor_method : {"auto", "brute", "kdtree"}, default "auto"
        Neighbour search, see :func:`gp.sparse._swsgp_neighbors.nearest_inducing`.
    chunk_size : int, default 4096
        Points per chunk in :meth:`posterior` (bounded memory for any ``n``).
    kl_subsample : int or None, default 128
        In :meth:`elbo`, the averaged KL term is estimated on this many points of the batch
        drawn uniformly (unbiased; the ``H x H`` inverses it needs are the costliest part of
        a step; a batch of GPs uses the same row positions for every GP). ``None`` uses every
        point of the batch (deterministic ELBO).
    batch_shape : tuple of int, default ()
        Shape of a batch of independent GPs. Inputs are then ``(n, d)`` (shared by all GPs)
        or ``(*batch_shape, n, d)``, targets ``(*batch_shape, n)`` (or ``(n,)`` shared), and
        :meth:`elbo` returns one value per GP. A string ``likelihood="gaussian"`` gets one
        noise variance per GP.

    Attributes
    ----------
    inducing_points : Parameter, shape ``(*batch_shape, M, d)``
    variational_mean : Parameter, shape ``(*batch_shape, M)``
        ``m``.
    raw_variational_diag : Parameter, shape ``(*batch_shape, M)``
        ``s = softplus(raw_variational_diag)``.
    variational_factor : Parameter, shape ``(*batch_shape, M, r)``
        ``W``.
    """

    def __init__(
        self,
        kernel: Kernel,
        inducing_points: Tensor,
        num_neighbors: int = 32,
        rank: int = 4,
        likelihood: str | Likelihood = "gaussian",
        *,
        learn_inducing_locations: bool = True,
        jitter: float | None = None,
        init_variance: float | None = None,
        neighbor_method: str = "auto",
        chunk_size: int = 4096,
        kl_subsample: int | None = 128,
        batch_shape: torch.Size | tuple[int, ...] = torch.Size(),
    ) -> None:
        super().__init__()
        if not isinstance(kernel, Kernel):
            raise TypeError(f"kernel must be a gpytorch Kernel, got {type(kernel).__name__}")
        try:
            batch_shape = torch.Size(batch_shape)
        except TypeError as err:
            raise TypeError(f"batch_shape must be a tuple of ints, got {batch_shape!r}") from err
        if any(b < 1 for b in batch_shape):
            raise ValueError(f"batch_shape must hold positive sizes, got {tuple(batch_shape)}")
        if not _fits_batch(kernel.batch_shape, batch_shape):
            raise ValueError(
                f"kernel has batch_shape {tuple(kernel.batch_shape)}, which does not broadcast "
                f"to the model's batch_shape {tuple(batch_shape)}"
            )
        expected = "(M, d)" if not batch_shape else f"(M, d) or {(*batch_shape, 'M', 'd')}"
        if (
            not isinstance(inducing_points, Tensor)
            or inducing_points.dim() < 2
            or not _fits_batch(inducing_points.shape[:-2], batch_shape)
        ):
            raise ValueError(
                f"inducing_points must be a tensor of shape {expected}, got "
                f"{getattr(inducing_points, 'shape', inducing_points)!r}"
            )
        if not inducing_points.dtype.is_floating_point:
            raise TypeError(f"inducing_points must be floating point, got {inducing_points.dtype}")
        if inducing_points.shape[-2] == 0 or inducing_points.shape[-1] == 0:
            raise ValueError(f"inducing_points is empty (shape {tuple(inducing_points.shape)})")
        if not bool(torch.isfinite(inducing_points).all()):
            raise ValueError("inducing_points contains NaN or inf")
        inducing_points = inducing_points.expand(*batch_shape, *inducing_points.shape[-2:])
        M = inducing_points.shape[-2]
        _check_positive_int(num_neighbors, "num_neighbors")
        if num_neighbors > M:
            raise ValueError(
                f"num_neighbors (H = {num_neighbors}) must not exceed the number of inducing "
                f"points (M = {M})"
            )
        _check_positive_int(rank, "rank", minimum=0)
        if init_variance is not None and not (
            isinstance(init_variance, (int, float)) and init_variance > 0
        ):
            raise ValueError(f"init_variance must be a positive float, got {init_variance!r}")
        if jitter is not None and not (isinstance(jitter, (int, float)) and jitter >= 0):
            raise ValueError(f"jitter must be a non-negative float or None, got {jitter!r}")
        if neighbor_method not in NEIGHBOR_METHODS:
            raise ValueError(
                f"neighbor_method must be one of {NEIGHBOR_METHODS}, got {neighbor_method!r}"
            )
        _check_positive_int(chunk_size, "chunk_size")
        if kl_subsample is not None:
            _check_positive_int(kl_subsample, "kl_subsample")
        if isinstance(likelihood, str):
            if likelihood not in _LIKELIHOODS:
                raise ValueError(
                    f"likelihood must be one of {tuple(_LIKELIHOODS)} or a gpytorch Likelihood, "
                    f"got {likelihood!r}"
                )
            cls = _LIKELIHOODS[likelihood]
            likelihood = cls(batch_shape=batch_shape) if cls is GaussianLikelihood else cls()
        elif not isinstance(likelihood, Likelihood):
            raise TypeError(
                f"likelihood must be a string or a gpytorch Likelihood, got {type(likelihood)}"
            )
        factory = {"dtype": inducing_points.dtype, "device": inducing_points.device}
        self.batch_shape = batch_shape
        self.kernel = kernel.to(**factory)
        self.likelihood = likelihood.to(**factory)
        self.num_neighbors = num_neighbors
        self.rank = rank
        self.jitter = jitter
        self.neighbor_method = neighbor_method
        self.chunk_size = chunk_size
        self.kl_subsample = kl_subsample
        self.inducing_points = nn.Parameter(
            inducing_points.detach().clone(), requires_grad=learn_inducing_locations
        )
        self.variational_mean = nn.Parameter(torch.zeros(*batch_shape, M, **factory))
        self.raw_variational_diag = nn.Parameter(torch.zeros(*batch_shape, M, **factory))
        self.variational_factor = nn.Parameter(torch.zeros(*batch_shape, M, rank, **factory))
        self.reset_variational_covariance(init_variance)

    # -- basic quantities --------------------------------------------------------------------
    @property
    def num_inducing(self) -> int:
        return self.inducing_points.shape[-2]

    @property
    def variational_diag(self) -> Tensor:
        """``s``, shape ``(*batch_shape, M)``."""
        return nn.functional.softplus(self.raw_variational_diag)

    @torch.no_grad()
    def reset_variational_covariance(self, init_variance: float | None = None) -> None:
        """Initialise ``s`` and ``W`` (``m`` is left alone).

        By default ``s_j`` is the conditional prior variance of ``u_j`` given its ``H - 1``
        nearest inducing neighbours, ``1 / (K_bb^-1)_jj`` with ``b`` the ``H`` nearest inducing
        inputs of ``z_j``: the diagonal closest to the prior in KL on those blocks. A constant
        ``s = init_variance`` is a poor start when the inducing inputs are dense relative to the
        lengthscale: the variance term ``beta^T diag(s) beta`` with ``beta = K_aa^-1 k_ax`` is
        then huge. ``W`` gets small random entries (``W = 0`` is a stationary point in ``W``).

        Parameters
        ----------
        init_variance : float, optional
            A constant ``s`` instead of the conditional prior variances.
        """
        Z = self.inducing_points
        if init_variance is None:
            parts = []
            for start in range(0, Z.shape[-2], self.chunk_size):
                Zc = Z[..., start : start + self.chunk_size, :]
                idx = nearest_inducing(Zc, Z, self.num_neighbors, method=self.neighbor_method)
                Z_b = _gather_rows(Z, idx)
                K_bb = block_covariance(self.kernel, Z_b, self._jitter_value())
                K_inv_diag = torch.cholesky_inverse(fast_cholesky(K_bb)).diagonal(dim1=-2, dim2=-1)
                own = torch.arange(start, start + Zc.shape[-2], device=Z.device).unsqueeze(-1)
                pos = (idx == own).to(torch.long).argmax(-1, keepdim=True)  # 0 if absent
                parts.append(1.0 / K_inv_diag.gather(-1, pos).squeeze(-1))
            s0 = torch.cat(parts, dim=-1)
        else:
            s0 = torch.full_like(self.raw_variational_diag, float(init_variance))
        tiny = torch.finfo(Z.dtype).tiny
        self.raw_variational_diag.copy_(_inverse_softplus(s0.clamp_min(tiny)))
        scale = 1e-2 * s0.mean(-1).sqrt() / math.sqrt(max(self.rank, 1))  # one per GP
        noise = torch.randn_like(self.variational_factor)
        self.variational_factor.copy_(scale[..., None, None] * noise)

    def variational_covariance(self) -> Tensor:
        """Dense ``S = diag(s) + W W^T``, shape ``(*batch_shape, M, M)`` (for small ``M`` only)."""
        W = self.variational_factor
        return torch.diag_embed(self.variational_diag) + W @ W.mT

    def _jitter_value(self) -> float:
        return DEFAULT_JITTER if self.jitter is None else float(self.jitter)

    def _check_X(self, X: object) -> Tensor:
        """Validated inputs, shape ``(*batch_shape, n, d)`` (a shared (n, d) is expanded)."""
        Z = self.inducing_points
        d, batch = Z.shape[-1], self.batch_shape
        expected = f"(n, {d})" if not batch else f"(n, {d}) or {(*batch, 'n', d)}"
        if not isinstance(X, Tensor):
            raise TypeError(f"X must be a torch.Tensor of shape {expected}, got {type(X).__name__}")
        if X.dim() == 1 and d == 1:
            X = X.unsqueeze(-1)
        if X.dim() < 2 or X.shape[-1] != d or not _fits_batch(X.shape[:-2], batch):
            raise ValueError(
                f"X must have shape {expected} (d matching the inducing points, batch dims "
                f"the model's batch_shape {tuple(batch)}), got {tuple(X.shape)}"
            )
        if X.shape[-2] == 0:
            raise ValueError("X is empty; give at least one point")
        if X.dtype != Z.dtype or X.device != Z.device:
            raise ValueError(
                f"X has dtype {X.dtype} on {X.device} but the model is {Z.dtype} on {Z.device}; "
                "convert X or the model (model.to(...))"
            )
        if not bool(torch.isfinite(X).all()):
            raise ValueError("X contains NaN or inf; inputs must be finite")
        return X.expand(*batch, *X.shape[-2:]) if batch else X

    def _check_y(self, y: object, X: Tensor) -> Tensor:
        """Validated targets, shape ``(*batch_shape, n)`` (a shared (n,) is expanded)."""
        n, batch = X.shape[-2], self.batch_shape
        expected = f"({n},) or ({n}, 1)" if not batch else f"({n},) or {(*batch, n)}"
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor of shape {expected}, got {type(y).__name__}")
        ok = y.dim() >= 1 and y.shape[-1] == n and _fits_batch(y.shape[:-1], batch)
        if not ok and y.dim() >= 2 and y.shape[-2:] == (n, 1):
            y = y.squeeze(-1)
            ok = _fits_batch(y.shape[:-1], batch)
        if not ok:
            raise ValueError(
                f"y has shape {tuple(y.shape)} but X has shape {tuple(X.shape)}; expected y of "
                f"shape {expected}"
            )
        y = y.to(X.dtype)
        if not bool(torch.isfinite(y).all()):
            raise ValueError("y contains NaN or inf; targets must be finite")
        return y.expand(*batch, n) if batch else y

    # -- core -------------------------------------------------------------------------------
    def neighbors(self, X: Tensor) -> Tensor:
        """Indices of the ``H`` nearest inducing inputs of each row of ``X`` (into each GP's own
        inducing inputs), shape ``(*batch_shape, n, H)``."""
        X = self._check_X(X)
        return nearest_inducing(
            X, self.inducing_points, self.num_neighbors, method=self.neighbor_method
        )

    def _moments(
        self, X: Tensor, with_kl: bool, kl_rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        # X (*batch, B, d); kl_rows (k,) row positions, the same for every GP of a batch.
        idx = nearest_inducing(
            X, self.inducing_points, self.num_neighbors, method=self.neighbor_method
        )
        Z_a = _gather_rows(self.inducing_points, idx)  # (*batch, B, H, d)
        K_aa = block_covariance(self.kernel, Z_a, self._jitter_value())
        k_xa = _cross_blocks(self.kernel, X, Z_a)  # (*batch, B, H)
        k_xx = _dense(self.kernel(X, X, diag=True))  # (*batch, B)
        m_a = _gather_rows(self.variational_mean, idx)
        s_a = _gather_rows(self.variational_diag, idx)
        W_a = _gather_rows(self.variational_factor, idx)
        if not self.batch_shape:
            return local_moments_and_kl(
                K_aa, k_xa, k_xx, m_a, s_a, W_a, with_kl=with_kl, kl_rows=kl_rows
            )
        # Stack the GPs' blocks into one (G B, H, H) batch for the local algebra.
        batch, B, H = self.batch_shape, X.shape[-2], idx.shape[-1]
        G = batch.numel()
        if with_kl and kl_rows is not None:
            kl_rows = (torch.arange(G, device=X.device).unsqueeze(-1) * B + kl_rows).reshape(-1)
        mean, var, kl = local_moments_and_kl(
            K_aa.reshape(G * B, H, H),
            k_xa.reshape(G * B, H),
            k_xx.reshape(G * B),
            m_a.reshape(G * B, H),
            s_a.reshape(G * B, H),
            W_a.reshape(G * B, H, self.rank),
            with_kl=with_kl,
            kl_rows=kl_rows,
        )
        kl = kl.reshape(*batch, -1) if kl is not None else None
        return mean.reshape(*batch, B), var.reshape(*batch, B), kl

    def elbo(self, X: Tensor, y: Tensor, num_data: int) -> Tensor:
        """Minibatch estimate of the ELBO divided by ``num_data`` (a per-datum mean).

        .. math::
            \\frac{\\mathcal L}{N} \\approx \\frac{1}{|B|}\\sum_{i\\in B}
            \\mathbb E_{q(f_i)}[\\log p(y_i\\mid f_i)]
            - \\frac{1}{N}\\,\\frac{1}{|B|}\\sum_{i\\in B}
            \\mathrm{KL}\\big(N(m_{a_i}, S_{a_i a_i})\\,\\|\\,N(0, K_{a_i a_i})\\big)

        The KL average is taken over ``kl_subsample`` points of the batch drawn uniformly
        (all of them when ``kl_subsample`` is None or the batch is no larger).

        Parameters
        ----------
        X : Tensor, shape (B, d) or ``(*batch_shape, B, d)``
        y : Tensor, shape (B,), (B, 1) or ``(*batch_shape, B)``
        num_data : int
            Training-set size ``N``.

        Returns
        -------
        Tensor, shape batch_shape
            One value per GP (shape () without a batch).
        """
        X = self._check_X(X)
        y = self._check_y(y, X)
        _check_positive_int(num_data, "num_data")
        B = X.shape[-2]
        kl_rows = None
        if self.kl_subsample is not None and B > self.kl_subsample:
            # A uniform subsample of the batch: an unbiased estimate of the averaged KL.
            kl_rows = torch.randperm(B, device=X.device)[: self.kl_subsample]
        mean, var, kl = self._moments(X, with_kl=True, kl_rows=kl_rows)
        dist = MultivariateNormal(mean, DiagLinearOperator(var.clamp_min(0)))
        expected = self.likelihood.expected_log_prob(y, dist)
        return expected.mean(-1) - kl.mean(-1) / num_data

    def make_optimizer(
        self, lr: float = 0.05, variational_lr: float | None = None
    ) -> torch.optim.Adam:
        """The Adam optimiser :meth:`fit` uses: kernel, likelihood and ``Z`` at ``lr``; ``m``,
        ``s`` and ``W`` at ``variational_lr`` (default ``lr``)."""
        for name, value in (("lr", lr), ("variational_lr", variational_lr)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive float, got {value!r}")
        variational = [self.variational_mean, self.raw_variational_diag, self.variational_factor]
        ids = {id(p) for p in variational}
        others = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": others, "lr": lr}, {"params": variational, "lr": variational_lr or lr}]
        return torch.optim.Adam(groups)

    def fit(
        self,
        X: Tensor,
        y: Tensor,
        epochs: int = 10,
        batch_size: int = 1024,
        lr: float = 0.05,
        *,
        variational_lr: float | None = None,
        generator: torch.Generator | None = None,
        verbose: bool = False,
    ) -> list[float]:
        """Minibatch training of all parameters with Adam on ``-elbo``.

        Parameters
        ----------
        X : Tensor, shape (N, d) or ``(*batch_shape, N, d)``
        y : Tensor, shape (N,), (N, 1) or ``(*batch_shape, N)``
            With a batch of GPs, every GP sees the same minibatch positions at each step.
        epochs : int, default 10
        batch_size : int, default 1024
        lr : float, default 0.05
            Adam step size of the kernel, likelihood and inducing inputs (a larger step than
            gpytorch's usual 0.01: the unwhitened ``m`` lives on the scale of ``f`` and each
            entry only sees the points near it, so small steps leave it far from converged
            after a few epochs).
        variational_lr : float, optional
            Adam step size of ``m``, ``s`` and ``W``; default ``lr``.
        generator : torch.Generator, optional
            Source of the minibatch order (on CPU).
        verbose : bool, default False
            Show a tqdm progress bar with the current loss.

        Returns
        -------
        list of float
            Loss (``-elbo``, summed over a batch of GPs) of every step.
        """
        X = self._check_X(X)
        y = self._check_y(y, X)
        _check_positive_int(epochs, "epochs")
        _check_positive_int(batch_size, "batch_size")
        optimizer = self.make_optimizer(lr, variational_lr)
        n = X.shape[-2]
        steps_per_epoch = math.ceil(n / batch_size)
        losses: list[float] = []
        self.train()
        with tqdm(total=epochs * steps_per_epoch, desc="swsgp", disable=not verbose) as bar:
            for _ in range(epochs):
                order = torch.randperm(n, generator=generator).to(X.device)
                for start in range(0, n, batch_size):
                    batch = order[start : start + batch_size]
                    optimizer.zero_grad(set_to_none=True)
                    loss = -self.elbo(X[..., batch, :], y[..., batch], n).sum()
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
                    bar.update()
        self.eval()
        return losses

    def posterior(
        self, X: Tensor, joint: bool = False, observation_noise: bool = False
    ) -> GaussianPosterior:
        """Predictive ``q(f)`` at ``X`` (or of ``y`` with ``observation_noise=True``).

        Marginal (``joint=False``): each point uses its own ``H`` neighbours, exactly the
        ``q(f(x_i))`` of the training objective; points are processed in chunks of
        ``chunk_size`` (bounded memory for any ``n``).

        Joint (``joint=True``): with ``U`` the union of the neighbour sets of all rows of ``X``
        (per GP), the joint of ``f(X)`` under ``q(u_U) = N(m_U, S_UU)`` (the exact marginal of
        ``q(u)`` on ``U``) and the GP prior's conditional ``p(f(X) | u_U)``::

            mean = A m_U,  cov = K_XX - K_XU K_UU^-1 K_UX + A S_UU A^T,  A = K_XU K_UU^-1

        (``K_UU`` with the jitter), i.e. SVGP's predictive with inducing set ``U``; positive
        semi-definite by construction, and with ``H = M`` it is SVGP's joint. Its diagonal
        equals the marginal (``joint=False``) variance when all rows share one neighbour set
        (e.g. ``n = 1`` or ``H = M``); otherwise each point is conditioned on the larger set
        ``U`` instead of its own ``H`` neighbours (the approximation made for the joint).
        Cost ``O(|U|^3 + n |U|^2 + n^2 |U|)`` with ``|U| <= min(M, n H)``, no chunking: meant
        for moderate ``n``. A batch of GPs pads the unions to the largest one (padding slots
        decouple exactly: unit prior block, zero cross-covariance and zero ``q``).

        The result is differentiable with respect to ``X`` when ``X`` requires grad (the
        neighbour selection itself is piecewise constant); the model's parameters get no
        gradient through it (train with :meth:`elbo`).

        Parameters
        ----------
        X : Tensor, shape (n, d) or ``(*batch_shape, n, d)``
        joint : bool, default False
            Return the joint covariance (n, n) per GP instead of marginal variances.
        observation_noise : bool, default False
            Add the Gaussian likelihood's noise variance (Gaussian likelihood only).

        Returns
        -------
        GaussianPosterior
            Mean of shape ``(*batch_shape, n, 1)`` with variance of the same shape, or
            covariance ``(*batch_shape, n, n)`` when ``joint``.
        """
        X = self._check_X(X)
        if observation_noise and not isinstance(self.likelihood, GaussianLikelihood):
            raise ValueError(
                "observation_noise=True needs a Gaussian likelihood; use the latent posterior "
                f"with {type(self.likelihood).__name__}"
            )
        # A graph is kept only for gradients with respect to X (e.g. acquisition functions);
        # otherwise each chunk's intermediates are freed at once (bounded memory for any n).
        with torch.set_grad_enabled(torch.is_grad_enabled() and X.requires_grad):
            if joint:
                mean, cov = self._joint(X)
                post = GaussianPosterior(mean.unsqueeze(-1), covariance=cov)
            else:
                means, variances = [], []
                for start in range(0, X.shape[-2], self.chunk_size):
                    chunk = X[..., start : start + self.chunk_size, :]
                    mean, var, _ = self._moments(chunk, with_kl=False)
                    means.append(mean)
                    variances.append(var.clamp_min(0))
                mean = torch.cat(means, dim=-1).unsqueeze(-1)
                var = torch.cat(variances, dim=-1).unsqueeze(-1)
                post = GaussianPosterior(mean, variance=var)
        if observation_noise:
            noise = self.likelihood.noise  # (*batch_shape, 1) or (1,)
            noise = noise.reshape(()) if noise.numel() == 1 else noise.unsqueeze(-1)
            post = post.add_observation_noise(noise)  # broadcast over (..., n, 1)
        return post

    def _joint(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """Mean (*batch, n) and covariance (*batch, n, n) of the union-neighbourhood joint."""
        Z, jitter = self.inducing_points, self._jitter_value()
        idx = nearest_inducing(X, Z, self.num_neighbors, method=self.neighbor_method)
        M = Z.shape[-2]
        in_union = torch.zeros(*idx.shape[:-2], M, dtype=torch.bool, device=Z.device)
        in_union.scatter_(-1, idx.flatten(-2), True)
        size = in_union.sum(-1)  # |U| per GP
        # U's indices first (ascending), then the other indices as padding up to max |U|.
        order = torch.argsort((~in_union).to(torch.int8), dim=-1, stable=True)
        order = order[..., : int(size.max())]
        valid = torch.arange(order.shape[-1], device=Z.device) < size.unsqueeze(-1)
        both = valid.unsqueeze(-1) & valid.unsqueeze(-2)
        eye = torch.eye(order.shape[-1], dtype=Z.dtype, device=Z.device)
        Z_U = Z.gather(-2, order.unsqueeze(-1).expand(*order.shape, Z.shape[-1]))
        K_UU = torch.where(both, _dense(self.kernel(Z_U, Z_U)) + jitter * eye, eye)
        K_XU = _dense(self.kernel(X, Z_U)) * valid.unsqueeze(-2)
        K_XX = _dense(self.kernel(X, X))
        m_U = self.variational_mean.gather(-1, order) * valid
        s_U = self.variational_diag.gather(-1, order) * valid
        W = self.variational_factor
        W_U = W.gather(-2, order.unsqueeze(-1).expand(*order.shape, W.shape[-1]))
        W_U = W_U * valid.unsqueeze(-1)
        L = fast_cholesky(K_UU)
        V = torch.linalg.solve_triangular(L, K_XU.mT, upper=False)  # L^-1 K_UX
        A = torch.linalg.solve_triangular(L.mT, V, upper=True).mT  # K_XU K_UU^-1
        AW = A @ W_U
        cov = K_XX - V.mT @ V + (A * s_U.unsqueeze(-2)) @ A.mT + AW @ AW.mT
        mean = (A @ m_U.unsqueeze(-1)).squeeze(-1)
        return mean, 0.5 * (cov + cov.mT)

    def extra_repr(self) -> str:
        return (
            f"num_inducing={self.num_inducing}, num_neighbors={self.num_neighbors}, "
            f"rank={self.rank}, neighbor_method={self.neighbor_method!r}, "
            f"batch_shape={tuple(self.batch_shape)}"
        )

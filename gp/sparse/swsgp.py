"""``SWSGP``: sparse-within-sparse variational GP (Tran, Milios, Michiardi, Filippone, ICML 2021).

Each input ``x`` depends only on its ``H`` nearest inducing inputs ``a(x)`` out of ``M``:
``p(f(x) | u) = N(k_xa K_aa^-1 u_a, k_xx - k_xa K_aa^-1 k_ax)``, so a step costs O(B H^3)
plus the neighbour search instead of SVGP's O(B M^2 + M^3), and ``M`` can be tens of
thousands.

``q(u) = N(m, S)`` with ``S = diag(s) + W W^T`` (``W`` of shape ``(M, r)``), unwhitened:
every marginal block ``S_aa = diag(s_a) + W_a W_a^T`` is exact and costs O(H^2 r), memory
O(M r); no ``M x M`` factorisation is ever formed. The KL term is the average over the
minibatch of ``KL(N(m_a(i), S_aa(i)) || N(0, K_aa(i)))`` (optionally on a uniform subsample
of the batch); with ``H = M`` it is exactly SVGP's global KL. Neighbours are recomputed from
the current ``Z`` at every call (no gradient through the selection), see
:mod:`gp.sparse._swsgp_neighbors`. The method and its choices are described in the user
guide (Gaussian processes, "Sparse-within-sparse GPs").

Batches of independent GPs (``batch_shape``, as in :class:`gp.SVGP`): every GP has its own
kernel hyperparameters (a gpytorch kernel built with that ``batch_shape``), inducing inputs,
``q(u)`` and neighbour sets; their ``(B, H, H)`` blocks are stacked into one ``(G B, H, H)``
batch for the local algebra.
"""

from __future__ import annotations

import math

import torch
from gpytorch.constraints import Positive
from gpytorch.distributions import MultivariateNormal
from gpytorch.kernels import Kernel
from gpytorch.likelihoods import GaussianLikelihood, Likelihood
from linear_operator.operators import DiagLinearOperator
from torch import Tensor, nn

from bdl.core.model import Model, cast_posterior
from bdl.core.posterior import GaussianPosterior
from bdl.core.validation import check_int, check_positive
from gp.sparse._fit import fit_minibatches, unpack_data
from gp.sparse._precision import call_promoted
from gp.sparse._swsgp_checks import (
    check_swsgp_args,
    check_swsgp_inputs,
    check_swsgp_targets,
    cross_blocks,
    dense,
    gather_rows,
    swsgp_likelihood,
)
from gp.sparse._swsgp_joint import rescale_to_variances, union_covariances
from gp.sparse._swsgp_kernel import block_covariance
from gp.sparse._swsgp_local import fast_cholesky, local_moments_and_kl
from gp.sparse._swsgp_neighbors import nearest_inducing

__all__ = ["SWSGP"]

DEFAULT_JITTER = 1e-4


class SWSGP(nn.Module, Model):
    """Sparse-within-sparse variational GP with a diagonal-plus-low-rank ``q(u)``.

    Usage::

        model = SWSGP(ScaleKernel(RBFKernel()), Z, num_neighbors=32, rank=4)
        model.fit((X, y), epochs=2, batch_size=1024)            # losses in model.history_
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
        Observation model (:func:`gp.likelihoods.make_likelihood`; the Gaussian noise
        variance is bounded below by :data:`gp.likelihoods.NOISE_LOWER_BOUND`); non-Gaussian
        ones use gpytorch's Gauss-Hermite quadrature.
    learn_inducing_locations : bool, default True
        Whether ``Z`` is a trained parameter.
    jitter : float, optional
        Added to the diagonal of every ``K_aa`` (so the prior is ``N(0, K_ZZ + jitter I)``);
        default 1e-4 in every dtype (gpytorch's float32 variational jitter). Inducing inputs
        that are dense relative to the lengthscale make ``K_aa`` ill-conditioned, and the
        unwhitened ``m`` then optimises badly; the nugget keeps ``beta = K_aa^-1 k_ax``
        bounded.
    init_variance : float, optional
        A constant initial diagonal ``s`` of ``S``; default: the conditional prior variance of
        each inducing variable given its neighbours (see
        :meth:`reset_variational_covariance`). ``W`` starts at small random values.
    neighbor_method : {"auto", "brute", "kdtree", "grid"}, default "auto"
        Neighbour search, see :func:`gp.sparse._swsgp_neighbors.nearest_inducing`.
    chunk_size : int, default 4096
        Points per chunk in :meth:`posterior` (bounded memory for any ``n``).
    kl_subsample : int or None, default 128
        In :meth:`elbo`, the averaged KL term is estimated on this many points of the batch
        drawn uniformly from torch's global generator (unbiased; the ``H x H`` inverses it
        needs are the costliest part of a step; a batch of GPs uses the same row positions
        for every GP). ``None`` uses every point of the batch (deterministic ELBO).
    batch_shape : tuple of int, default ()
        Shape of a batch of independent GPs. Training inputs are then ``(n, d)`` (shared by
        all GPs) or ``(*batch_shape, n, d)``, targets ``(*batch_shape, n)`` (or ``(n,)``
        shared), and :meth:`elbo` returns one value per GP. A string
        ``likelihood="gaussian"`` gets one noise variance per GP.

    Attributes
    ----------
    inducing_points : Parameter, shape ``(*batch_shape, M, d)``
    variational_mean : Parameter, shape ``(*batch_shape, M)``
        ``m``.
    raw_variational_diag : Parameter, shape ``(*batch_shape, M)``
        ``s = softplus(raw_variational_diag)`` (gpytorch ``Positive`` constraint
        ``raw_variational_diag_constraint``).
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
        batch_shape, inducing_points = check_swsgp_args(
            kernel, inducing_points, batch_shape, num_neighbors, rank, jitter=jitter,
            init_variance=init_variance, neighbor_method=neighbor_method,
            chunk_size=chunk_size, kl_subsample=kl_subsample,
        )  # fmt: skip
        likelihood = swsgp_likelihood(likelihood, batch_shape)
        M = inducing_points.shape[-2]
        factory = {"dtype": inducing_points.dtype, "device": inducing_points.device}
        self._batch_shape = batch_shape
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
        self.raw_variational_diag_constraint = Positive().to(**factory)
        self.variational_factor = nn.Parameter(torch.zeros(*batch_shape, M, rank, **factory))
        self.reset_variational_covariance(init_variance)

    # -- basic quantities --------------------------------------------------------------------
    @property
    def batch_shape(self) -> torch.Size:
        """Shape of the batch of independent GPs."""
        return self._batch_shape

    @property
    def num_outputs(self) -> int:
        return 1

    @property
    def num_inducing(self) -> int:
        return self.inducing_points.shape[-2]

    @property
    def variational_diag(self) -> Tensor:
        """``s``, shape ``(*batch_shape, M)``."""
        return self.raw_variational_diag_constraint.transform(self.raw_variational_diag)

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
                Z_b = gather_rows(Z, idx)
                K_bb = block_covariance(self.kernel, Z_b, self._jitter_value())
                K_inv_diag = torch.cholesky_inverse(fast_cholesky(K_bb)).diagonal(dim1=-2, dim2=-1)
                own = torch.arange(start, start + Zc.shape[-2], device=Z.device).unsqueeze(-1)
                pos = (idx == own).to(torch.long).argmax(-1, keepdim=True)  # 0 if absent
                parts.append(1.0 / K_inv_diag.gather(-1, pos).squeeze(-1))
            s0 = torch.cat(parts, dim=-1)
        else:
            s0 = torch.full_like(self.raw_variational_diag, float(init_variance))
        tiny = torch.finfo(Z.dtype).tiny
        raw = self.raw_variational_diag_constraint.inverse_transform(s0.clamp_min(tiny))
        self.raw_variational_diag.copy_(raw)
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
        """Validated training inputs, shape ``(*batch_shape, n, d)``, in the model's dtype."""
        return check_swsgp_inputs(X, self.inducing_points, self._batch_shape, exact=True)

    def _check_y(self, y: object, X: Tensor) -> Tensor:
        """Validated targets, shape ``(*batch_shape, n)`` (a shared (n,) is expanded)."""
        return check_swsgp_targets(y, X, self._batch_shape)

    # -- core -------------------------------------------------------------------------------
    def neighbors(self, X: Tensor) -> Tensor:
        """Indices of the ``H`` nearest inducing inputs of each row of ``X`` (into each GP's own
        inducing inputs), shape ``(*batch_shape, n, H)``."""
        return self._nearest(self._check_X(X))

    def _nearest(self, X: Tensor) -> Tensor:
        Z, H = self.inducing_points, self.num_neighbors
        return nearest_inducing(X, Z, H, method=self.neighbor_method)

    def _moments(
        self, X: Tensor, with_kl: bool, kl_rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        # X (*batch, B, d); kl_rows (k,) row positions, the same for every GP of a batch.
        idx = self._nearest(X)
        Z_a = gather_rows(self.inducing_points, idx)  # (*batch, B, H, d)
        K_aa = block_covariance(self.kernel, Z_a, self._jitter_value())
        k_xa = cross_blocks(self.kernel, X, Z_a)  # (*batch, B, H)
        k_xx = dense(self.kernel(X, X, diag=True))  # (*batch, B)
        m_a = gather_rows(self.variational_mean, idx)
        s_a = gather_rows(self.variational_diag, idx)
        W_a = gather_rows(self.variational_factor, idx)
        if not self._batch_shape:
            return local_moments_and_kl(
                K_aa, k_xa, k_xx, m_a, s_a, W_a, with_kl=with_kl, kl_rows=kl_rows
            )
        # Stack the GPs' blocks into one (G B, H, H) batch for the local algebra.
        batch, B, H = self._batch_shape, X.shape[-2], idx.shape[-1]
        G = batch.numel()
        if with_kl and kl_rows is not None:
            kl_rows = (torch.arange(G, device=X.device).unsqueeze(-1) * B + kl_rows).reshape(-1)
        mean, var, kl = local_moments_and_kl(
            K_aa.reshape(G * B, H, H), k_xa.reshape(G * B, H), k_xx.reshape(G * B),
            m_a.reshape(G * B, H), s_a.reshape(G * B, H), W_a.reshape(G * B, H, self.rank),
            with_kl=with_kl, kl_rows=kl_rows,
        )  # fmt: skip
        kl = kl.reshape(*batch, -1) if kl is not None else None
        return mean.reshape(*batch, B), var.reshape(*batch, B), kl

    def _elbo(self, X: Tensor, y: Tensor, num_data: int) -> Tensor:
        """Per-datum ELBO of validated data (see :meth:`elbo`)."""
        B = X.shape[-2]
        kl_rows = None
        if self.kl_subsample is not None and B > self.kl_subsample:
            # A uniform subsample of the batch: an unbiased estimate of the averaged KL.
            kl_rows = torch.randperm(B, device=X.device)[: self.kl_subsample]
        mean, var, kl = self._moments(X, with_kl=True, kl_rows=kl_rows)
        dist = MultivariateNormal(mean, DiagLinearOperator(var.clamp_min(0)))
        expected = self.likelihood.expected_log_prob(y, dist)
        return expected.mean(-1) - kl.mean(-1) / num_data

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
        return self._elbo(X, y, check_int("num_data", num_data))

    def make_optimizer(
        self, lr: float = 0.05, variational_lr: float | None = None
    ) -> torch.optim.Adam:
        """The Adam optimiser :meth:`fit` uses: kernel, likelihood and ``Z`` at ``lr``; ``m``,
        ``s`` and ``W`` at ``variational_lr`` (default ``lr``)."""
        check_positive("lr", lr)
        if variational_lr is not None:
            check_positive("variational_lr", variational_lr)
        variational = [self.variational_mean, self.raw_variational_diag, self.variational_factor]
        ids = {id(p) for p in variational}
        others = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": others, "lr": lr}, {"params": variational, "lr": variational_lr or lr}]
        return torch.optim.Adam(groups)

    def fit(
        self,
        data: tuple[Tensor, Tensor],
        *,
        epochs: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        verbose: bool = False,
        variational_lr: float | None = None,
    ) -> SWSGP:
        """Minibatch training of all parameters with Adam on ``-elbo`` (the per-datum ELBO),
        through :func:`bdl.core.training.train`.

        Parameters
        ----------
        data : tuple (X, y)
            ``X`` of shape (N, d) or ``(*batch_shape, N, d)`` and ``y`` of shape (N,), (N, 1)
            or ``(*batch_shape, N)``. With a batch of GPs, every GP sees the same minibatch
            positions at each step.
        epochs : int, default 10
        lr : float, default 0.05
            Adam step size of the kernel, likelihood and inducing inputs (a larger step than
            gpytorch's usual 0.01: the unwhitened ``m`` lives on the scale of ``f`` and each
            entry only sees the points near it, so small steps leave it far from converged
            after a few epochs).
        batch_size : int, default 1024
        seed : int, optional
            Seed of the minibatch order (None: a fresh one). The KL subsample of each step
            (``kl_subsample``) draws from torch's global generator.
        verbose : bool, default False
            Show a tqdm progress bar with the loss.
        variational_lr : float, optional
            Adam step size of ``m``, ``s`` and ``W``; default ``lr``.

        Returns
        -------
        SWSGP
            ``self``, with ``history_`` (``-elbo`` per epoch, mean over its steps, summed over
            a batch of GPs) and ``step_losses_`` (``-elbo`` of every step).
        """
        X, y = unpack_data(data)
        X = self._check_X(X)
        y = self._check_y(y, X)
        epochs = check_int("epochs", 10 if epochs is None else epochs)
        batch_size = check_int("batch_size", 1024 if batch_size is None else batch_size)
        optimizer = self.make_optimizer(0.05 if lr is None else lr, variational_lr)
        n = X.shape[-2]
        self.history_, self.step_losses_ = fit_minibatches(
            self, lambda xb, yb: -self._elbo(xb, yb, n).sum(), [optimizer], X, y,
            epochs=epochs, batch_size=batch_size, seed=seed, verbose=verbose, desc="swsgp",
        )  # fmt: skip
        return self

    def posterior(
        self, X: Tensor, *, observation_noise: bool = False, joint: bool = False
    ) -> GaussianPosterior:
        """Predictive ``q(f)`` at ``X`` (or of ``y`` with ``observation_noise=True``).

        Marginal (``joint=False``): each point uses its own ``H`` neighbours, exactly the
        ``q(f(x_i))`` of the training objective; points are processed in chunks of
        ``chunk_size`` (bounded memory for any ``n``).

        Joint (``joint=True``): the marginal means and variances above, with the correlations
        of the joint over the union ``U`` of the neighbour sets of the rows of ``X`` (per GP
        and per batch of ``X``). That union joint is the joint of ``f(X)`` under ``q(u_U)``
        (the exact marginal of ``q(u)`` on ``U``) and the GP prior's conditional
        ``p(f(X) | u_U)``, i.e. SVGP's predictive with inducing set ``U`` (see
        :func:`gp.sparse._swsgp_joint.union_joint`); it conditions each point on ``U`` rather
        than on its own ``H`` neighbours, so its own means and variances differ from the
        marginals when ``H < M``. With ``R`` its correlation matrix and ``D`` the diagonal of
        marginal variances, the joint is ``N(mean, D^{1/2} R D^{1/2})``: positive
        semi-definite by construction, its diagonal and mean are exactly the marginals (so
        joint draws, e.g. ``sample_y`` of the estimator, have the spread of the marginal
        predictive), and with ``H = M`` it is SVGP's joint. Cost
        ``O(|U|^3 + n |U|^2 + n^2 |U|)`` with ``|U| <= min(M, n H)``, plus the marginals; no
        chunking: meant for moderate ``n``.

        The result is differentiable with respect to ``X`` when ``X`` requires grad (the
        neighbour selection itself is piecewise constant); the model's parameters get no
        gradient through it (train with :meth:`elbo`).

        Parameters
        ----------
        X : Tensor, shape (..., n, d)
            Leading dims broadcast with ``batch_shape``. Computed in the promoted dtype of
            ``X`` and the parameters (a float32 model answers float64 inputs with float64
            accuracy); the posterior is returned in ``X``'s dtype.
        observation_noise : bool, default False
            Add the Gaussian likelihood's noise variance (Gaussian likelihood only).
        joint : bool, default False
            Return the joint covariance (n, n) per GP instead of marginal variances.

        Returns
        -------
        GaussianPosterior
            Mean of shape ``(..., n, 1)`` with variance of the same shape, or covariance
            ``(..., n, n)`` when ``joint``.
        """
        dtype = X.dtype if isinstance(X, Tensor) else None
        if observation_noise and not isinstance(self.likelihood, GaussianLikelihood):
            raise ValueError(
                "observation_noise=True needs a Gaussian likelihood; use the latent posterior "
                f"with {type(self.likelihood).__name__}"
            )
        post = call_promoted(self, X, self._posterior, observation_noise, joint)
        return cast_posterior(post, dtype)

    def _posterior(self, X: Tensor, observation_noise: bool, joint: bool) -> GaussianPosterior:
        """:meth:`posterior` in the parameters' dtype."""
        X = check_swsgp_inputs(X, self.inducing_points, self._batch_shape, exact=False)
        # A graph is kept only for gradients with respect to X (e.g. acquisition functions);
        # otherwise each chunk's intermediates are freed at once (bounded memory for any n).
        with torch.set_grad_enabled(torch.is_grad_enabled() and X.requires_grad):
            post = self._joint_posterior(X) if joint else self._marginal_posterior(X)
        if observation_noise:
            noise = self.likelihood.noise  # (*batch_shape, 1) or (1,)
            noise = noise.reshape(()) if noise.numel() == 1 else noise.unsqueeze(-1)
            post = post.add_observation_noise(noise)  # broadcast over (..., n, 1)
        return post

    def _as_model_batch(self, X: Tensor) -> tuple[Tensor, torch.Size]:
        """``X`` (..., n, d) as ``(E, *batch_shape, n, d)``, with the output batch shape."""
        out = torch.broadcast_shapes(X.shape[:-2], self._batch_shape)
        n, d = X.shape[-2:]
        return X.expand(*out, n, d).reshape(-1, *self._batch_shape, n, d), out

    def _marginal_posterior(self, X: Tensor) -> GaussianPosterior:
        Xe, out = self._as_model_batch(X)
        E, n, d = Xe.shape[0], X.shape[-2], X.shape[-1]
        flat = Xe.movedim(0, -3).reshape(*self._batch_shape, E * n, d)
        means, variances = [], []
        for start in range(0, E * n, self.chunk_size):
            chunk = flat[..., start : start + self.chunk_size, :]
            mean, var, _ = self._moments(chunk, with_kl=False)
            means.append(mean)
            variances.append(var.clamp_min(0))

        def unflatten(values: list[Tensor]) -> Tensor:
            values = torch.cat(values, dim=-1).reshape(*self._batch_shape, E, n)
            return values.movedim(-2, 0).reshape(*out, n, 1)

        return GaussianPosterior(unflatten(means), variance=unflatten(variances))

    def _joint_posterior(self, X: Tensor) -> GaussianPosterior:
        marginal = self._marginal_posterior(X)  # the joint's mean and variances
        Xe, out = self._as_model_batch(X)
        q = (self.variational_mean, self.variational_diag, self.variational_factor)
        Z, jitter = self.inducing_points, self._jitter_value()
        cov = union_covariances(self.kernel, Xe, Z, self._nearest, q, jitter)
        cov = cov.reshape(*out, *cov.shape[-2:])
        cov = rescale_to_variances(cov, marginal.variance.squeeze(-1))  # keeps correlations
        return GaussianPosterior(marginal.mean, covariance=cov)

    def extra_repr(self) -> str:
        return (
            f"num_inducing={self.num_inducing}, num_neighbors={self.num_neighbors}, "
            f"rank={self.rank}, neighbor_method={self.neighbor_method!r}, "
            f"batch_shape={tuple(self.batch_shape)}"
        )

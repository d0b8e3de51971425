"""``SVGP``: sparse variational GP (Hensman et al. 2013, 2015) on gpytorch's whitened
``VariationalStrategy``, trained by minibatches with natural gradients for q(u)."""

from __future__ import annotations

import math

import torch
from gpytorch.distributions import MultivariateNormal
from gpytorch.kernels import Kernel, RBFKernel, ScaleKernel
from gpytorch.likelihoods.likelihood import Likelihood
from gpytorch.means import ConstantMean, ZeroMean
from gpytorch.models import ApproximateGP
from gpytorch.optim import NGD
from gpytorch.settings import num_likelihood_samples
from gpytorch.variational import (
    CholeskyVariationalDistribution,
    IndependentMultitaskVariationalStrategy,
    NaturalVariationalDistribution,
    VariationalStrategy,
)
from gpytorch.variational._variational_distribution import _VariationalDistribution
from linear_operator.operators import CholLinearOperator, DiagLinearOperator
from torch import Tensor, nn
from tqdm.auto import tqdm

from bdl.core.linalg import psd_safe_cholesky
from bdl.core.validation import check_int, check_positive
from bdl.core.posterior import GaussianPosterior
from gp.sparse._whitened import whitened_marginal_updates
from gp.sparse.initialisation import nearest_neighbour_noise_variance, select_inducing_points
from gp.likelihoods import likelihood_kind, make_likelihood

__all__ = ["SVGP"]

_MEANS = ("constant", "zero")
#: marginal predictions are computed in chunks of this many points (memory O(chunk * M))
PREDICT_CHUNK = 8192
_LOG_2PI = math.log(2.0 * math.pi)


class _VariationalGP(ApproximateGP):
    """The gpytorch model: prior mean and kernel, whitened strategy over ``q(u)``."""

    def __init__(
        self,
        inducing_points: Tensor,
        mean_module: nn.Module,
        covar_module: Kernel,
        variational_distribution: _VariationalDistribution,
        learn_inducing: bool,
        jitter: float | None,
        num_classes: int | None,
    ) -> None:
        strategy = VariationalStrategy(
            self, inducing_points, variational_distribution,
            learn_inducing_locations=learn_inducing, jitter_val=jitter,
        )  # fmt: skip
        if num_classes is not None:  # one latent GP per class, stacked on the last dim
            strategy = IndependentMultitaskVariationalStrategy(strategy, num_classes, task_dim=-1)
        super().__init__(strategy)
        self.mean_module = mean_module
        self.covar_module = covar_module

    def forward(self, x: Tensor) -> MultivariateNormal:
        return MultivariateNormal(self.mean_module(x), self.covar_module(x))


class SVGP(nn.Module):
    """Sparse variational GP with a whitened Gaussian ``q(u)`` over ``M`` inducing values.

    Model: ``f ~ GP(mu, k)``, ``u = f(Z)``, ``y_i | f_i ~ p(y_i | f_i)``; the approximation is
    ``q(f, u) = p(f | u) q(u)`` with ``u = L v`` (``L L^T = K_ZZ``, whitening) and
    ``q(v) = N(m, S)``, so that

    .. math::
        q(f_i) = N\\big(\\mu(x_i) + a_i^\\top m,\\; k_{ii} + a_i^\\top (S - I) a_i\\big),
        \\qquad a_i = L^{-1} k_{Z x_i}

    (Hensman, Matthews, Ghahramani 2015, eq. 6 in whitened form). The parameters live in a
    gpytorch ``ApproximateGP`` with a whitened ``VariationalStrategy`` (attribute ``gp``; for
    the softmax likelihood wrapped in ``IndependentMultitaskVariationalStrategy``), so
    ``model.gp(X)`` is a regular gpytorch model. The training objective is computed from the
    same parameters without gpytorch's lazy-tensor layer: the marginals of ``q(f)`` by a fused
    function with an analytic backward pass (:mod:`gp.sparse._whitened`), a closed-form KL and
    closed-form expected log-likelihoods where they exist (Gaussian, Poisson); it equals gpytorch's
    ``VariationalELBO`` times ``num_data`` (tested).

    Usage::

        model = SVGP.from_data(X, y, num_inducing=256)       # k-means++ Z, data-scaled init
        model.fit(X, y, epochs=2, batch_size=1024)            # NGD for q(u), Adam for the rest
        post = model.posterior(X_test)                         # GaussianPosterior (n, 1)

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel
        Prior covariance; for independent GPs in a batch give it ``batch_shape`` (and for the
        softmax likelihood ``batch_shape + (num_classes,)`` for one kernel per class).
    inducing_points : Tensor, shape (M, d) or ``(*batch_shape, M, d)``
        Initial inducing inputs ``Z`` (copied); see :func:`select_inducing_points`. The whole
        module (kernel and likelihood included) is moved to their dtype and device.
    likelihood : {"gaussian", "bernoulli", "poisson", "softmax"} or gpytorch Likelihood
        Observation model (:func:`gp.likelihoods.make_likelihood`). Bernoulli uses the
        probit link and labels in {0, 1}; Poisson a log link; softmax one latent GP per class.
    num_classes : int, optional
        Number of classes for ``"softmax"``.
    mean : {"constant", "zero"}, default "constant"
        Prior mean: a learned constant (gpytorch ``ConstantMean``) or zero.
    batch_shape : tuple of int, default ()
        Shape of a batch of independent GPs; the data then have shape
        ``(*batch_shape, n, d)`` and every method returns one result per GP.
    learn_inducing : bool, default True
        Optimise ``Z`` (else it is a buffer).
    natural_gradients : bool, default True
        Parameterise ``q(v)`` by natural parameters (``NaturalVariationalDistribution``) and
        train it with natural gradients (``gpytorch.optim.NGD``); otherwise use a Cholesky
        parameterisation trained with Adam like every other parameter.
    noise : float, optional
        Initial noise variance of the Gaussian likelihood (gpytorch's default if omitted).
    jitter : float, optional
        Added to the diagonal of ``K_ZZ`` (and of ``k_ii``, as gpytorch does); default
        gpytorch's ``variational_cholesky_jitter`` (1e-4 in float32, 1e-6 in float64).

    Notes
    -----
    Computations run in the parameters' dtype (cast with ``.double()`` for float64); the
    Cholesky factor of ``K_ZZ`` is always computed in float64, as gpytorch does.
    """

    def __init__(
        self,
        kernel: Kernel,
        inducing_points: Tensor,
        likelihood: str | Likelihood = "gaussian",
        *,
        num_classes: int | None = None,
        mean: str = "constant",
        batch_shape: torch.Size | tuple[int, ...] = torch.Size(),
        learn_inducing: bool = True,
        natural_gradients: bool = True,
        noise: float | None = None,
        jitter: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(kernel, Kernel):
            raise TypeError(f"kernel must be a gpytorch Kernel, got {type(kernel).__name__}")
        if mean not in _MEANS:
            raise ValueError(f"mean must be one of {_MEANS}, got {mean!r}")
        if jitter is not None:
            check_positive("jitter", jitter, allow_zero=True)
        self.batch_shape = torch.Size(batch_shape)
        self.likelihood = make_likelihood(likelihood, num_classes, self.batch_shape)
        self.kind = likelihood_kind(self.likelihood)
        if self.kind == "softmax":
            num_classes = self.likelihood.num_classes
        self.num_classes = num_classes
        Z = self._check_inducing(inducing_points)
        latent = self.batch_shape + ((num_classes,) if num_classes is not None else ())
        if num_classes is not None:  # separate inducing inputs per class
            Z = Z.unsqueeze(-3).expand(*self.batch_shape, num_classes, *Z.shape[-2:])
        self.natural_gradients = bool(natural_gradients)
        dist_cls = (
            NaturalVariationalDistribution if natural_gradients else CholeskyVariationalDistribution
        )
        dist = dist_cls(Z.shape[-2], batch_shape=latent)
        mean_module = ConstantMean(batch_shape=latent) if mean == "constant" else ZeroMean()
        self.gp = _VariationalGP(
            Z.contiguous(), mean_module, kernel, dist, bool(learn_inducing), jitter, num_classes
        )
        # q(v) starts at the prior N(0, I); mark it initialised so that gpytorch never
        # re-initialises it on a first call of self.gp(X).
        self._strategy.variational_params_initialized.fill_(1)
        self.to(dtype=Z.dtype, device=Z.device)  # the module follows the inducing points
        if noise is not None:
            if self.kind != "gaussian":
                raise ValueError(f"noise is only used with a Gaussian likelihood, not {self.kind}")
            self.noise = noise

    # -- structure ------------------------------------------------------------------------
    def _check_inducing(self, Z: object) -> Tensor:
        if not isinstance(Z, Tensor):
            raise TypeError(f"inducing_points must be a tensor, got {type(Z).__name__}")
        if Z.dim() == 1:
            Z = Z.unsqueeze(-1)
        if Z.dim() < 2 or Z.shape[-2] == 0 or Z.shape[-1] == 0 or not Z.is_floating_point():
            raise ValueError(
                f"inducing_points must be a non-empty floating tensor of shape (M, d) or "
                f"(*batch_shape, M, d), got shape {tuple(Z.shape)} and dtype {Z.dtype}"
            )
        if not bool(torch.isfinite(Z).all()):
            raise ValueError("inducing_points contains NaN or inf")
        try:
            Z = Z.expand(*self.batch_shape, *Z.shape[-2:])
        except RuntimeError as err:
            raise ValueError(
                f"inducing_points has shape {tuple(Z.shape)}, not broadcastable to "
                f"batch_shape {tuple(self.batch_shape)} + (M, d)"
            ) from err
        return Z.detach().clone()

    @property
    def _strategy(self) -> VariationalStrategy:
        """The whitened base ``VariationalStrategy`` (inside the multitask wrapper if any)."""
        strategy = self.gp.variational_strategy
        return getattr(strategy, "base_variational_strategy", strategy)

    @property
    def kernel(self) -> Kernel:
        return self.gp.covar_module

    @property
    def inducing_points(self) -> Tensor:
        """Inducing inputs ``Z``, shape ``(*batch_shape, M, d)`` (``(*batch_shape, C, M, d)``
        for softmax)."""
        return self._strategy.inducing_points

    @property
    def num_inducing(self) -> int:
        return self.inducing_points.shape[-2]

    @property
    def jitter(self) -> float:
        return float(self._strategy.jitter_val)

    @property
    def noise(self) -> Tensor:
        """Gaussian noise variance, shape ``batch_shape + (1,)``."""
        if self.kind != "gaussian":
            raise AttributeError(f"a {self.kind} likelihood has no noise variance")
        return self.likelihood.noise

    @noise.setter
    def noise(self, value: float | Tensor) -> None:
        if self.kind != "gaussian":
            raise ValueError(f"noise is only used with a Gaussian likelihood, not {self.kind}")
        value = torch.as_tensor(value, dtype=self.likelihood.raw_noise.dtype)
        if not bool((torch.isfinite(value) & (value > 1e-4)).all()):
            raise ValueError(f"noise must be a finite variance > 1e-4, got {value}")
        self.likelihood.noise = value.expand_as(self.likelihood.raw_noise)

    def variational_parameters(self) -> list[nn.Parameter]:
        """Parameters of ``q(v)`` (natural parameters when ``natural_gradients``)."""
        return list(self._strategy._variational_distribution.parameters())

    def hyperparameters(self) -> list[nn.Parameter]:
        """Every other trainable parameter: kernel, mean, likelihood, inducing inputs."""
        ids = {id(p) for p in self.variational_parameters()}
        return [p for p in self.parameters() if id(p) not in ids and p.requires_grad]

    # -- validation -----------------------------------------------------------------------
    def _inputs(self, X: object, name: str = "X") -> Tensor:
        """Validated inputs, shape (..., n, d), in the parameters' dtype and device."""
        if not isinstance(X, Tensor):
            raise TypeError(f"{name} must be a tensor of shape (..., n, d), got {type(X).__name__}")
        Z = self.inducing_points
        if X.dim() == 1 and Z.shape[-1] == 1:
            X = X.unsqueeze(-1)
        if X.dim() < 2 or X.shape[-1] != Z.shape[-1] or X.shape[-2] == 0:
            raise ValueError(
                f"{name} must have shape (..., n, d) with n >= 1 and d = {Z.shape[-1]} (the "
                f"inducing points' dimension), got {tuple(X.shape)}"
            )
        try:
            torch.broadcast_shapes(X.shape[:-2], self.batch_shape)
        except RuntimeError as err:
            raise ValueError(
                f"{name} has batch shape {tuple(X.shape[:-2])}, not broadcastable to the "
                f"model's batch_shape {tuple(self.batch_shape)}"
            ) from err
        if not (X.is_floating_point() or X.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must hold real numbers, got dtype {X.dtype}")
        X = X.to(dtype=Z.dtype, device=Z.device)
        if not bool(torch.isfinite(X).all()):
            raise ValueError(f"{name} contains NaN or inf; inputs must be finite")
        return X

    def _targets(self, y: object, X: Tensor) -> Tensor:
        """Validated targets, shape (..., n), checked against the likelihood."""
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a tensor of shape (..., n), got {type(y).__name__}")
        if y.shape == X.shape[:-1] + (1,):
            y = y.squeeze(-1)
        if y.shape[-1:] != X.shape[-2:-1]:
            raise ValueError(
                f"y has shape {tuple(y.shape)} but X has shape {tuple(X.shape)}; expected one "
                "target per row of X"
            )
        try:
            torch.broadcast_shapes(y.shape[:-1], X.shape[:-2], self.batch_shape)
        except RuntimeError as err:
            raise ValueError(
                f"y has batch shape {tuple(y.shape[:-1])}, not broadcastable to that of X "
                f"{tuple(X.shape[:-2])} and the model's {tuple(self.batch_shape)}"
            ) from err
        if y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"y must hold real numbers, got dtype {y.dtype}")
        y = y.to(dtype=X.dtype, device=X.device)
        if not bool(torch.isfinite(y).all()):
            raise ValueError("y contains NaN or inf; targets must be finite")
        if self.kind == "bernoulli" and not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("y must hold labels 0 and 1 for the Bernoulli likelihood")
        if self.kind == "poisson" and not bool(((y >= 0) & (y == y.round())).all()):
            raise ValueError("y must hold non-negative integer counts for the Poisson likelihood")
        if self.kind == "softmax":
            ok = (y >= 0) & (y < self.num_classes) & (y == y.round())
            if not bool(ok.all()):
                raise ValueError(f"y must hold class labels 0, ..., {self.num_classes - 1}")
        return y

    # -- q(u) and q(f) --------------------------------------------------------------------
    def _q_moments(self) -> tuple[Tensor, Tensor]:
        """Whitened ``q(v) = N(m, S)``: ``m`` (*latent, M) and a root ``R`` (*latent, M, M)
        with ``S = R R^T`` (gradients reach natural parameters as natural gradients)."""
        q = self._strategy._variational_distribution()
        cov = q.lazy_covariance_matrix
        if isinstance(cov, CholLinearOperator):
            root = cov.root.to_dense()
        else:
            root = psd_safe_cholesky(cov.to_dense())
        return q.mean, root

    def _whitening_factor(self, Z: Tensor) -> Tensor:
        """Cholesky ``L`` of ``K_ZZ + jitter I``, shape (*, M, M), computed and returned in
        float64 (as gpytorch's ``VariationalStrategy`` does, for float32 robustness)."""
        Kzz = self.kernel(Z).to_dense().to(torch.float64)
        eye = torch.eye(Z.shape[-2], dtype=torch.float64, device=Z.device)
        return psd_safe_cholesky(Kzz + self.jitter * eye)

    def _latent_inputs(self, X: Tensor) -> Tensor:
        return X.unsqueeze(-3) if self.num_classes is not None else X

    def _marginals(
        self, X: Tensor, moments: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Mean and variance of ``q(f)`` at ``X``, each (..., n) or (..., C, n) for softmax;
        ``moments`` are those of :meth:`_q_moments` when already computed."""
        Z = self.inducing_points
        Xl = self._latent_inputs(X)
        Kzz = self.kernel(Z).to_dense()
        Kzx = self.kernel(Z, Xl).to_dense()
        m, R = self._q_moments() if moments is None else moments
        middle = R @ R.mT - torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)  # S - I
        mean_update, var_update = whitened_marginal_updates(Kzz, Kzx, middle, m, self.jitter)
        kxx = self.kernel(Xl, diag=True)
        mean = self.gp.mean_module(Xl) + mean_update
        return mean, kxx + self.jitter + var_update

    def _chunked_marginals(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`_marginals` in row chunks of :data:`PREDICT_CHUNK` points (bounded memory
        for large prediction sets)."""
        if X.shape[-2] <= PREDICT_CHUNK:
            return self._marginals(X)
        moments = self._q_moments()
        parts = [self._marginals(x, moments) for x in X.split(PREDICT_CHUNK, dim=-2)]
        return torch.cat([p[0] for p in parts], -1), torch.cat([p[1] for p in parts], -1)

    def _joint(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """Mean (..., n) and joint covariance (..., n, n) of ``q(f)`` (leading C for softmax)."""
        Z = self.inducing_points
        Xl = self._latent_inputs(X)
        L = self._whitening_factor(Z).to(X.dtype)
        A = torch.linalg.solve_triangular(L, self.kernel(Z, Xl).to_dense(), upper=False)
        m, R = self._q_moments()
        B = R.mT @ A
        Kxx = self.kernel(Xl).to_dense()
        eye = torch.eye(X.shape[-2], dtype=X.dtype, device=X.device)
        cov = Kxx + self.jitter * eye - A.mT @ A + B.mT @ B  # K_xx + A^T (S - I) A
        mean = self.gp.mean_module(Xl) + (A.mT @ m.unsqueeze(-1)).squeeze(-1)
        return mean, 0.5 * (cov + cov.mT)

    # -- objective ------------------------------------------------------------------------
    def kl_divergence(self, moments: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``KL(q(u) || p(u)) = KL(N(m, S) || N(0, I))`` (whitened), shape ``batch_shape``.

        .. math:: \\tfrac12\\big(\\operatorname{tr} S + m^\\top m - M - \\log|S|\\big)

        ``moments``: ``(m, R)`` with ``S = R R^T`` if already computed (internal).
        """
        m, R = self._q_moments() if moments is None else moments
        log_det = 2.0 * R.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
        kl = 0.5 * (R.square().sum((-2, -1)) + m.square().sum(-1) - m.shape[-1] - log_det)
        return kl.sum(-1) if self.num_classes is not None else kl

    def _expected_log_lik(self, y: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """``E_q(f_i)[log p(y_i | f_i)]``, shape (..., n)."""
        if self.kind == "gaussian":  # closed form
            noise = self.likelihood.noise
            return -0.5 * (_LOG_2PI + noise.log() + ((y - mean).square() + var) / noise)
        if self.kind == "softmax":  # Monte Carlo over the C latent GPs (gpytorch's estimator)
            mean, std = mean.mT, var.clamp_min(0).sqrt().mT  # (..., n, C)
            num = int(num_likelihood_samples.value())
            eps = torch.randn((num, *mean.shape), dtype=mean.dtype, device=mean.device)
            logits = mean + std * eps
            return self.likelihood.forward(logits).log_prob(y.long()).mean(0)
        dist = MultivariateNormal(mean, DiagLinearOperator(var))
        return self.likelihood.expected_log_prob(y, dist)

    def _elbo(self, X: Tensor, y: Tensor, num_data: int) -> Tensor:
        moments = self._q_moments()  # once per evaluation (NGD: several O(M^3) steps)
        mean, var = self._marginals(X, moments)
        ell = self._expected_log_lik(y, mean, var)
        return ell.sum(-1) * (num_data / X.shape[-2]) - self.kl_divergence(moments)

    def elbo(self, X: Tensor, y: Tensor, num_data: int | None = None) -> Tensor:
        """Evidence lower bound, summed over the data set (unbiased from a minibatch).

        .. math:: \\mathcal L = \\frac{N}{n} \\sum_{i=1}^{n} \\mathbb E_{q(f_i)}[\\log p(y_i|f_i)]
            - \\mathrm{KL}(q(u) \\,\\|\\, p(u))

        for a minibatch of ``n`` of the ``N = num_data`` points. gpytorch's
        ``VariationalELBO(likelihood, model.gp, num_data)`` returns this divided by ``N``.

        Parameters
        ----------
        X : Tensor, shape (..., n, d)
        y : Tensor, shape (..., n)
            Minibatch (or all) of the data.
        num_data : int, optional
            Size ``N`` of the whole data set; default ``n`` (full batch).

        Returns
        -------
        Tensor, shape ``batch_shape``
            Differentiable with respect to every parameter.
        """
        X = self._inputs(X)
        y = self._targets(y, X)
        num_data = X.shape[-2] if num_data is None else check_int("num_data", num_data)
        return self._elbo(X, y, num_data)

    # -- training -------------------------------------------------------------------------
    def fit(
        self,
        X: Tensor,
        y: Tensor,
        *,
        epochs: int = 2,
        batch_size: int = 1024,
        lr: float = 0.03,
        ngd_lr: float = 0.1,
        seed: int = 0,
        progress: bool = True,
    ) -> list[float]:
        """Maximise the ELBO by minibatch stochastic optimisation.

        Each step draws ``batch_size`` points (a fresh random permutation per epoch) and
        minimises ``-elbo / N``. With ``natural_gradients`` the natural parameters of ``q(v)``
        take a natural-gradient step (``gpytorch.optim.NGD``; with a Gaussian likelihood and
        the full data, ``ngd_lr = 1`` jumps to the optimal ``q(v)`` in one step) and the
        hyperparameters and inducing inputs an Adam step; otherwise Adam updates everything.
        Every call starts with fresh optimiser state; parameters with ``requires_grad=False``
        stay fixed.

        Parameters
        ----------
        X : Tensor, shape (..., N, d)
        y : Tensor, shape (..., N)
            Training data (the batch dims index independent GPs).
        epochs : int, default 2
        batch_size : int, default 1024
            Clamped to ``N``.
        lr : float, default 0.03
            Adam learning rate.
        ngd_lr : float, default 0.1
            Natural-gradient step size, in (0, 1].
        seed : int, default 0
            Seed of the minibatch order (and of the Monte Carlo draws of the softmax
            likelihood); the global random state is untouched.
        progress : bool, default True
            Show a tqdm progress bar with the current loss.

        Returns
        -------
        list of float
            ``-elbo / N`` per step (summed over a batch of GPs).
        """
        X = self._inputs(X)
        y = self._targets(y, X)
        check_int("epochs", epochs, minimum=0)
        check_int("batch_size", batch_size)
        lr = check_positive("lr", lr)
        ngd_lr = check_positive("ngd_lr", ngd_lr)
        if ngd_lr > 1:
            raise ValueError(f"ngd_lr must lie in (0, 1], got {ngd_lr}")
        n = X.shape[-2]
        y = y.expand(*y.shape[:-1], n)
        batch_size = min(batch_size, n)
        optimizers: list[torch.optim.Optimizer] = []
        hyper = self.hyperparameters()
        if self.natural_gradients:
            optimizers.append(NGD(self.variational_parameters(), num_data=n, lr=ngd_lr))
        else:
            hyper = self.variational_parameters() + hyper
        if hyper:
            optimizers.append(torch.optim.Adam(hyper, lr=lr))
        gen = torch.Generator().manual_seed(seed)
        steps_per_epoch = math.ceil(n / batch_size)
        history: list[float] = []
        was_training = self.training
        self.train()
        try:
            with torch.random.fork_rng(devices=[]), tqdm(
                total=epochs * steps_per_epoch, desc="svgp", disable=not progress, leave=False
            ) as bar:  # fmt: skip
                torch.manual_seed(seed)
                for _ in range(epochs):
                    order = torch.randperm(n, generator=gen).to(X.device)
                    for start in range(0, n, batch_size):
                        idx = order[start : start + batch_size]
                        for opt in optimizers:
                            opt.zero_grad(set_to_none=True)
                        loss = -self._elbo(X[..., idx, :], y[..., idx], n).sum() / n
                        if not bool(torch.isfinite(loss)):
                            raise RuntimeError(
                                f"the ELBO became {-float(loss)} at step {len(history)}; lower "
                                "lr / ngd_lr or check the data scale"
                            )
                        loss.backward()
                        for opt in optimizers:
                            opt.step()
                        history.append(float(loss.detach()))
                        bar.update(1)
                        if len(history) % 10 == 1:
                            bar.set_postfix(loss=f"{history[-1]:.4g}")
        finally:
            self.train(was_training)
        return history

    # -- prediction -----------------------------------------------------------------------
    def posterior(
        self, X: Tensor, joint: bool = False, observation_noise: bool = False
    ) -> GaussianPosterior:
        """Approximate posterior ``q(f)`` of the latent function(s) at ``X``.

        Parameters
        ----------
        X : Tensor, shape (..., n, d)
        joint : bool, default False
            Full joint covariance over the ``n`` points (O(n^2 M) time) instead of marginal
            variances (O(n M^2), no n x n matrix, computed in chunks of
            :data:`PREDICT_CHUNK` points).
        observation_noise : bool, default False
            Add the Gaussian noise variance (predictive of ``y``); Gaussian likelihood only.

        Returns
        -------
        GaussianPosterior
            ``mean`` of shape (..., n, 1) (``(..., n, C)`` for softmax, one column per latent
            GP) with ``variance`` of the same shape, or ``covariance`` (..., n, n)
            (``(..., n C, n C)`` interleaved, block-diagonal across classes) when ``joint``.
        """
        X = self._inputs(X)
        if observation_noise and self.kind != "gaussian":
            raise ValueError("observation_noise=True needs a Gaussian likelihood")
        if joint:
            mean, cov = self._joint(X)
            if observation_noise:
                eye = torch.eye(X.shape[-2], dtype=X.dtype, device=X.device)
                cov = cov + self.likelihood.noise.unsqueeze(-1) * eye
            if self.num_classes is not None:
                mean, cov = mean.mT, _interleave_blocks(cov)
                batch = torch.broadcast_shapes(mean.shape[:-2], cov.shape[:-2])
                return GaussianPosterior(
                    mean.expand(*batch, *mean.shape[-2:]),
                    covariance=cov.expand(*batch, *cov.shape[-2:]),
                )
            batch = torch.broadcast_shapes(mean.shape[:-1], cov.shape[:-2])
            mean = mean.expand(*batch, mean.shape[-1]).unsqueeze(-1)
            return GaussianPosterior(mean, covariance=cov.expand(*batch, *cov.shape[-2:]))
        mean, var = self._chunked_marginals(X)
        if observation_noise:
            var = var + self.likelihood.noise
        if self.num_classes is not None:
            mean, var = mean.mT, var.mT
        else:
            mean, var = mean.unsqueeze(-1), var.unsqueeze(-1)
        batch = torch.broadcast_shapes(mean.shape, var.shape)
        return GaussianPosterior(mean.expand(batch), variance=var.expand(batch).clamp_min(0))

    def predict_mean(self, X: Tensor) -> Tensor:
        """Predictive mean of ``y`` at ``X``, shape (..., n): the latent mean (Gaussian),
        ``P(y = 1)`` (Bernoulli) or the Poisson rate ``E[exp f] = exp(m + v / 2)``."""
        if self.kind == "softmax":
            raise ValueError("use predict_proba for the softmax likelihood")
        X = self._inputs(X)
        mean, var = self._chunked_marginals(X)
        if self.kind == "gaussian":
            return mean
        if self.kind == "poisson":
            return torch.exp(mean + 0.5 * var)
        if self.kind == "bernoulli":
            return self.likelihood.marginal(MultivariateNormal(mean, DiagLinearOperator(var))).probs
        return self.likelihood.marginal(MultivariateNormal(mean, DiagLinearOperator(var))).mean

    def predict_proba(self, X: Tensor, num_samples: int = 256, seed: int = 0) -> Tensor:
        """Predictive class probabilities, shape (..., n, C).

        Bernoulli: ``P(y=1) = Phi(m / sqrt(1 + v))`` exactly (``C = 2`` columns
        ``[1 - p, p]``); softmax: Monte Carlo average of ``softmax(f)`` over ``num_samples``
        draws of the latent GPs (seeded, the global random state is untouched). The same
        standard-normal draws are shared by all rows, so a row's probabilities do not depend
        on which other rows are predicted with it.
        """
        if self.kind == "bernoulli":
            p = self.predict_mean(X)
            return torch.stack([1 - p, p], -1)
        if self.kind != "softmax":
            raise ValueError(f"predict_proba needs a classification likelihood, not {self.kind}")
        check_int("num_samples", num_samples)
        X = self._inputs(X)
        mean, var = self._chunked_marginals(X)
        mean, std = mean.mT, var.clamp_min(0).sqrt().mT
        gen = torch.Generator(device=mean.device).manual_seed(seed)
        shape = (num_samples, *mean.shape[:-2], 1, mean.shape[-1])  # shared across rows
        eps = torch.randn(shape, generator=gen, dtype=mean.dtype, device=mean.device)
        return torch.softmax(mean + std * eps, -1).mean(0)

    # -- construction from data -----------------------------------------------------------
    @classmethod
    def from_data(
        cls,
        X: Tensor,
        y: Tensor,
        num_inducing: int = 256,
        *,
        kernel: Kernel | None = None,
        likelihood: str | Likelihood = "gaussian",
        num_classes: int | None = None,
        init: str = "kmeans++",
        noise_fraction: float | None = None,
        seed: int = 0,
        **kwargs: object,
    ) -> SVGP:
        """An SVGP initialised from the training data.

        - inducing inputs: ``num_inducing`` rows of ``X`` by k-means++ seeding (or a random
          subset, ``init="random"``); ``num_inducing`` must not exceed ``N``;
        - default kernel ``ScaleKernel(RBFKernel(ard_num_dims=d))`` with lengthscales the
          per-dimension standard deviations of ``X`` and the output scale ``Var(y)``
          (Gaussian) or 1;
        - constant mean ``mean(y)`` (Gaussian) or ``log mean(y)`` (Poisson);
        - Gaussian noise variance: the nearest-neighbour difference estimate
          (:func:`nearest_neighbour_noise_variance`) clamped to ``[0.001, 0.5] * Var(y)``, or
          ``noise_fraction * Var(y)`` when ``noise_fraction`` is given.

        A ``kernel`` that is given is used as it is. The batch shape is that of ``X``.

        Parameters
        ----------
        X : Tensor, shape (..., N, d)
        y : Tensor, shape (..., N)
        num_inducing : int, default 256
        kernel, likelihood, num_classes
            As in :class:`SVGP`.
        init : {"kmeans++", "random"}, default "kmeans++"
        noise_fraction : float, optional
            Initial noise variance as a fraction of ``Var(y)``, in (0, 1]; default: estimated
            from nearest-neighbour differences. Adam moves the log noise by about ``lr`` per
            step, so a start far from the truth (either way) costs many steps: a high start
            makes the model explain signal as noise, a low one over-fits at first.
        seed : int, default 0
            Seed of the inducing-point selection.
        **kwargs
            Further arguments of :class:`SVGP` (``mean``, ``natural_gradients``, ...).

        Returns
        -------
        SVGP
            In the dtype of ``X``.
        """
        if not isinstance(X, Tensor) or not X.is_floating_point():
            raise TypeError("X must be a floating tensor of shape (..., N, d)")
        if X.dim() == 1:
            X = X.unsqueeze(-1)
        if X.dim() < 2 or X.shape[-2] == 0:
            raise ValueError(f"X must have shape (..., N, d) with N >= 1, got {tuple(X.shape)}")
        if not bool(torch.isfinite(X).all()):
            raise ValueError("X contains NaN or inf; inputs must be finite")
        if noise_fraction is not None:
            noise_fraction = check_positive("noise_fraction", noise_fraction)
        if noise_fraction is not None and noise_fraction > 1:
            raise ValueError(f"noise_fraction must lie in (0, 1], got {noise_fraction}")
        batch = X.shape[:-2]
        Z = select_inducing_points(X, num_inducing, init, seed)
        given = kernel is not None
        if kernel is None:
            latent = batch + ((num_classes,) if likelihood == "softmax" else ())
            kernel = ScaleKernel(
                RBFKernel(ard_num_dims=X.shape[-1], batch_shape=latent), batch_shape=latent
            )
        model = cls(kernel, Z, likelihood, num_classes=num_classes, batch_shape=batch, **kwargs).to(
            dtype=X.dtype, device=X.device
        )
        y = model._targets(y, model._inputs(X))
        model._initialise(X, y, default_kernel=not given, noise_fraction=noise_fraction)
        return model

    @torch.no_grad()
    def _initialise(
        self, X: Tensor, y: Tensor, default_kernel: bool, noise_fraction: float | None
    ) -> None:
        """Data-scaled initial values (see :meth:`from_data`)."""
        y_var = y.var(-1).clamp_min(1e-6) if y.shape[-1] > 1 else torch.ones_like(y[..., 0])
        if default_kernel:
            scale = X.std(-2).clamp_min(1e-6) if X.shape[-2] > 1 else torch.ones_like(X[..., 0, :])
            scale = scale.unsqueeze(-2)  # (*batch, 1, d)
            if self.num_classes is not None:
                scale = scale.unsqueeze(-3)
            base = self.kernel.base_kernel
            base.lengthscale = scale.expand_as(base.lengthscale)
            out = y_var if self.kind == "gaussian" else torch.ones_like(y_var)
            self.kernel.outputscale = out.expand_as(self.kernel.outputscale)
        mean_module = self.gp.mean_module
        if isinstance(mean_module, ConstantMean):
            if self.kind == "gaussian":
                c = y.mean(-1)
            elif self.kind == "poisson":
                c = y.mean(-1).clamp_min(1e-3).log()
            else:
                c = torch.zeros_like(y[..., 0])
            mean_module.constant.copy_(c.expand_as(mean_module.constant))
        if self.kind == "gaussian":
            if noise_fraction is not None:
                noise = noise_fraction * y_var
            elif X.shape[-2] > 1:
                estimate = nearest_neighbour_noise_variance(X, y)
                noise = torch.minimum(torch.maximum(estimate, 1e-3 * y_var), 0.5 * y_var)
            else:
                noise = 0.1 * y_var
            noise = noise.clamp_min(2e-4)
            self.noise = noise.unsqueeze(-1).expand_as(self.likelihood.raw_noise)

    def extra_repr(self) -> str:
        return (
            f"likelihood={self.kind!r}, num_inducing={self.num_inducing}, "
            f"batch_shape={tuple(self.batch_shape)}, natural_gradients={self.natural_gradients}"
        )


def _interleave_blocks(cov: Tensor) -> Tensor:
    """Block-diagonal joint covariance of C independent GPs, (..., C, n, n) -> (..., nC, nC)
    in interleaved order (row ``i * C + j`` is point ``i``, class ``j``)."""
    C, n = cov.shape[-3], cov.shape[-1]
    blocks = torch.diag_embed(cov.movedim(-3, -1))  # (..., n, n, C, C)
    return blocks.transpose(-3, -2).reshape(*cov.shape[:-3], n * C, n * C)

"""``SVGP``: sparse variational GP (Hensman et al. 2013, 2015) on gpytorch's whitened
``VariationalStrategy``, trained by minibatches with natural gradients for q(u)."""

from __future__ import annotations

from typing import Any

import torch
from gpytorch.distributions import MultivariateNormal
from gpytorch.kernels import Kernel
from gpytorch.likelihoods.likelihood import Likelihood
from gpytorch.means import ConstantMean, ZeroMean
from gpytorch.optim import NGD
from gpytorch.variational import (
    CholeskyVariationalDistribution,
    NaturalVariationalDistribution,
    VariationalStrategy,
)
from linear_operator.operators import DiagLinearOperator
from torch import Tensor, nn

from bdl.core.model import Model, cast_posterior
from bdl.core.posterior import GaussianPosterior
from bdl.core.training import seeded
from bdl.core.validation import check_choice, check_inputs, check_int, check_positive
from gp.likelihoods import likelihood_kind, make_likelihood
from gp.sparse._fit import fit_minibatches, unpack_data
from gp.sparse._precision import call_promoted
from gp.sparse._svgp_moments import WhitenedMoments
from gp.sparse._svgp_parts import (
    VariationalGP,
    check_inducing,
    check_svgp_inputs,
    check_svgp_targets,
    default_kernel,
    initialise_from_data,
)
from gp.sparse.initialisation import select_inducing_points

__all__ = ["SVGP"]

_MEANS = ("constant", "zero")


class SVGP(WhitenedMoments, nn.Module, Model):
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
    closed-form expected log-likelihoods where they exist (Gaussian, Poisson); :meth:`elbo`
    equals gpytorch's ``VariationalELBO`` (tested).

    Usage::

        model = SVGP.from_data(X, y, num_inducing=256)       # k-means++ Z, data-scaled init
        model.fit((X, y), epochs=2, batch_size=1024)          # NGD for q(u), Adam for the rest
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
        Observation model (:func:`gp.likelihoods.make_likelihood`; the Gaussian noise variance
        is bounded below by :data:`gp.likelihoods.NOISE_LOWER_BOUND`). Bernoulli uses the
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
    Training runs in the parameters' dtype (cast with ``.double()`` for float64).
    :meth:`posterior` computes in the promoted dtype of its inputs and the parameters (a
    float32 model answers float64 inputs with float64 accuracy, the parameters cast for the
    call) and returns the inputs' dtype. The Cholesky factor of ``K_ZZ`` is always computed
    in float64, as gpytorch does.
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
        check_choice("mean", mean, _MEANS)
        if jitter is not None:
            check_positive("jitter", jitter, allow_zero=True)
        self._batch_shape = torch.Size(batch_shape)
        self.likelihood = make_likelihood(likelihood, num_classes, self._batch_shape)
        self.kind = likelihood_kind(self.likelihood)
        if self.kind == "softmax":
            num_classes = self.likelihood.num_classes
        self.num_classes = num_classes
        Z = check_inducing(inducing_points, self._batch_shape)
        latent = self._batch_shape + ((num_classes,) if num_classes is not None else ())
        if num_classes is not None:  # separate inducing inputs per class
            Z = Z.unsqueeze(-3).expand(*self._batch_shape, num_classes, *Z.shape[-2:])
        self.natural_gradients = bool(natural_gradients)
        dist_cls = (
            NaturalVariationalDistribution if natural_gradients else CholeskyVariationalDistribution
        )
        dist = dist_cls(Z.shape[-2], batch_shape=latent)
        mean_module = ConstantMean(batch_shape=latent) if mean == "constant" else ZeroMean()
        self.gp = VariationalGP(
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
    @property
    def batch_shape(self) -> torch.Size:
        """Shape of the batch of independent GPs."""
        return self._batch_shape

    @property
    def num_outputs(self) -> int:
        """1, or the number of classes (one latent GP each) for the softmax likelihood."""
        return 1 if self.num_classes is None else int(self.num_classes)

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
        bound = float(self.likelihood.noise_covar.raw_noise_constraint.lower_bound)
        if not bool((torch.isfinite(value) & (value > bound)).all()):
            raise ValueError(
                f"noise must be a finite variance above the likelihood's lower bound {bound:g}, "
                f"got {value}"
            )
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
        return check_svgp_inputs(X, self.inducing_points, self._batch_shape, name)

    def _targets(self, y: object, X: Tensor) -> Tensor:
        """Validated targets, shape (..., n), checked against the likelihood."""
        return check_svgp_targets(y, X, self.kind, self.num_classes, self._batch_shape)

    # -- objective ------------------------------------------------------------------------
    def elbo(self, X: Tensor, y: Tensor, num_data: int | None = None) -> Tensor:
        """Evidence lower bound divided by ``N`` (a per-datum mean), unbiased from a minibatch.

        .. math:: \\frac{\\mathcal L}{N} = \\frac{1}{n} \\sum_{i=1}^{n}
            \\mathbb E_{q(f_i)}[\\log p(y_i|f_i)] - \\frac{1}{N}\\,\\mathrm{KL}(q(u) \\,\\|\\, p(u))

        for a minibatch of ``n`` of the ``N = num_data`` points; ``N`` times it is the ELBO
        of the whole data set (a lower bound on the log marginal likelihood). It equals
        gpytorch's ``VariationalELBO(likelihood, model.gp, num_data)``.

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
    def _optimizers(self, n: int, lr: float, ngd_lr: float) -> list[torch.optim.Optimizer]:
        """NGD on the natural parameters of ``q(v)`` (if any), Adam on everything else."""
        optimizers: list[torch.optim.Optimizer] = []
        hyper = self.hyperparameters()
        if self.natural_gradients:
            optimizers.append(NGD(self.variational_parameters(), num_data=n, lr=ngd_lr))
        else:
            hyper = self.variational_parameters() + hyper
        if hyper:
            optimizers.append(torch.optim.Adam(hyper, lr=lr))
        return optimizers

    def fit(
        self,
        data: tuple[Tensor, Tensor],
        *,
        epochs: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        verbose: bool = False,
        ngd_lr: float = 0.1,
    ) -> SVGP:
        """Maximise the ELBO by minibatch stochastic optimisation.

        Each step draws ``batch_size`` points (a fresh random permutation per epoch) and
        minimises ``-elbo`` (the per-datum ELBO). With ``natural_gradients`` the natural
        parameters of ``q(v)`` take a natural-gradient step (``gpytorch.optim.NGD``; with a
        Gaussian likelihood and the full data, ``ngd_lr = 1`` jumps to the optimal ``q(v)``
        in one step) and the hyperparameters and inducing inputs an Adam step; otherwise
        Adam updates everything. Training runs through :func:`bdl.core.training.train`.
        Every call starts with fresh optimiser state; parameters with
        ``requires_grad=False`` stay fixed.

        Parameters
        ----------
        data : tuple (X, y)
            ``X`` of shape (..., N, d) and ``y`` of shape (..., N) (the batch dims index
            independent GPs).
        epochs : int, default 2
        lr : float, default 0.03
            Adam learning rate.
        batch_size : int, default 1024
            Clamped to ``N``.
        seed : int, optional
            Seed of the minibatch order and of the Monte Carlo draws of the softmax
            likelihood (the global random state is then untouched); None draws fresh ones.
        verbose : bool, default False
            Show a tqdm progress bar with the loss.
        ngd_lr : float, default 0.1
            Natural-gradient step size, in (0, 1].

        Returns
        -------
        SVGP
            ``self``, with ``history_`` (``-elbo`` per epoch, mean over its steps, summed over
            a batch of GPs) and ``step_losses_`` (``-elbo`` of every step).
        """
        X, y = unpack_data(data)
        X = self._inputs(X)
        y = self._targets(y, X)
        epochs = check_int("epochs", 2 if epochs is None else epochs, minimum=0)
        batch_size = check_int("batch_size", 1024 if batch_size is None else batch_size)
        lr = check_positive("lr", 0.03 if lr is None else lr)
        ngd_lr = check_positive("ngd_lr", ngd_lr)
        if ngd_lr > 1:
            raise ValueError(f"ngd_lr must lie in (0, 1], got {ngd_lr}")
        n = X.shape[-2]
        y = y.expand(*y.shape[:-1], n)
        optimizers = self._optimizers(n, lr, ngd_lr)
        with seeded(seed, X.device):
            self.history_, self.step_losses_ = fit_minibatches(
                self, lambda xb, yb: -self._elbo(xb, yb, n).sum(), optimizers, X, y,
                epochs=epochs, batch_size=batch_size, seed=seed, verbose=verbose, desc="svgp",
            )  # fmt: skip
        return self

    # -- prediction -----------------------------------------------------------------------
    def posterior(
        self, X: Tensor, *, observation_noise: bool = False, joint: bool = False
    ) -> GaussianPosterior:
        """Approximate posterior ``q(f)`` of the latent function(s) at ``X``.

        Parameters
        ----------
        X : Tensor, shape (..., n, d)
            Leading dims broadcast with ``batch_shape``. Computed in the promoted dtype of
            ``X`` and the parameters; the posterior is returned in ``X``'s dtype and is
            differentiable in ``X``.
        observation_noise : bool, default False
            Add the Gaussian noise variance (predictive of ``y``); Gaussian likelihood only.
        joint : bool, default False
            Full joint covariance over the ``n`` points (O(n^2 M) time) instead of marginal
            variances (O(n M^2), no n x n matrix, computed in chunks of
            :data:`~gp.sparse._svgp_moments.PREDICT_CHUNK` points).

        Returns
        -------
        GaussianPosterior
            ``mean`` of shape (..., n, 1) (``(..., n, C)`` for softmax, one column per latent
            GP) with ``variance`` of the same shape, or ``covariance`` (..., n, n)
            (``(..., n C, n C)`` interleaved, block-diagonal across classes) when ``joint``.
        """
        dtype = X.dtype if isinstance(X, Tensor) else None
        if observation_noise and self.kind != "gaussian":
            raise ValueError("observation_noise=True needs a Gaussian likelihood")
        post = call_promoted(self, X, self._posterior, observation_noise, joint)
        return cast_posterior(post, dtype)

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
        **kwargs: Any,
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
        X = check_inputs(X)
        if noise_fraction is not None:
            noise_fraction = check_positive("noise_fraction", noise_fraction)
        if noise_fraction is not None and noise_fraction > 1:
            raise ValueError(f"noise_fraction must lie in (0, 1], got {noise_fraction}")
        batch = X.shape[:-2]
        Z = select_inducing_points(X, num_inducing, init, seed)
        given = kernel is not None
        if kernel is None:
            latent = batch + ((num_classes,) if likelihood == "softmax" else ())
            kernel = default_kernel(X.shape[-1], latent)
        model = cls(kernel, Z, likelihood, num_classes=num_classes, batch_shape=batch, **kwargs).to(
            dtype=X.dtype, device=X.device
        )
        y = model._targets(y, model._inputs(X))
        initialise_from_data(model, X, y, default_kernel=not given, noise_fraction=noise_fraction)
        return model

    def extra_repr(self) -> str:
        return (
            f"likelihood={self.kind!r}, num_inducing={self.num_inducing}, "
            f"batch_shape={tuple(self.batch_shape)}, natural_gradients={self.natural_gradients}"
        )

r"""scikit-learn estimators that sample an MLP's weights with cyclical SG-MCMC.

``fit`` standardises the inputs (and the regressor's targets), builds a ReLU MLP with a
Gaussian prior (per layer, scaled by fan-in, by default), picks the step size with
:func:`bdl.sgmcmc.suggest_lr` when ``lr`` is None, runs the sampler for ``epochs`` passes (by
default :data:`DEFAULT_EPOCHS`, the classifier at least :data:`MIN_STEPS` optimisation steps:
more passes on small data sets) under a cyclical cosine schedule (cSG-MCMC, Zhang et al.,
ICLR 2020) through :func:`bdl.core.training.train`, and keeps a few states from the end of
every cycle. The fitted model ``model_`` is a :class:`~bdl.sgmcmc.SampleCollector` of those
states behind the input and outcome transforms: class probabilities averaged over the
samples, or for the regressor the mixture of :math:`\mathcal N(f_s(x), \sigma_s^2)`, whose
noise :math:`\sigma_s` is sampled with the weights. The user guide's "Estimators" section
explains every default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import ClassifierMixin, RegressorMixin
from torch import Tensor, nn

from bdl.core.estimator import BayesianClassifierMixin, BayesianEstimator, BayesianRegressorMixin
from bdl.core.training import seeded, tensor_batches, train
from bdl.core.validation import check_choice, check_int, check_positive, check_sizes
from bdl.sgmcmc._base import _check_real
from bdl.sgmcmc._recipe import (
    NOISE_PRIOR_PRECISION,
    PRIORS,
    SAMPLERS,
    GaussianNet,
    build_sampler,
    cycle_layout,
    network,
    prior_precisions,
)
from bdl.sgmcmc.chains import chain_diagnostics, chain_seed, gather_chains, multichain_active
from bdl.sgmcmc.collector import SampleCollector
from bdl.sgmcmc.schedule import CyclicalSchedule

__all__ = ["SGMCMCClassifier", "SGMCMCRegressor"]

#: passes over the data when ``epochs=None``
DEFAULT_EPOCHS = 40
#: the classifier's ``epochs=None`` runs at least this many optimisation steps (whole
#: epochs, rounded up): a budget counted in epochs alone leaves a small data set a few
#: dozen steps
MIN_STEPS = 500
#: training inputs the function-space diagnostics of several chains use (the first ones)
DIAGNOSTIC_POINTS = 256

_PARAMS_DOC = """
    hidden_sizes : sequence of int
        Hidden widths of the ReLU MLP (empty: a linear model on the standardised inputs).
    sampler : {"sghmc", "sgld", "psgld"}
        The SG-MCMC optimizer of :mod:`bdl.sgmcmc`.
    lr : float or None
        Learning rate on the mean minibatch loss (``lr = eta * N``), the peak of every cycle;
        ``None`` picks it with :func:`bdl.sgmcmc.suggest_lr` (fitted value in ``lr_``).
    momentum_decay : float
        SGHMC friction ``alpha`` in ``(0, 1]`` (``1 - momentum``); ignored by the others.
    prior_precision : float or "fan_in"
        ``"fan_in"``: weights ``N(0, sigma_w^2 / fan_in)``, biases ``N(0, 1)``;
        a float: the precision of an isotropic Gaussian prior on every weight and bias (0:
        flat).
    prior_weight_variance : float or pair of floats
        ``sigma_w^2`` of the ``"fan_in"`` prior (ignored for a float ``prior_precision``):
        one value for every layer, or ``(input layer, later layers)``. The default
        ``(32, 64)`` is 32 times the variance-preserving scale of each layer: ``1 / fan_in``
        on the standardised inputs, ``2 / fan_in`` (He) after a ReLU, which halves the
        second moment.
    temperature : float
        Posterior temperature ``T`` (target ``exp(-U / T)``; 1 is the Bayesian posterior).
    epochs : int or None
        Passes over the training data; ``None``: :data:`DEFAULT_EPOCHS` passes, and for the
        classifier at least :data:`MIN_STEPS` optimisation steps (more passes on small data
        sets; the regressor's sampled noise shrinks in longer runs, so its budget has no
        floor). Fitted value in ``n_epochs_``.
    batch_size : int
        Minibatch size.
    n_cycles : int
        Cycles of the cosine schedule (fewer when the run is too short; fitted ``n_cycles_``).
    exploration_fraction : float
        Fraction ``beta`` in ``[0, 1)`` of each cycle without noise.
    samples_per_cycle : int
        About this many states are kept from each cycle's sampling phase.
    device : str, torch.device or None, default None
        Torch device to sample on (None: the CPU; an unavailable one is a ValueError).
    random_state : int, RandomState or None
        Seed of the initialisation, minibatch order and injected noise.
    verbose : bool
        Show a progress bar over the epochs with the mean training loss.

    Attributes
    ----------
    model_ : bdl.core.TransformedModel
        The fitted :class:`~bdl.sgmcmc.SampleCollector` (``model_.model``) behind the input
        (and outcome) transforms, in the user's units.
    lr_ : float
        The peak learning rate used.
    n_cycles_ : int
        Cycles of the schedule.
    n_samples_ : int
        Weight samples kept.
    n_epochs_ : int
        Passes over the training data run.
    n_iter_ : int
        Optimisation steps run.
    loss_curve_ : list of float
        Mean training loss of every epoch.
    n_chains_ : int
        Chains in ``model_``: 1, or inside a torch.distributed process group (outside
        :func:`~bdl.core.distributed.data_parallel`) one per rank, each seeded with rank 0's
        seed plus its rank and all gathered on every rank (:mod:`bdl.sgmcmc.chains`); under
        ``data_parallel`` one chain whose gradients are averaged over the ranks.
    chain_diagnostics_ : dict or None
        With several chains, :func:`~bdl.sgmcmc.chain_diagnostics` of the weights and of
        the predictions at the first 256 (standardised) training inputs; None for one."""


class _SGMCMCEstimator(BayesianEstimator):
    """Shared parameters, checks and sampling run of the two estimators (not public)."""

    _default_dtype = torch.float32
    _min_steps = 0

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (128, 128),
        sampler: str = "sghmc",
        lr: float | None = None,
        momentum_decay: float = 0.1,
        prior_precision: float | str = "fan_in",
        prior_weight_variance: float | tuple[float, float] = (32.0, 64.0),
        temperature: float = 1.0,
        epochs: int | None = None,
        batch_size: int = 64,
        n_cycles: int = 8,
        exploration_fraction: float = 0.8,
        samples_per_cycle: int = 4,
        device: str | torch.device | None = None,
        random_state: int | np.random.RandomState | None = None,
        verbose: bool = False,
    ) -> None:
        self.hidden_sizes = hidden_sizes
        self.sampler = sampler
        self.lr = lr
        self.momentum_decay = momentum_decay
        self.prior_precision = prior_precision
        self.prior_weight_variance = prior_weight_variance
        self.temperature = temperature
        self.epochs = epochs
        self.batch_size = batch_size
        self.n_cycles = n_cycles
        self.exploration_fraction = exploration_fraction
        self.samples_per_cycle = samples_per_cycle
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def _check_params(self) -> None:
        self.hidden_sizes_ = check_sizes("hidden_sizes", self.hidden_sizes)
        check_choice("sampler", self.sampler, SAMPLERS)
        if self.lr is not None:
            check_positive("lr", self.lr)
        _check_real("momentum_decay", self.momentum_decay, 0.0, 1.0, low_open=True)
        if isinstance(self.prior_precision, str):
            check_choice("prior_precision", self.prior_precision, PRIORS)
        else:
            check_positive("prior_precision", self.prior_precision, allow_zero=True)
        self._check_weight_variance()
        check_positive("temperature", self.temperature, allow_zero=True)
        if self.epochs is not None:
            check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size)
        check_int("n_cycles", self.n_cycles)
        _check_real("exploration_fraction", self.exploration_fraction, 0.0, 1.0, high_open=True)
        check_int("samples_per_cycle", self.samples_per_cycle)
        self._start_fit()

    def _network(self, in_features: int, out_features: int, seed: int) -> nn.Sequential:
        """The MLP, initialised from ``seed`` (the global RNG is left as it was)."""
        with seeded(seed):
            net = network(in_features, self.hidden_sizes_, out_features)
        return net.to(device=self.device_, dtype=self.dtype_)

    def _check_weight_variance(self) -> None:
        value = self.prior_weight_variance
        if not isinstance(value, (tuple, list)):
            check_positive("prior_weight_variance", value)
            return
        if len(value) != 2:
            raise ValueError(
                "prior_weight_variance must be a float or a pair (input layer, later layers), "
                f"got {len(value)} values"
            )
        check_positive("prior_weight_variance[0]", value[0])
        check_positive("prior_weight_variance[1]", value[1])

    def _epochs(self, steps_per_epoch: int) -> int:
        """Passes over the data: ``epochs``, or by default enough for ``_min_steps``."""
        if self.epochs is not None:
            return int(self.epochs)
        return max(DEFAULT_EPOCHS, math.ceil(self._min_steps / steps_per_epoch))

    def _seed(self) -> int:
        """Inside a process group (not data-parallel): rank 0's seed + the rank (one chain
        per rank, :mod:`bdl.sgmcmc.chains`)."""
        return chain_seed(super()._seed())

    def _gather_chains(self, collector: SampleCollector, x: Tensor) -> SampleCollector:
        """Every rank's chain on every rank, with ``n_chains_`` and ``chain_diagnostics_``."""
        self.n_chains_, self.chain_diagnostics_ = 1, None
        if not multichain_active():
            return collector
        collector = gather_chains(collector)
        self.n_chains_ = len(collector.chain_sizes)
        self.chain_diagnostics_ = chain_diagnostics(collector, x[:DIAGNOSTIC_POINTS])
        return collector

    def _priors(self, net: nn.Module) -> list[float]:
        return prior_precisions(net, self.prior_precision, self.prior_weight_variance)

    @torch.enable_grad()
    def _sample(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        data: tuple[Tensor, Tensor],
        priors: list[float],
        seed: int,
        lr_scale: Callable[[], float] | None = None,
        **predictive,
    ) -> SampleCollector:
        """Run the chain; return a collector of its samples (``predictive``: its task, noise).

        ``lr_scale`` (regressor): a factor applied, before every step, to the step size of
        every parameter group except the last (the log noise sd), on top of the schedule.
        """
        x, y = data
        generator = torch.Generator().manual_seed(seed)
        noise_generator = torch.Generator(device=self.device_).manual_seed(seed + 1)
        n = x.shape[0]
        batch = min(self.batch_size, n)
        opt = build_sampler(
            self.sampler, model, loss_fn, x, y, priors, lr=self.lr,
            momentum_decay=self.momentum_decay, temperature=self.temperature,
            batch_size=self.batch_size, generator=generator, noise_generator=noise_generator,
        )  # fmt: skip
        self.lr_ = opt.defaults["lr"]
        steps_per_epoch = math.ceil(n / batch)
        self.n_epochs_ = self._epochs(steps_per_epoch)
        total, cycles, thin = cycle_layout(
            steps_per_epoch, self.n_epochs_, self.n_cycles, self.exploration_fraction,
            self.samples_per_cycle,
        )  # fmt: skip
        self.n_iter_ = total
        schedule = CyclicalSchedule(opt, total, cycles, self.exploration_fraction)
        chain = SampleCollector(model, thin=thin, schedule=schedule)
        self.n_cycles_ = cycles

        def before_step() -> None:
            factor = lr_scale()
            for group, base in zip(opt.param_groups[:-1], schedule.get_last_lr()[:-1], strict=True):
                group["lr"] = base * factor

        def after_step() -> None:
            chain.update()  # before schedule.step(): the phase of the step just taken
            schedule.step()

        self.loss_curve_ = train(
            lambda xb, yb: loss_fn(model(xb), yb), opt, tensor_batches((x, y), batch, generator),
            self.n_epochs_, before_step=None if lr_scale is None else before_step,
            after_step=after_step, module=model, verbose=self.verbose, desc=type(self).__name__,
        )  # fmt: skip
        model.eval()
        collector = SampleCollector(model, **predictive)
        collector.load_state_dict(chain.state_dict())
        collector = self._gather_chains(collector, x)
        self.n_samples_ = len(collector)
        return collector


class SGMCMCClassifier(BayesianClassifierMixin, ClassifierMixin, _SGMCMCEstimator):
    __doc__ = (
        "Bayesian MLP classifier sampled by cyclical SG-MCMC (see the module docstring).\n\n"
        "    Parameters\n    ----------" + _PARAMS_DOC + "\n"
    )

    _min_steps = MIN_STEPS

    def fit(self, X, y) -> SGMCMCClassifier:
        """Sample the posterior given ``X`` (n, d) and labels ``y`` (n,); returns self."""
        self._check_params()
        X, y_idx = self._validate_fit_data(X, y)
        x = self._fit_inputs(X)
        labels = torch.as_tensor(y_idx, dtype=torch.long, device=self.device_)
        seed = self._seed()
        net = self._network(X.shape[1], len(self.classes_), seed)
        collector = self._sample(
            net, F.cross_entropy, (x, labels), self._priors(net), seed,
            task="classification", num_outputs=len(self.classes_),
        )  # fmt: skip
        self._set_model(collector)
        return self


class SGMCMCRegressor(BayesianRegressorMixin, RegressorMixin, _SGMCMCEstimator):
    __doc__ = (
        "Bayesian MLP regressor sampled by cyclical SG-MCMC, with the Gaussian noise sampled\n"
        "    too (see the module docstring). ``posterior(X)`` is the latent function's sample\n"
        "    mixture; ``observation_noise=True`` adds each sample's own noise variance.\n\n"
        "    Parameters\n    ----------" + _PARAMS_DOC + "\n"
    )

    _min_steps = 0

    def fit(self, X, y) -> SGMCMCRegressor:
        """Sample the posterior given ``X`` (n, d) and targets ``y`` (n,) or (n, m)."""
        self._check_params()
        X, y2 = self._validate_fit_data(X, y, min_samples=1)
        x = self._fit_inputs(X)
        targets = self._fit_targets(y2)
        seed = self._seed()
        net = self._network(X.shape[1], y2.shape[1], seed)
        with torch.no_grad():
            # s starts at its conditional mode given the initial weights, log rms residual
            # (so the curvature the step-size heuristic sees is that of a consistent state:
            # 2 along s exactly, 1 / sigma^2 along the mean's directions)
            resid = (targets - net(x)).pow(2).mean(0).clamp_min(1e-6)
        model = GaussianNet(net, 0.5 * resid.log())
        # one optimizer group per parameter, in model order: the noise's is the last
        priors = self._priors(net) + [NOISE_PRIOR_PRECISION]
        start = float(torch.exp(-2.0 * model.log_noise_std.detach()).sum())

        def lr_scale() -> float:
            # sigma^2 preconditioning of the network weights (user guide, "Estimators")
            precision = float(torch.exp(-2.0 * model.log_noise_std.detach()).sum())
            if not 0.0 < precision < math.inf:
                raise RuntimeError(
                    "the chain diverged: the sampled noise sd left the floating-point range "
                    f"(log sd {model.log_noise_std.detach().tolist()}); pass an lr below "
                    f"the one used ({self.lr_:.3g})"
                )
            return start / precision

        collector = self._sample(
            model, model.loss, (x, targets), priors, seed, lr_scale, task="regression",
            log_noise_std=GaussianNet.NOISE, num_outputs=y2.shape[1],
        )  # fmt: skip
        self._set_model(collector)
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

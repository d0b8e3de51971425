r"""scikit-learn estimators that sample an MLP's weights with cyclical SG-MCMC.

What ``fit`` does (defaults in brackets; ALGORITHMS.md §2):

1. Standardise the inputs (and, for the regressor, the targets) with training statistics.
2. Build a ReLU MLP [2 x 128] with a linear output layer and a Gaussian prior: by default
   [``prior_precision="fan_in"``] the weights of a layer with fan-in :math:`n_{\mathrm{in}}`
   are :math:`\mathcal N(0, \sigma_w^2 / n_{\mathrm{in}})` [``prior_weight_variance``
   :math:`\sigma_w^2 = 32`] and the biases :math:`\mathcal N(0, 1)`; a float is one precision
   :math:`\lambda` for every weight and bias. Measured on digits (BENCHMARKS.md protocol, 40
   epochs, T = 1, mean NLL over seeds 0-4): :math:`\sigma_w^2` = 2 (the He / NNGP scale)
   0.267, 4 0.173, 8 0.125, 16 0.098, 32 0.091, 64 0.109; the isotropic
   :math:`\lambda = 1` (:math:`\sigma_w^2 = n_{\mathrm{in}}`) 0.108. At the He scale the
   T = 1 posterior itself is underconfident (ECE 0.14; unchanged with a 4x smaller step, 4x
   more epochs or batch 512); wider priors are overconfident within the 40-epoch budget (a
   few confidently wrong test points whose rare pixels sit at 10-50 training sd), not in the
   limit: :math:`\lambda = 1` reaches 0.073 with 10x the epochs (seeds 0 and 3).
   The regressor's likelihood is :math:`\mathcal N(y \mid f_\theta(x), \sigma^2)` per output,
   with :math:`s = \log\sigma` sampled together with the weights under a weak
   :math:`\mathcal N(0, 1)` prior (in target standard deviations), started at the initial
   network's log rms residual (its conditional mode). As the fit improves, the curvature along
   the weights grows as :math:`1/\sigma^2` (without a remedy, SGHMC's heavy-ball limit would
   leave room only for :math:`\sigma^2` down to :math:`\alpha / (2(2-\alpha))`, 1/38, of the
   initial residual variance). So the network weights' steps are preconditioned
   by :math:`\sigma^2` relative to the start (``lr_w = lr * sum_k sigma_0k^-2 / sum_k
   sigma_k^-2``; the weights' Hessian is :math:`J^\top J / \sigma^2`). A preconditioner that
   depends only on :math:`s` and acts only on the weights has zero divergence correction
   (:math:`\Gamma_i = \sum_j \partial D_{ij} / \partial \theta_j = 0`; Ma, Chen & Fox
   2015), so the target is unchanged, and nearly noiseless targets stay stable.
3. Choose the step size, when ``lr`` is ``None``, with :func:`bdl.sgmcmc.suggest_lr` at the
   initial weights: ``momentum_decay / h_max`` for SGHMC, ``1 / h_max`` for SGLD and pSGLD,
   with ``h_max`` the top curvature of the per-datum potential (half the stability limit of the
   effective Langevin step; see :mod:`bdl.sgmcmc.stepsize`).
4. Run the sampler [SGHMC, temperature 1] for ``epochs`` passes [40] of minibatches [64] under
   a cyclical cosine schedule (cSG-MCMC, Zhang et al. 2020) of ``n_cycles`` cycles [8]: the
   first ``exploration_fraction`` [0.8] of each cycle is noise-free exploration, the rest
   samples from :math:`\exp(-U/T)` at a step size falling towards 0, and about
   ``samples_per_cycle`` [4] evenly thinned states of that phase, the cycle's last step
   included, are kept. Several short cycles instead of one long chain: the restarts visit
   several modes (the predictive is a mixture over them), while the samples come from the
   small-step end of each cycle, where the discretisation bias ``O(lr h)`` is smallest.
5. Predict by averaging over the samples: class probabilities (not logits), or the Gaussian
   mixture of :math:`\mathcal N(f_s(x), \sigma_s^2)` for the regressor.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor, nn

from bdl.core.training import shuffled_batches
from bdl.core.validation import check_choice, check_int, check_positive
from bdl.nets import make_mlp
from bdl.core.posterior import CategoricalPosterior, SamplePosterior
from bdl.sgmcmc._base import _check_real
from bdl.sgmcmc.collector import SampleCollector
from bdl.sgmcmc.psgld import PSGLD
from bdl.sgmcmc.schedule import CyclicalSchedule
from bdl.sgmcmc.sghmc import SGHMC
from bdl.sgmcmc.sgld import SGLD
from bdl.sgmcmc.stepsize import initial_square_avg, suggest_lr

__all__ = ["SGMCMCClassifier", "SGMCMCRegressor"]

SAMPLERS = ("sgld", "sghmc", "psgld")
# precision of the N(0, 1) prior on the regressor's log noise sd (standardised targets)
NOISE_PRIOR_PRECISION = 1.0
PRIORS = ("fan_in",)


def _prior_precisions(
    net: nn.Module, prior_precision: float | str, weight_variance: float
) -> list[float]:
    r"""Gaussian prior precision of every trainable parameter of ``net``, in parameter order.

    A float is one precision for every weight and bias. ``"fan_in"`` scales each linear
    layer's weight prior by its fan-in, :math:`w \sim \mathcal N(0, \sigma_w^2 / n_{\mathrm{in}})`
    (the parametrisation of the NNGP / He priors: a layer's prior pre-activation variance is
    :math:`\sigma_w^2` times its inputs' mean square, whatever its width), and gives biases
    :math:`\mathcal N(0, 1)`.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    if not isinstance(prior_precision, str):
        return [float(prior_precision)] * len(params)
    by_id = {}
    for module in net.modules():
        if isinstance(module, nn.Linear):
            by_id[id(module.weight)] = module.in_features / weight_variance
    return [by_id.get(id(p), 1.0) for p in params]


class _Standardizer:
    """Column means and scales from training data (constant columns keep scale 1)."""

    def __init__(self, values: np.ndarray) -> None:
        self.mean = values.mean(0)
        scale = values.std(0)
        self.scale = np.where(scale > 1e-12 * np.maximum(1.0, np.abs(self.mean)), scale, 1.0)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / self.scale


class _LogNoise(nn.Module):
    """Holds the per-output log noise standard deviation ``log_std`` (m,)."""

    def __init__(self, log_std: Tensor) -> None:
        super().__init__()
        self.log_std = nn.Parameter(log_std)


class _GaussianNet(nn.Module):
    """Mean network plus a per-output log noise sd; ``parameters()`` lists the noise last."""

    def __init__(self, net: nn.Module, log_noise_std: Tensor) -> None:
        super().__init__()
        self.net = net
        self.noise = _LogNoise(log_noise_std)

    @property
    def log_noise_std(self) -> Tensor:
        return self.noise.log_std

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, mean: Tensor, y: Tensor) -> Tensor:
        """Mean Gaussian negative log-likelihood (without the constant ``log(2 pi) / 2``)."""
        s = self.log_noise_std
        return (0.5 * (y - mean).pow(2) * torch.exp(-2.0 * s) + s).sum(-1).mean()


def _network(in_features: int, hidden: Sequence[int], out_features: int) -> nn.Sequential:
    width = hidden[-1] if hidden else in_features
    return nn.Sequential(*make_mlp(in_features, hidden), nn.Linear(width, out_features))


class _SGMCMCEstimator(BaseEstimator):
    """Shared machinery (not public): parameter checks, the sampling run, the collector."""

    def _check_params(self) -> None:
        sizes = () if self.hidden_sizes is None else tuple(self.hidden_sizes)
        for i, h in enumerate(sizes):
            check_int(f"hidden_sizes[{i}]", h)
        self.hidden_sizes_ = sizes
        check_choice("sampler", self.sampler, SAMPLERS)
        if self.lr is not None:
            check_positive("lr", self.lr)
        _check_real("momentum_decay", self.momentum_decay, 0.0, 1.0, low_open=True)
        if isinstance(self.prior_precision, str):
            check_choice("prior_precision", self.prior_precision, PRIORS)
        else:
            check_positive("prior_precision", self.prior_precision, allow_zero=True)
        check_positive("prior_weight_variance", self.prior_weight_variance)
        check_positive("temperature", self.temperature, allow_zero=True)
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size)
        check_int("n_cycles", self.n_cycles)
        _check_real("exploration_fraction", self.exploration_fraction, 0.0, 1.0, high_open=True)
        check_int("samples_per_cycle", self.samples_per_cycle)
        check_choice("device", str(torch.device(self.device).type), ("cpu", "cuda", "mps"))

    def _device(self) -> torch.device:
        return torch.device(self.device)

    def _tensor(self, values: np.ndarray) -> Tensor:
        return torch.as_tensor(values, dtype=torch.float32, device=self._device())

    def _seed(self) -> int:
        if isinstance(self.random_state, numbers.Integral):
            return int(self.random_state)
        return int(check_random_state(self.random_state).randint(0, 2**31 - 1))

    def _optimizer(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        x: Tensor,
        y: Tensor,
        priors: list[float],
        generator: torch.Generator,
        noise_generator: torch.Generator,
    ) -> torch.optim.Optimizer:
        """The sampler with one group per trainable parameter, ``lr`` from the heuristic."""
        params = [p for p in model.parameters() if p.requires_grad]
        n = x.shape[0]
        groups = [
            {"params": [p], "prior_precision": lam} for p, lam in zip(params, priors, strict=True)
        ]
        common = dict(num_data=n, temperature=float(self.temperature), generator=noise_generator)
        square_avg, eps = None, [1e-5] * len(params)
        if self.sampler == "psgld":
            square_avg = initial_square_avg(
                model, loss_fn, x, y, batch_size=min(self.batch_size, n), generator=generator
            )
            # eps relative to each tensor's RMS gradient: G = 1 / (eps + sqrt(V)) is at most
            # 10x the tensor's typical value, also where a gradient happened to be ~0 at the
            # start (dead units, constant inputs); an absolute eps is not scale-free (the
            # paper's 1e-5 is kept for a tensor without any gradient).
            eps = [0.1 * float(v.mean().sqrt()) or 1e-5 for v in square_avg]
            for group, e in zip(groups, eps, strict=True):
                group["eps"] = e
        lr = self.lr
        if lr is None:
            preconditioner = None
            if square_avg is not None:
                preconditioner = [
                    1.0 / (e + v.sqrt()) for v, e in zip(square_avg, eps, strict=True)
                ]
            lr = suggest_lr(
                model, loss_fn, x, y, num_data=n, sampler=self.sampler,
                momentum_decay=self.momentum_decay, prior_precision=priors,
                preconditioner=preconditioner, generator=generator,
            )  # fmt: skip
        self.lr_ = float(lr)
        if self.sampler == "sghmc":
            return SGHMC(groups, lr=self.lr_, momentum_decay=self.momentum_decay, **common)
        if self.sampler == "sgld":
            return SGLD(groups, lr=self.lr_, **common)
        # V starts at its estimate at the initial weights (RMSprop's zeros would make the
        # first steps ~10x larger than the step size was chosen for) and then adapts as in
        # pSGLD. (Freezing it there is unstable: units whose gradient was ~0 at the start
        # keep a large G after they start to learn.)
        opt = PSGLD(groups, lr=self.lr_, **common)
        for p, v in zip(params, square_avg, strict=True):
            opt.state[p]["square_avg"] = v.clone()
        return opt

    def _layout(self, steps_per_epoch: int) -> tuple[int, int, int]:
        """Total steps, number of cycles and thinning of the sampling phase.

        A cycle (a cut-short last one included) needs ``1 / (1 - beta)`` steps for a sampling
        step, so short runs get fewer (longer) cycles.
        """
        total = steps_per_epoch * self.epochs
        beta = self.exploration_fraction
        cycles = min(self.n_cycles, total)
        while cycles > 1 and min(CyclicalSchedule.sampling_steps(total, cycles, beta)) == 0:
            cycles -= 1
        sampling = CyclicalSchedule.sampling_steps(total, cycles, beta)[0]
        if sampling == 0:
            raise ValueError(
                f"epochs * ceil(n_samples / batch_size) = {total} steps are too few for a "
                f"sampling phase with exploration_fraction={beta}: raise epochs, lower "
                "batch_size or lower exploration_fraction"
            )
        thin = max(1, sampling // self.samples_per_cycle)
        return total, cycles, thin

    def _run(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        x: Tensor,
        y: Tensor,
        priors: list[float],
        seed: int,
        lr_scale: Callable[[], float] | None = None,
    ) -> None:
        """Sample, then keep the samples in a float64 copy of ``model`` for prediction.

        ``lr_scale`` (regressor): a factor applied, before every step, to the step size of every
        parameter group except the last (the log noise sd), on top of the schedule.
        """
        device = self._device()
        generator = torch.Generator().manual_seed(seed)
        noise_generator = torch.Generator(device=device).manual_seed(seed + 1)
        n = x.shape[0]
        batch = min(self.batch_size, n)
        opt = self._optimizer(model, loss_fn, x, y, priors, generator, noise_generator)
        steps_per_epoch = math.ceil(n / batch)
        total, cycles, thin = self._layout(steps_per_epoch)
        schedule = CyclicalSchedule(opt, total, cycles, self.exploration_fraction)
        collector = SampleCollector(model, thin=thin, schedule=schedule)
        self.n_cycles_, self.loss_curve_ = cycles, []
        model.train()
        for _ in range(self.epochs):
            running, count = torch.zeros((), device=device), 0
            for idx in shuffled_batches(n, batch, generator, device):
                if lr_scale is not None:
                    factor = lr_scale()
                    for group, base in zip(
                        opt.param_groups[:-1], schedule.get_last_lr()[:-1], strict=True
                    ):
                        group["lr"] = base * factor
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                collector.update()
                schedule.step()
                running += loss.detach() * idx.shape[0]
                count += idx.shape[0]
            self.loss_curve_.append(float(running) / count)
            if self.verbose:
                print(f"epoch {len(self.loss_curve_)}: mean loss {self.loss_curve_[-1]:.4f}")
        state = collector.state_dict()
        model.eval()
        self.model_ = model.double()
        self.collector_ = SampleCollector(self.model_, dtype=torch.float64)
        self.collector_.load_state_dict(state)
        self.n_samples_ = len(self.collector_)

    def _inputs(self, X) -> Tensor:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return torch.as_tensor(self.x_scaler_(X), dtype=torch.float64, device=self._device())

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.random_state is None
        return tags


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
        ``"fan_in"``: weights ``N(0, prior_weight_variance / fan_in)``, biases ``N(0, 1)``;
        a float: the precision of an isotropic Gaussian prior on every weight and bias (0:
        flat).
    prior_weight_variance : float
        ``sigma_w^2`` of the ``"fan_in"`` prior (ignored for a float ``prior_precision``).
    temperature : float
        Posterior temperature ``T`` (target ``exp(-U / T)``; 1 is the Bayesian posterior).
    epochs : int
        Passes over the training data.
    batch_size : int
        Minibatch size.
    n_cycles : int
        Cycles of the cosine schedule (fewer when the run is too short; fitted ``n_cycles_``).
    exploration_fraction : float
        Fraction ``beta`` in ``[0, 1)`` of each cycle without noise.
    samples_per_cycle : int
        About this many states are kept from each cycle's sampling phase.
    device : str
        Torch device to sample on.
    random_state : int, RandomState or None
        Seed of the initialisation, minibatch order and injected noise.
    verbose : bool
        Print the mean training loss of every epoch."""


class SGMCMCClassifier(ClassifierMixin, _SGMCMCEstimator):
    __doc__ = (
        "Bayesian MLP classifier sampled by cyclical SG-MCMC (see the module docstring).\n\n"
        "    Parameters\n    ----------" + _PARAMS_DOC + "\n"
    )

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (128, 128),
        sampler: str = "sghmc",
        lr: float | None = None,
        momentum_decay: float = 0.1,
        prior_precision: float | str = "fan_in",
        prior_weight_variance: float = 32.0,
        temperature: float = 1.0,
        epochs: int = 40,
        batch_size: int = 64,
        n_cycles: int = 8,
        exploration_fraction: float = 0.8,
        samples_per_cycle: int = 4,
        device: str = "cpu",
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

    def fit(self, X, y) -> SGMCMCClassifier:
        """Sample the posterior given ``X`` (n, d) and labels ``y`` (n,); returns self."""
        self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"y must contain at least 2 classes, got 1 class: {self.classes_.tolist()}"
            )
        self.x_scaler_ = _Standardizer(X)
        x_t = self._tensor(self.x_scaler_(X))
        y_t = torch.as_tensor(y_idx, dtype=torch.long, device=self._device())
        seed = self._seed()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _network(X.shape[1], self.hidden_sizes_, len(self.classes_))
        model = model.to(self._device())
        priors = _prior_precisions(model, self.prior_precision, self.prior_weight_variance)
        self._run(model, F.cross_entropy, x_t, y_t, priors, seed)
        return self

    def posterior(self, X) -> CategoricalPosterior:
        """Predictive class probabilities at ``X`` (n, d): probs (n, C), prob_samples (S, n, C)."""
        x = self._inputs(X)
        return self.collector_.posterior(x)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n, C), columns ordered as ``classes_``."""
        probs = self.posterior(X).probs.cpu().numpy()
        return probs / probs.sum(1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        """Most probable class label for each row of ``X``."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class SGMCMCRegressor(RegressorMixin, _SGMCMCEstimator):
    __doc__ = (
        "Bayesian MLP regressor sampled by cyclical SG-MCMC, with the Gaussian noise sampled\n"
        "    too (see the module docstring).\n\n"
        "    Parameters\n    ----------" + _PARAMS_DOC + "\n"
    )

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (128, 128),
        sampler: str = "sghmc",
        lr: float | None = None,
        momentum_decay: float = 0.1,
        prior_precision: float | str = "fan_in",
        prior_weight_variance: float = 32.0,
        temperature: float = 1.0,
        epochs: int = 40,
        batch_size: int = 64,
        n_cycles: int = 8,
        exploration_fraction: float = 0.8,
        samples_per_cycle: int = 4,
        device: str = "cpu",
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

    def fit(self, X, y) -> SGMCMCRegressor:
        """Sample the posterior given ``X`` (n, d) and targets ``y`` (n,) or (n, m)."""
        self._check_params()
        y_array = np.asarray(y)
        if y_array.dtype.kind in "USaV":
            raise ValueError(f"y must be numeric for regression, got dtype {y_array.dtype}")
        X, y = validate_data(self, X, y, y_numeric=True, multi_output=True, dtype=np.float64)
        self._y_1d = y.ndim == 1
        y2 = y.reshape(len(y), -1)
        self.x_scaler_, self.y_scaler_ = _Standardizer(X), _Standardizer(y2)
        xs, ys = self.x_scaler_(X), self.y_scaler_(y2)
        x_t, y_t = self._tensor(xs), self._tensor(ys)
        seed = self._seed()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _network(X.shape[1], self.hidden_sizes_, y2.shape[1])
        net = net.to(self._device())
        with torch.no_grad():
            # s starts at its conditional mode given the initial weights, log rms residual
            # (so the curvature the step-size heuristic sees is that of a consistent state:
            # 2 along s exactly, 1 / sigma^2 along the mean's directions)
            resid = (y_t - net(x_t)).pow(2).mean(0).clamp_min(1e-6)
        model = _GaussianNet(net, 0.5 * resid.log())
        # one optimizer group per parameter, in model order: the noise's is the last
        priors = _prior_precisions(net, self.prior_precision, self.prior_weight_variance) + [
            NOISE_PRIOR_PRECISION
        ]
        start = float(torch.exp(-2.0 * model.log_noise_std.detach()).sum())

        def lr_scale() -> float:
            # sigma^2 preconditioning of the network weights (module docstring, item 2)
            return start / float(torch.exp(-2.0 * model.log_noise_std.detach()).sum())

        self._run(model, model.loss, x_t, y_t, priors, seed, lr_scale)
        return self

    def _noise_variance_samples(self) -> Tensor:
        """Per-sample noise variances in standardised units, shape (S, 1, m)."""
        offset = 0
        for p in self.model_.parameters():
            if p is self.model_.log_noise_std:
                break
            offset += p.numel()
        m = self.model_.log_noise_std.numel()
        log_std = self.collector_.samples[:, offset : offset + m]
        return torch.exp(2.0 * log_std).unsqueeze(1)

    def posterior(self, X, observation_noise: bool = False) -> SamplePosterior:
        """Predictive at ``X`` (n, d) in the original target units: samples (S, n, m).

        The latent function's sample mixture unless ``observation_noise=True``, which adds
        each sample's own noise variance (BoTorch convention).
        """
        x = self._inputs(X)
        post = self.collector_.posterior(x, task="regression")
        scale = torch.as_tensor(self.y_scaler_.scale, dtype=post.samples.dtype, device=x.device)
        shift = torch.as_tensor(self.y_scaler_.mean, dtype=post.samples.dtype, device=x.device)
        noise = self._noise_variance_samples() * scale**2 if observation_noise else None
        return SamplePosterior(post.samples * scale + shift, noise_variance=noise)

    def predict(self, X, return_std: bool = False):
        """Predictive mean (n,) or (n, m); with ``return_std`` also the predictive standard
        deviation, observation noise included (mixture over samples)."""
        post = self.posterior(X, observation_noise=True)
        mean = post.mean.cpu().numpy()
        std = post.variance.sqrt().cpu().numpy()
        if self._y_1d:
            mean, std = mean[:, 0], std[:, 0]
        return (mean, std) if return_std else mean

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

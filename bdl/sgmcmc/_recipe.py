r"""The parts of the SG-MCMC estimators' recipe: network, prior, sampler, cycle layout.

The user guide's "Estimators" section explains each choice; in short, ``fit`` builds a ReLU
MLP with a per-layer Gaussian prior (:func:`prior_precisions`), for regression wraps it with
a sampled log noise standard deviation (:class:`GaussianNet`), builds the sampler with one
parameter group per tensor and the step size of :func:`~bdl.sgmcmc.suggest_lr`
(:func:`build_sampler`) and runs a cyclical schedule whose length and thinning come from
:func:`cycle_layout`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bdl.nets import make_mlp
from bdl.sgmcmc.psgld import PSGLD
from bdl.sgmcmc.schedule import CyclicalSchedule
from bdl.sgmcmc.sghmc import SGHMC
from bdl.sgmcmc.sgld import SGLD
from bdl.sgmcmc.stepsize import initial_square_avg, suggest_lr

__all__ = [
    "GaussianNet",
    "build_sampler",
    "cycle_layout",
    "network",
    "prior_precisions",
]

SAMPLERS = ("sgld", "sghmc", "psgld")
PRIORS = ("fan_in",)
#: precision of the N(0, 1) prior on the regressor's log noise sd (standardised targets)
NOISE_PRIOR_PRECISION = 1.0
LossFn = Callable[[Tensor, Tensor], Tensor]


def network(in_features: int, hidden: Sequence[int], out_features: int) -> nn.Sequential:
    """ReLU MLP with hidden widths ``hidden`` and a linear output layer."""
    width = hidden[-1] if hidden else in_features
    return nn.Sequential(*make_mlp(in_features, hidden), nn.Linear(width, out_features))


def prior_precisions(
    net: nn.Module, prior_precision: float | str, weight_variance: float | Sequence[float]
) -> list[float]:
    r"""Gaussian prior precision of every trainable parameter of ``net``, in parameter order.

    A float is one precision for every weight and bias. ``"fan_in"`` scales each linear
    layer's weight prior by its fan-in, :math:`w \sim \mathcal N(0, \sigma_w^2 / n_{\mathrm{in}})`
    (the parametrisation of the NNGP / He priors: a layer's prior pre-activation variance is
    :math:`\sigma_w^2` times its inputs' mean square, whatever its width), and gives biases
    :math:`\mathcal N(0, 1)`. ``weight_variance`` is :math:`\sigma_w^2`, one float for every
    layer or a pair: that of the input layer (the first linear layer) and that of every
    later layer.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    if not isinstance(prior_precision, str):
        return [float(prior_precision)] * len(params)
    first, later = _variance_pair(weight_variance)
    by_id = {}
    for i, module in enumerate(m for m in net.modules() if isinstance(m, nn.Linear)):
        by_id[id(module.weight)] = module.in_features / (first if i == 0 else later)
    return [by_id.get(id(p), 1.0) for p in params]


def _variance_pair(weight_variance: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(weight_variance, (tuple, list)):
        first, later = weight_variance
        return float(first), float(later)
    return float(weight_variance), float(weight_variance)


class _LogNoise(nn.Module):
    """Holds the per-output log noise standard deviation ``log_std`` (m,)."""

    def __init__(self, log_std: Tensor) -> None:
        super().__init__()
        self.log_std = nn.Parameter(log_std)


class GaussianNet(nn.Module):
    """Mean network plus a per-output log noise sd ``noise.log_std``, listed last in
    ``parameters()`` (so the sampler's last parameter group is the noise's)."""

    NOISE = "noise.log_std"

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


def build_sampler(
    sampler: str,
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    priors: list[float],
    *,
    lr: float | None,
    momentum_decay: float,
    temperature: float,
    batch_size: int,
    generator: torch.Generator,
    noise_generator: torch.Generator,
) -> torch.optim.Optimizer:
    """The sampler with one group per trainable parameter; ``lr`` from the heuristic if None.

    ``generator`` drives the step-size heuristic's subsets (and pSGLD's initial gradient
    statistics), ``noise_generator`` the injected noise.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    n = x.shape[0]
    groups = [
        {"params": [p], "prior_precision": lam} for p, lam in zip(params, priors, strict=True)
    ]
    common = dict(num_data=n, temperature=float(temperature), generator=noise_generator)
    square_avg, eps = None, [1e-5] * len(params)
    if sampler == "psgld":
        square_avg = initial_square_avg(
            model, loss_fn, x, y, batch_size=min(batch_size, n), generator=generator
        )
        # eps relative to each tensor's RMS gradient: G = 1 / (eps + sqrt(V)) is at most
        # 10x the tensor's typical value, also where a gradient happened to be ~0 at the
        # start (dead units, constant inputs); an absolute eps is not scale-free (the
        # paper's 1e-5 is kept for a tensor without any gradient).
        eps = [0.1 * float(v.mean().sqrt()) or 1e-5 for v in square_avg]
        for group, e in zip(groups, eps, strict=True):
            group["eps"] = e
    if lr is None:
        preconditioner = None
        if square_avg is not None:
            preconditioner = [1.0 / (e + v.sqrt()) for v, e in zip(square_avg, eps, strict=True)]
        lr = suggest_lr(
            model, loss_fn, x, y, num_data=n, sampler=sampler, momentum_decay=momentum_decay,
            prior_precision=priors, preconditioner=preconditioner, generator=generator,
        )  # fmt: skip
    lr = float(lr)
    if sampler == "sghmc":
        return SGHMC(groups, lr=lr, momentum_decay=momentum_decay, **common)
    if sampler == "sgld":
        return SGLD(groups, lr=lr, **common)
    # V starts at its estimate at the initial weights (RMSprop's zeros would make the first
    # steps ~10x larger than the step size was chosen for) and then adapts as in pSGLD.
    # (Freezing it there is unstable: units whose gradient was ~0 at the start keep a large
    # G after they start to learn.)
    opt = PSGLD(groups, lr=lr, **common)
    for p, v in zip(params, square_avg, strict=True):
        opt.state[p]["square_avg"] = v.clone()
    return opt


def cycle_layout(
    steps_per_epoch: int,
    epochs: int,
    n_cycles: int,
    exploration_fraction: float,
    samples_per_cycle: int,
) -> tuple[int, int, int]:
    """Total steps, number of cycles and thinning of the sampling phase.

    A cycle (a cut-short last one included) needs ``1 / (1 - beta)`` steps for a sampling
    step, so short runs get fewer (longer) cycles.

    Raises
    ------
    ValueError
        If even one cycle over all the steps has no sampling step.
    """
    total = steps_per_epoch * epochs
    beta = exploration_fraction
    cycles = min(n_cycles, total)
    while cycles > 1 and min(CyclicalSchedule.sampling_steps(total, cycles, beta)) == 0:
        cycles -= 1
    sampling = CyclicalSchedule.sampling_steps(total, cycles, beta)[0]
    if sampling == 0:
        raise ValueError(
            f"epochs * ceil(n_samples / batch_size) = {total} steps are too few for a "
            f"sampling phase with exploration_fraction={beta}: raise epochs, lower "
            "batch_size or lower exploration_fraction"
        )
    return total, cycles, max(1, sampling // samples_per_cycle)

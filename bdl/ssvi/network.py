"""A network with sparse Bayesian layers as a :class:`bdl.core.Model`, and :func:`sparsify`."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdl.core.categorical import CategoricalPosterior
from bdl.core.model import Model
from bdl.core.samples import SamplePosterior
from bdl.core.training import seeded_generator, training_mode
from bdl.core.validation import check_choice, check_inputs, check_int, network_input
from bdl.ssvi.layers import SparseBayesConv2d, SparseBayesLayer, SparseBayesLinear, sparse_layers

__all__ = ["SSVINetwork", "sparsify"]

TASKS = ("classification", "regression")
#: weight draws of ``posterior`` when ``num_samples`` is not given
DEFAULT_NUM_SAMPLES = 32


def sparsify(
    model: nn.Module,
    density: float = 0.1,
    *,
    task: str = "classification",
    first_conv_dense: bool = True,
    prior_std: float = 1.0,
    init_std: float = 1e-3,
    noise_std: float = 1.0,
    sparse_kernel: bool | str = "auto",
    allocation: str = "uniform",
    seed: int | None = None,
) -> SSVINetwork:
    """A copy of ``model`` whose ``nn.Linear``/``nn.Conv2d`` layers are sparse Bayesian ones.

    Parameters
    ----------
    model : nn.Module
        The architecture (its weights are not used: the variational means start from He's
        initialisation on the random support).
    density : float, default 0.1
        Fraction of active weights in every converted layer (uniform per layer).
    task : {"classification", "regression"}
    first_conv_dense : bool, default True
        Keep the first ``nn.Conv2d`` at density 1 (it has few weights and sees the raw input).
    prior_std, init_std : float
        Prior standard deviation and initial posterior standard deviation of every weight.
    noise_std : float, default 1.0
        Initial observation-noise standard deviation (regression; learned).
    sparse_kernel : bool or "auto", default "auto"
        Deterministic passes of linear layers through CSR sparse products (see
        :class:`~bdl.ssvi.SparseBayesLinear`).
    allocation : {"uniform", "erk"}, default "uniform"
        How the active weights are spread over the layers (:func:`layer_densities`); the total
        number of active weights is the same.
    seed : int, optional
        Seeds the supports and initial means.

    Returns
    -------
    SSVINetwork
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must lie in (0, 1], got {density!r}")
    net = copy.deepcopy(model)
    if isinstance(net, nn.Linear | nn.Conv2d):  # a bare layer: convert it as a child
        net = nn.Sequential(net)
    first_conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    densities = layer_densities(net, density, allocation, first_conv if first_conv_dense else None)
    generator = seeded_generator(seed)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=generator)))
        _convert(net, densities, prior_std, init_std, sparse_kernel)
    if not any(True for _ in sparse_layers(net)):
        raise ValueError("model has no nn.Linear or nn.Conv2d layer to make Bayesian")
    return SSVINetwork(net, task=task, noise_std=noise_std)


ALLOCATIONS = ("uniform", "erk")


def layer_densities(
    net: nn.Module, density: float, allocation: str, dense_conv: nn.Module | None
) -> dict[nn.Module, float]:
    """Density of every ``nn.Linear``/``nn.Conv2d`` of ``net``.

    ``"uniform"``: ``density`` everywhere. ``"erk"`` (Erdős–Rényi-kernel; Mocanu et al., Nat.
    Commun. 2018; Evci et al., ICML 2020): density proportional to ``sum(dims) / prod(dims)``
    of the weight shape (small and thin layers, e.g. the output layer, get more), scaled so
    that the layers together keep exactly the same number of active weights as uniform
    density, capped at 1. ``dense_conv`` stays dense in both, outside the budget.
    """
    check_choice("allocation", allocation, ALLOCATIONS)
    layers = [m for m in net.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    out = {m: 1.0 for m in layers if m is dense_conv}
    sparse = [m for m in layers if m is not dense_conv]
    if allocation == "uniform":
        return {**out, **{m: density for m in sparse}}
    shapes = {m: tuple(m.weight.shape) for m in sparse}
    numel = {m: math.prod(shape) for m, shape in shapes.items()}
    budget = density * sum(numel.values())
    free = list(sparse)
    while free:  # cap at 1 and spread the rest over the others
        raw = {m: sum(shapes[m]) / numel[m] for m in free}
        scale = (budget - sum(numel[m] for m in sparse if m not in free)) / sum(
            raw[m] * numel[m] for m in free
        )
        capped = [m for m in free if scale * raw[m] >= 1.0]
        if not capped:
            out.update({m: scale * raw[m] for m in free})
            break
        out.update({m: 1.0 for m in capped})
        free = [m for m in free if m not in capped]
    return {**{m: 1.0 for m in sparse}, **out}


def _convert(
    module: nn.Module,
    densities: dict[nn.Module, float],
    prior_std: float,
    init_std: float,
    sparse_kernel: bool | str,
) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            layer = SparseBayesLinear(
                child.in_features, child.out_features, child.bias is not None,
                density=densities[child], prior_std=prior_std, init_std=init_std,
                sparse_kernel=sparse_kernel,
            )  # fmt: skip
        elif isinstance(child, nn.Conv2d):
            if child.padding_mode != "zeros":
                raise ValueError(f"layer {name!r}: only padding_mode='zeros' is supported")
            layer = SparseBayesConv2d(
                child.in_channels, child.out_channels, child.kernel_size, child.stride,
                child.padding, child.dilation, child.groups, child.bias is not None,
                density=densities[child], prior_std=prior_std, init_std=init_std,
            )  # fmt: skip
        else:
            _convert(child, densities, prior_std, init_std, sparse_kernel)
            continue
        setattr(module, name, layer.to(_param_dtype(child)))


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class SSVINetwork(nn.Module, Model):
    """A network of sparse mean-field Bayesian layers (built by :func:`sparsify`).

    ``posterior(X)`` averages over ``num_samples`` weight draws (seeded, so the posterior is a
    deterministic function of ``X``): class probabilities for classification, function
    draws (with the learned homoscedastic noise when ``observation_noise=True``) for
    regression.

    Parameters
    ----------
    net : nn.Module
        A network containing :class:`~bdl.ssvi.SparseBayesLinear` /
        :class:`~bdl.ssvi.SparseBayesConv2d` layers; its output is logits (classification) or
        the regression mean, shape (..., n, m) (or (..., n) for one output).
    task : {"classification", "regression"}
    noise_std : float
        Initial observation-noise standard deviation (regression).
    num_samples : int, default 32
        Weight draws of :meth:`posterior`.
    """

    def __init__(
        self,
        net: nn.Module,
        task: str = "classification",
        noise_std: float = 1.0,
        num_samples: int = DEFAULT_NUM_SAMPLES,
    ) -> None:
        super().__init__()
        self.net = net
        self._layers: list[SparseBayesLayer] | None = None
        self.task = check_choice("task", task, TASKS)
        self.num_samples = check_int("num_samples", num_samples)
        self.log_noise_std = nn.Parameter(torch.tensor(math.log(noise_std)))
        if task == "classification":
            self.log_noise_std.requires_grad_(False)

    @property
    def layers(self) -> list[SparseBayesLayer]:
        """The sparse Bayesian layers of :attr:`net`, in module order (found once: the KL and
        every weight draw walk them)."""
        if self._layers is None:
            self._layers = list(sparse_layers(self.net))
        return self._layers

    @property
    def num_outputs(self) -> int:
        last = self.layers[-1]
        return last.weight_shape[0]

    @property
    def density(self) -> float:
        """Active fraction of all weights of the sparse layers (biases excluded)."""
        return sum(m.num_active for m in self.layers) / sum(m.numel for m in self.layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out.unsqueeze(-1) if self.task == "regression" and out.dim() == x.dim() - 1 else out

    def kl_divergence(self) -> Tensor:
        return sum(m.kl_divergence() for m in self.layers)

    def data_loss(self, out: Tensor, y: Tensor) -> Tensor:
        """Mean negative log-likelihood of a batch given network outputs ``out``."""
        if self.task == "classification":
            return F.cross_entropy(out, y.long())
        y = y.reshape(out.shape)
        log_sd = self.log_noise_std
        return (
            (0.5 * ((y - out) / log_sd.exp()) ** 2 + log_sd + 0.5 * math.log(2 * math.pi))
            .sum(-1)
            .mean()
        )

    # -- weight draws ----------------------------------------------------------------------
    def _draws(self, num: int, seed: int | None) -> list[tuple[Tensor, Tensor | None]]:
        generator = seeded_generator(seed)
        return [m.sample_values(num, generator) for m in self.layers]

    def _forward_with(self, X: Tensor, draws: list[tuple[Tensor, Tensor | None]], s: int) -> Tensor:
        layers = self.layers
        try:
            for m, (w, b) in zip(layers, draws, strict=True):
                m.use_weights(w[s].to(X.dtype), None if b is None else b[s].to(X.dtype))
            return self(X)
        finally:
            for m in layers:
                m.use_weights(None)

    def sample_functions(
        self, num_samples: int, *, seed: int | None = None
    ) -> Callable[[Tensor], Tensor]:
        """``num_samples`` weight draws as one deterministic function of ``X``.

        Returns
        -------
        callable
            ``f(X)`` (..., n, d) -> (S, ..., n, m): regression means, or logits for
            classification; differentiable in ``X``.
        """
        check_int("num_samples", num_samples)
        draws = self._draws(num_samples, seed)

        def f(X: Tensor) -> Tensor:
            with training_mode(self, False), network_input(X):
                return torch.stack([self._forward_with(X, draws, s) for s in range(num_samples)])

        return f

    def posterior(
        self,
        X: Tensor,
        *,
        observation_noise: bool = False,
        joint: bool = False,
        num_samples: int | None = None,
        seed: int = 0,
    ) -> CategoricalPosterior | SamplePosterior:
        """Predictive distribution at ``X`` averaged over weight draws.

        Parameters
        ----------
        X : Tensor, shape (..., n, d) (or the network's own input layout)
        observation_noise : bool
            Regression: add the learned noise variance to every draw.
        joint : bool
            No effect: every draw is a whole function, so the draws are joint.
        num_samples : int, optional
            Weight draws (default :attr:`num_samples`).
        seed : int, default 0
            Seed of the draws.

        Returns
        -------
        CategoricalPosterior (classification, with ``prob_samples``) or SamplePosterior.
        """
        X = check_inputs(X)
        num = self.num_samples if num_samples is None else check_int("num_samples", num_samples)
        outputs = self.sample_functions(num, seed=seed)(X)
        if self.task == "classification":
            probs = outputs.softmax(-1)
            return CategoricalPosterior(probs.mean(0), prob_samples=probs)
        noise = (2 * self.log_noise_std).exp().to(X.dtype) if observation_noise else None
        return SamplePosterior(outputs, noise_variance=noise)

    def fit(
        self,
        data: Any,
        *,
        epochs: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        verbose: bool = False,
        **trainer_options: Any,
    ) -> SSVINetwork:
        """Train by sparse subspace VI (:class:`bdl.ssvi.SSVI`); ``data`` is ``(X, y)``."""
        from bdl.ssvi.trainer import SSVI

        SSVI(self, **trainer_options).fit(
            data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, verbose=verbose
        )
        return self

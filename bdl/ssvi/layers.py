"""Sparse mean-field Bayesian layers: only the active weights exist.

A layer with ``D`` weights at density ``rho`` holds ``s = round(rho D)`` *slots*: the flat index
of each active weight (``index``, an int32 buffer) and its variational mean ``mu`` and raw scale
``rho_raw`` (``sigma = softplus(rho_raw)``), parameters of shape ``(s,)``. Parameter memory is
therefore proportional to the density, the mean and the scale share the support by
construction, and an inactive weight has no parameter, gradient or optimiser state at all
(:meth:`SparseBayesLayer.mask` and :meth:`~SparseBayesLayer.dense_mean` show them as zeros).
A topology update (:meth:`SparseBayesLayer.replace`) moves slots to new indices and resets
their values; the trainer resets their optimiser state.

The forward pass in training mode uses the local reparameterisation trick (Kingma, Salimans &
Welling, NeurIPS 2015): ``out = op(x, W_mu) + sqrt(op(x^2, W_sigma^2) + 1e-8) * eps``. With
a fixed weight draw (:meth:`SparseBayesLayer.use_weights`) or in eval mode without one (the
posterior mean weights), it is deterministic. Biases are dense mean-field Gaussians.
:class:`SparseBayesLinear` can run its deterministic pass through a compressed sparse row
matrix product (``sparse_kernel=True``), which is faster than the dense product at low
densities and large widths (``benchmarks/bench_ssvi.py`` measures where).
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdl.core.validation import check_int, check_positive

__all__ = ["SparseBayesConv2d", "SparseBayesLayer", "SparseBayesLinear", "num_active"]

#: added under the square root of the local-reparameterisation variance
LRT_EPS = 1e-8
#: ``sparse_kernel="auto"``: the CSR product for layers at most this dense ...
CSR_MAX_DENSITY = 0.1
#: ... with at least this many weights (256 x 256)
CSR_MIN_NUMEL = 65536


def num_active(numel: int, density: float) -> int:
    """Active weights of a tensor with ``numel`` entries at ``density`` (at least one)."""
    return max(1, min(numel, round(density * numel)))


def _inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class SparseBayesLayer(nn.Module, ABC):
    """Shared slot storage, KL and topology of the sparse layers (not used directly).

    Parameters
    ----------
    weight_shape : tuple of int
        Shape of the dense weight tensor.
    bias_size : int or None
        Length of the dense bias (None: no bias).
    density : float
        Fraction of active weights, in (0, 1].
    prior_std : float
        Standard deviation of the N(0, prior_std^2) prior on every weight and bias.
    init_std : float
        Initial posterior standard deviation.
    mean_init_std : float, optional
        Standard deviation of the initial means (default He's ``sqrt(2 / fan_in)``, scaled by
        ``1 / sqrt(density)`` so a sparse layer's pre-activations start at the dense scale).
    """

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        bias_size: int | None,
        density: float,
        prior_std: float,
        init_std: float,
        mean_init_std: float | None,
    ) -> None:
        super().__init__()
        if not 0 < density <= 1:
            raise ValueError(f"density must lie in (0, 1], got {density!r}")
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.prior_std = check_positive("prior_std", prior_std)
        numel = math.prod(self.weight_shape)
        s = num_active(numel, density)
        fan_in = numel // self.weight_shape[0]
        std = math.sqrt(2.0 / fan_in / (s / numel)) if mean_init_std is None else mean_init_std
        # int32 flat indices (4 bytes per active weight; a layer has < 2^31 weights)
        index = torch.randperm(numel)[:s].sort().values.to(torch.int32)
        self.register_buffer("index", index)
        self.mu = nn.Parameter(std * torch.randn(s))
        rho0 = _inverse_softplus(check_positive("init_std", init_std))
        self.rho_raw = nn.Parameter(torch.full((s,), rho0))
        if bias_size is None:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_rho_raw", None)
        else:
            self.bias_mu = nn.Parameter(torch.zeros(bias_size))
            self.bias_rho_raw = nn.Parameter(torch.full((bias_size,), rho0))
        self._fixed: tuple[Tensor, Tensor | None] | None = None
        self._dense_override: Tensor | None = None
        self.topology_version = 0

    # -- support ---------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def num_active(self) -> int:
        return self.index.numel()

    @property
    def density(self) -> float:
        return self.num_active / self.numel

    def mask(self) -> Tensor:
        """Boolean support of the dense weight, shape ``weight_shape``."""
        flat = torch.zeros(self.numel, dtype=torch.bool, device=self.index.device)
        flat[self.index.long()] = True
        return flat.reshape(self.weight_shape)

    def _scatter(self, values: Tensor) -> Tensor:
        """Dense weight tensor with ``values`` (..., s) at the active indices, zeros elsewhere."""
        lead = values.shape[:-1]
        dense = values.new_zeros(lead + (self.numel,))
        dense = dense.index_copy(-1, self.index.long(), values)
        return dense.reshape(lead + self.weight_shape)

    @property
    def sigma(self) -> Tensor:
        return F.softplus(self.rho_raw)

    def dense_mean(self) -> Tensor:
        return self._scatter(self.mu)

    def dense_std(self) -> Tensor:
        return self._scatter(self.sigma)

    # -- KL --------------------------------------------------------------------------------
    def kl_divergence(self) -> Tensor:
        """``KL(q || p)`` over the active weights and the bias (a sum)."""
        kl = _normal_kl(self.mu, self.sigma, self.prior_std)
        if self.bias_mu is not None:
            kl = kl + _normal_kl(self.bias_mu, F.softplus(self.bias_rho_raw), self.prior_std)
        return kl

    # -- forward ---------------------------------------------------------------------------
    @abstractmethod
    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The layer's operation (linear map or convolution) with dense ``weight``."""

    def forward(self, x: Tensor) -> Tensor:
        if self._dense_override is not None:  # dense gradient of the means (growth step)
            return self._op(x, self._dense_override, self.bias_mu)
        if self._fixed is not None:
            values, bias = self._fixed
            return self._deterministic(x, values, bias)
        if not self.training:
            return self._deterministic(x, self.mu, self.bias_mu)
        mean = self._op(x, self.dense_mean(), self.bias_mu)
        bias_var = None if self.bias_mu is None else F.softplus(self.bias_rho_raw) ** 2
        var = self._op(x * x, self._scatter(self.sigma**2), bias_var)
        return mean + torch.sqrt(var + LRT_EPS) * torch.randn_like(mean)

    def _deterministic(self, x: Tensor, values: Tensor, bias: Tensor | None) -> Tensor:
        return self._op(x, self._scatter(values), bias)

    def sample_values(
        self, num: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``num`` draws of the active weights (num, s) and of the bias (num, out) or None."""
        eps = torch.randn((num, self.num_active), generator=generator).to(self.mu)
        weights = (self.mu + self.sigma * eps).detach()
        if self.bias_mu is None:
            return weights, None
        eps_b = torch.randn((num,) + self.bias_mu.shape, generator=generator).to(self.mu)
        return weights, (self.bias_mu + F.softplus(self.bias_rho_raw) * eps_b).detach()

    def use_weights(self, values: Tensor | None, bias: Tensor | None = None) -> None:
        """Fix the active weights to ``values`` (s,) (and the bias) for deterministic passes;
        ``None`` returns to the variational distribution."""
        self._fixed = None if values is None else (values, bias)

    # -- topology --------------------------------------------------------------------------
    def replace(self, remove: Tensor, grow: Tensor, grown_rho: float) -> Tensor:
        """Move the slots ``remove`` (slot positions) to the inactive flat indices ``grow``.

        The moved slots get mean 0 and raw scale ``grown_rho``; slots are kept sorted by
        index. Returns the permutation applied to the slots (new slot ``i`` was old slot
        ``perm[i]``), for the optimiser state.
        """
        if remove.numel() != grow.numel():
            raise ValueError("remove and grow must have the same length")
        with torch.no_grad():
            index = self.index.clone()
            index[remove] = grow.to(index)
            order = index.argsort()
            self.index.copy_(index[order])
            fresh = torch.zeros(self.num_active, dtype=torch.bool, device=index.device)
            fresh[remove] = True
            for param, value in ((self.mu, 0.0), (self.rho_raw, grown_rho)):
                updated = torch.where(fresh, torch.full_like(param, value), param)
                param.copy_(updated[order])
        self.topology_version += 1
        return order

    def extra_repr(self) -> str:
        return (
            f"weight_shape={self.weight_shape}, density={self.density:.3g} "
            f"({self.num_active} of {self.numel}), prior_std={self.prior_std:g}"
        )


def _normal_kl(mu: Tensor, sigma: Tensor, prior_std: float) -> Tensor:
    """``sum KL(N(mu, sigma^2) || N(0, prior_std^2))``."""
    ratio = (sigma / prior_std) ** 2
    return 0.5 * (ratio + (mu / prior_std) ** 2 - 1.0 - ratio.log()).sum()


class SparseBayesLinear(SparseBayesLayer):
    """Sparse mean-field Bayesian ``nn.Linear`` (see the module docstring).

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    density : float, default 0.1
    prior_std : float, default 1.0
    init_std : float, default 1e-3
    mean_init_std : float, optional
    sparse_kernel : bool or "auto", default "auto"
        Deterministic passes without gradients (eval mode under ``torch.no_grad()``, or fixed
        weight draws) through a CSR sparse matrix product: always (True), never (False), or
        where it is faster on a CPU (``"auto"``: density at most :data:`CSR_MAX_DENSITY` and at
        least :data:`CSR_MIN_NUMEL` weights; ``benchmarks/bench_ssvi.py`` measured the CSR
        product ahead of the dense one at density <= 0.1 from 256 x 256 weights up, behind it
        at density >= 0.3). Training passes always use the dense zero-filled kernel.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        density: float = 0.1,
        prior_std: float = 1.0,
        init_std: float = 1e-3,
        mean_init_std: float | None = None,
        sparse_kernel: bool | str = "auto",
    ) -> None:
        check_int("in_features", in_features)
        if sparse_kernel not in (True, False, "auto"):
            raise ValueError(f"sparse_kernel must be True, False or 'auto', got {sparse_kernel!r}")
        check_int("out_features", out_features)
        super().__init__(
            (out_features, in_features), out_features if bias else None, density, prior_std,
            init_std, mean_init_std,
        )  # fmt: skip
        self.in_features, self.out_features = in_features, out_features
        self.sparse_kernel = sparse_kernel
        self._csr_cache: tuple[int, Tensor, Tensor] | None = None

    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def uses_csr(self) -> bool:
        """Whether deterministic passes without gradients use the CSR product."""
        if self.sparse_kernel == "auto":
            return self.density <= CSR_MAX_DENSITY and self.numel >= CSR_MIN_NUMEL
        return bool(self.sparse_kernel)

    def _deterministic(self, x: Tensor, values: Tensor, bias: Tensor | None) -> Tensor:
        if not self.uses_csr() or torch.is_grad_enabled() and values.requires_grad:
            return super()._deterministic(x, values, bias)
        crow, col = self._csr_structure()
        flat = x.reshape(-1, self.in_features)
        with warnings.catch_warnings():  # torch's notes on its beta sparse CSR support
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*", category=UserWarning)
            shape = (self.out_features, self.in_features)
            W = torch.sparse_csr_tensor(crow, col, values.to(x.dtype), shape)
            out = (W @ flat.T).T  # (n, out)
        if bias is not None:
            out = out + bias.to(x.dtype)
        return out.reshape(x.shape[:-1] + (self.out_features,))

    def _csr_structure(self) -> tuple[Tensor, Tensor]:
        """Row pointers and columns of the support (slots are sorted by flat index, so the
        slot order is the CSR order); cached per topology."""
        cache = self._csr_cache
        if (
            cache is None
            or cache[0] != self.topology_version
            or cache[1].device != self.index.device
        ):
            index = self.index.long()
            rows = torch.div(index, self.in_features, rounding_mode="floor")
            counts = torch.bincount(rows, minlength=self.out_features)
            crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            col = index % self.in_features
            cache = self._csr_cache = (self.topology_version, crow, col)
        return cache[1], cache[2]


class SparseBayesConv2d(SparseBayesLayer):
    """Sparse mean-field Bayesian ``nn.Conv2d`` (see the module docstring); the convolution
    itself runs on the dense (zero-filled) kernel."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        density: float = 0.1,
        prior_std: float = 1.0,
        init_std: float = 1e-3,
        mean_init_std: float | None = None,
    ) -> None:
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        shape = (out_channels, in_channels // groups, *ks)
        super().__init__(
            shape, out_channels if bias else None, density, prior_std, init_std, mean_init_std
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = ks, stride, padding
        self.dilation, self.groups = dilation, groups

    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def sparse_layers(module: nn.Module) -> Iterator[SparseBayesLayer]:
    """Every sparse Bayesian layer in ``module``."""
    for m in module.modules():
        if isinstance(m, SparseBayesLayer):
            yield m

"""Pieces of :class:`gp.sparse.svgp.SVGP`: the gpytorch model it holds, input and target
checks, data-scaled initial values and the block layout of a multi-class joint covariance."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from gpytorch.distributions import MultivariateNormal
from gpytorch.kernels import Kernel, RBFKernel, ScaleKernel
from gpytorch.means import ConstantMean
from gpytorch.models import ApproximateGP
from gpytorch.variational import IndependentMultitaskVariationalStrategy, VariationalStrategy
from gpytorch.variational._variational_distribution import _VariationalDistribution
from torch import Tensor, nn

from bdl.core.validation import check_inputs
from gp.sparse.initialisation import nearest_neighbour_noise_variance

if TYPE_CHECKING:
    from gp.sparse.svgp import SVGP

__all__ = [
    "VariationalGP",
    "check_inducing",
    "check_svgp_inputs",
    "check_svgp_targets",
    "default_kernel",
    "initialise_from_data",
    "interleave_blocks",
]


class VariationalGP(ApproximateGP):
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


def check_inducing(Z: object, batch_shape: torch.Size) -> Tensor:
    """Validated copy of the inducing inputs, shape ``(*batch_shape, M, d)``."""
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
        Z = Z.expand(*batch_shape, *Z.shape[-2:])
    except RuntimeError as err:
        raise ValueError(
            f"inducing_points has shape {tuple(Z.shape)}, not broadcastable to "
            f"batch_shape {tuple(batch_shape)} + (M, d)"
        ) from err
    return Z.detach().clone()


def check_svgp_inputs(X: object, Z: Tensor, batch_shape: torch.Size, name: str = "X") -> Tensor:
    """Validated inputs ``(..., n, d)`` (batch dims broadcastable with ``batch_shape``), in the
    dtype and on the device of the inducing inputs ``Z``."""
    if isinstance(X, Tensor) and X.dim() >= 2 and X.shape[-1] != Z.shape[-1]:
        raise ValueError(
            f"{name} must have shape (..., n, d) with n >= 1 and d = {Z.shape[-1]} (the "
            f"inducing points' dimension), got {tuple(X.shape)}"
        )
    X = check_inputs(X, Z.shape[-1], name=name)
    try:
        torch.broadcast_shapes(X.shape[:-2], batch_shape)
    except RuntimeError as err:
        raise ValueError(
            f"{name} has batch shape {tuple(X.shape[:-2])}, not broadcastable to the "
            f"model's batch_shape {tuple(batch_shape)}"
        ) from err
    return X.to(dtype=Z.dtype, device=Z.device)


def check_svgp_targets(
    y: object, X: Tensor, kind: str, num_classes: int | None, batch_shape: torch.Size
) -> Tensor:
    """Validated targets, shape (..., n), checked against the likelihood ``kind``."""
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
        torch.broadcast_shapes(y.shape[:-1], X.shape[:-2], batch_shape)
    except RuntimeError as err:
        raise ValueError(
            f"y has batch shape {tuple(y.shape[:-1])}, not broadcastable to that of X "
            f"{tuple(X.shape[:-2])} and the model's {tuple(batch_shape)}"
        ) from err
    if y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y must hold real numbers, got dtype {y.dtype}")
    y = y.to(dtype=X.dtype, device=X.device)
    if not bool(torch.isfinite(y).all()):
        raise ValueError("y contains NaN or inf; targets must be finite")
    if kind == "bernoulli" and not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("y must hold labels 0 and 1 for the Bernoulli likelihood")
    if kind == "poisson" and not bool(((y >= 0) & (y == y.round())).all()):
        raise ValueError("y must hold non-negative integer counts for the Poisson likelihood")
    if kind == "softmax":
        ok = (y >= 0) & (y < num_classes) & (y == y.round())
        if not bool(ok.all()):
            raise ValueError(f"y must hold class labels 0, ..., {num_classes - 1}")
    return y


def default_kernel(d: int, latent_shape: torch.Size) -> ScaleKernel:
    """``ScaleKernel(RBFKernel(ard_num_dims=d))`` with one set of hyperparameters per latent GP."""
    return ScaleKernel(
        RBFKernel(ard_num_dims=d, batch_shape=latent_shape), batch_shape=latent_shape
    )


@torch.no_grad()
def initialise_from_data(
    model: SVGP, X: Tensor, y: Tensor, default_kernel: bool, noise_fraction: float | None
) -> None:
    """Data-scaled initial values of ``model`` (see :meth:`gp.sparse.svgp.SVGP.from_data`)."""
    y_var = y.var(-1).clamp_min(1e-6) if y.shape[-1] > 1 else torch.ones_like(y[..., 0])
    if default_kernel:
        scale = X.std(-2).clamp_min(1e-6) if X.shape[-2] > 1 else torch.ones_like(X[..., 0, :])
        scale = scale.unsqueeze(-2)  # (*batch, 1, d)
        if model.num_classes is not None:
            scale = scale.unsqueeze(-3)
        base = model.kernel.base_kernel
        base.lengthscale = scale.expand_as(base.lengthscale)
        out = y_var if model.kind == "gaussian" else torch.ones_like(y_var)
        model.kernel.outputscale = out.expand_as(model.kernel.outputscale)
    mean_module = model.gp.mean_module
    if isinstance(mean_module, ConstantMean):
        if model.kind == "gaussian":
            c = y.mean(-1)
        elif model.kind == "poisson":
            c = y.mean(-1).clamp_min(1e-3).log()
        else:
            c = torch.zeros_like(y[..., 0])
        mean_module.constant.copy_(c.expand_as(mean_module.constant))
    if model.kind == "gaussian":
        if noise_fraction is not None:
            noise = noise_fraction * y_var
        elif X.shape[-2] > 1:
            estimate = nearest_neighbour_noise_variance(X, y)
            noise = torch.minimum(torch.maximum(estimate, 1e-3 * y_var), 0.5 * y_var)
        else:
            noise = 0.1 * y_var
        noise = noise.clamp_min(2e-4)
        model.noise = noise.unsqueeze(-1).expand_as(model.likelihood.raw_noise)


def interleave_blocks(cov: Tensor) -> Tensor:
    """Block-diagonal joint covariance of C independent GPs, (..., C, n, n) -> (..., nC, nC)
    in interleaved order (row ``i * C + j`` is point ``i``, class ``j``)."""
    C, n = cov.shape[-3], cov.shape[-1]
    blocks = torch.diag_embed(cov.movedim(-3, -1))  # (..., n, n, C, C)
    return blocks.transpose(-3, -2).reshape(*cov.shape[:-3], n * C, n * C)
